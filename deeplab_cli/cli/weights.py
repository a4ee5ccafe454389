"""`deeplab weights`: list, download, inspect and convert pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def weights() -> None:
    """List, download, inspect and convert pretrained weights.

    Registry weights are cached in $DEEPLAB_HOME (else $XDG_CACHE_HOME/deeplab, else
    ~/.cache/deeplab); set DEEPLAB_WEIGHTS_URL to fetch them from a mirror.
    """


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.0f} MB"


# What `list --verify` shows for `deeplab_cli.weights.verify_cached`'s plain results (the
# others, 'corrupt (...)' and 'unreadable (...)', as they are).
VERIFY_SHOWN = {"ok": "ok (sha256)", "loads": "ok (loads; no hash known)", "missing": "-"}


@weights.command("list", short_help="Show the known weights and whether they are cached.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--verify", is_flag=True,
              help="Read each cached file whole: check its sha256 where the registry knows one, "
                   "else that it loads as weights with the right class count; exit status 1 if "
                   "any is corrupt.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool, verify: bool) -> None:
    """Show the known pretrained weights and whether they are cached."""
    from deeplab_cli.weights import DEFAULT_WEIGHTS, REGISTRY, verify_cached

    rows = []
    for entry in REGISTRY.values():
        cached = entry.path.is_file()
        rows.append({
            "name": entry.name,
            "default": entry.name == DEFAULT_WEIGHTS,
            "dataset": entry.dataset,
            "classes": entry.n_classes,
            "size_bytes": entry.path.stat().st_size if cached else entry.approx_size,
            "cached": cached,
            "path": str(entry.path),
            "url": entry.url,
            "miou": {"no_crf": entry.miou[0], "crf": entry.miou[1]},
            "crf": entry.crf.to_dict(),
            "description": entry.description,
            "license": entry.license,
        })
        if verify:  # "ok", "loads", "corrupt (...)", "unreadable (...)"; None when not cached
            state = verify_cached(entry.name)
            rows[-1]["verify"] = None if state == "missing" else state
    bad = [row for row in rows if verify and row["verify"] not in (None, "ok", "loads")]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table = [("NAME", "DATASET", "CLASSES", "SIZE", "mIoU / +CRF", "CACHED")
                 + (("VERIFY",) if verify else ())]
        for row in rows:
            table.append((
                row["name"] + (" *" if row["default"] else ""),
                row["dataset"],
                str(row["classes"]),
                _size(row["size_bytes"]) if row["cached"] else "~" + _size(row["size_bytes"]),
                f"{row['miou']['no_crf']:.2f} / {row['miou']['crf']:.2f}",
                "yes" if row["cached"] else "no",
            ) + ((VERIFY_SHOWN.get(row["verify"] or "missing", row["verify"]),) if verify else ()))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        click.echo(f"\n* default. Cache: {Path(rows[0]['path']).parent}")
    for row in bad:
        hint = f"; delete it and run `deeplab weights download {row['name']}`" if row["verify"].startswith(
            "corrupt") else ""
        click.echo(f"deeplab: {row['name']}: {row['path']} is {row['verify']}{hint}", err=True)
    if bad:
        ctx.exit(1)


@weights.command(short_help="Download registry weights and print their paths.")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar on stderr [default: when stderr is a terminal].")
def download(names: tuple[str, ...], progress: bool | None) -> None:
    """Download registry weights into the cache and print their paths.

    Files already cached are not downloaded again.
    """
    from deeplab_cli.weights import fetch

    for name in names:
        click.echo(str(fetch(name, progress=progress)))


@weights.command(short_help="Format, classes, keys, parameters and sha256 of weights.")
@click.argument("weights_file", metavar="FILE_OR_NAME")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(weights_file: str, as_json: bool) -> None:
    """Describe a weights file (or cached registry weights): format, classes, keys,
    parameter count, sha256."""
    from deeplab_cli.weights import info as weights_info

    facts = weights_info(weights_file)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    names = facts["class_names"]
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    crf = facts["crf"]
    lines = [
        ("path", facts["path"]),
        ("format", facts["format"]),
        ("name", facts["name"]),
        ("dataset", facts["dataset"]),
        ("classes", f"{facts['classes']} ({shown})"),
        ("aspp", facts["aspp"]),
        ("keys", str(facts["keys"])),
        ("parameters", f"{facts['parameters']:,}"),
        ("size", f"{facts['size_bytes']:,} bytes"),
        ("sha256", facts["sha256"]),
        ("crf", " ".join(f"{k}={v}" for k, v in crf.items())),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key.ljust(width)}  {value}")


@weights.command(short_help="Convert any supported weights to .safetensors with metadata.")
@click.argument("src", metavar="SRC")
@click.argument("dst", type=click.Path(dir_okay=False), metavar="DST.safetensors")
@click.option("--name", default=None, help="Name stored in the metadata [default: kept].")
@click.option("--dataset", default=None, help="Dataset description stored in the metadata.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), default=None,
              help="Text file with one class name per line (count must match the weights).")
@click.option("--aspp", type=click.Choice(["L", "S"]), default=None,
              help="ASPP variant of the weights (not visible in the tensors) [default: L].")
def convert(src: str, dst: str, name: str | None, dataset: str | None,
            labels_file: str | None, aspp: str | None) -> None:
    """Convert SRC (.pth, .safetensors, .caffemodel or a registry name) to safetensors.

    The output carries metadata: class names, palette, dataset, mean pixel, CRF
    defaults. They come from SRC's own metadata, else from the registry entry with the
    same class count, unless given here.
    """
    from deeplab_cli.errors import DeeplabError
    from deeplab_cli.fsutil import read_input, text_lines
    from deeplab_cli.weights import ClassCountError
    from deeplab_cli.weights import convert as convert_weights

    classes = None
    if labels_file:
        data = read_input(labels_file, label=f"--labels {labels_file}", expected="a text file")
        lines = text_lines(data, label=f"--labels {labels_file}", expected="one class name per line")
        classes = [line.strip() for line in lines if line.strip()]
    try:
        out = convert_weights(src, dst, name=name, dataset=dataset, classes=classes, aspp=aspp)
    except ClassCountError as exc:
        raise DeeplabError(f"--labels {labels_file}: {exc}") from None
    click.echo(str(out))
