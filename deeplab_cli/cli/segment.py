"""`deeplab segment`: segment images, folders or a stream of paths into masks.

The command only parses, plans where each output goes and reports; the pipeline lives in
`deeplab_cli.pipeline` and the image formats in `deeplab_cli.image_io`.

Where outputs go (`-o`):
- `-o -`, or no `-o` while stdout is not a terminal: the one result goes to stdout.
- `-o FILE.png` (`.npy` for --format probs): exactly one input given on the command line
  (a file or `-`), no --from-list.
- otherwise `-o DIR`: each input's path is mirrored under DIR with the format's suffix.
  Files found in a directory input keep their path relative to that directory; files
  named on the command line or in --from-list keep their path relative to the deepest
  folder that holds them all; stdin becomes `stdin.png`.
- Collisions: when two inputs would map to one output (`a.jpg`, `a.png`; or `A.jpg`,
  `a.jpg`, since some file systems ignore case), every input in that group keeps its
  source extension: `a.jpg.png`, `a.png.png`. Anything still colliding gets `-2`, `-3`
  ... in sorted input order. An input listed twice is segmented once.
- An output is never an input, and never lands outside DIR (a symlinked folder inside
  DIR that leads out is refused); such an input fails with one line, the rest go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path, PurePath

import click

from deeplab_cli.cli import options as shared
from deeplab_cli.cli.options import crf_options, device_option, load_segmenter
from deeplab_cli.errors import DeeplabError, one_line, plural
from deeplab_cli.fsutil import check_writable_folder, read_input, text_lines

# image_io.FORMATS, repeated so that `deeplab segment --help` does not import NumPy.
FORMAT_CHOICES = ("palette", "gray", "overlay", "probs")


@dataclasses.dataclass
class Job:
    """One input and where its result goes (`output` None = stdout)."""

    source: Path | bytes  # bytes: the image read from stdin
    name: str  # as shown in messages and in the JSON "input" field
    rel: PurePath  # path mirrored under the output dir (before the suffix change)
    output: Path | None = None
    problem: str | None = None  # set when the output is refused (escape, overwrite)
    folder: bool = False  # a folder that could not be listed (a failure, but not an image)


def _binary_stream(name: str):
    """sys.stdin / sys.stdout as bytes (also under click's CliRunner); None when closed."""
    stream = getattr(sys, name)
    return getattr(stream, "buffer", stream)


def _stderr_is_tty() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


def _stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _read_stdin(label: str) -> bytes:
    """All of stdin, or a one-line DeeplabError (`label` names what was to be read)."""
    stream = _binary_stream("stdin")
    if stream is None:
        raise DeeplabError(f"{label}: stdin is closed")
    try:
        return stream.read()
    except OSError as exc:
        raise DeeplabError(f"{label}: cannot read stdin ({exc.strerror or exc})") from None


def _abandon_stdout() -> None:
    """Point descriptor 1 at /dev/null once writing to stdout has failed: what Python still
    buffers for it would fail again at exit ('Exception ignored', status 120)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # closed, or CliRunner's capture
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


# --- inputs ------------------------------------------------------------------------------


def read_list(spec: str, *, null: bool) -> list[str]:
    """Paths from a list file (or '-' for stdin): one per line, or NUL-separated with -0.

    Read as `fsutil.text_lines` reads file names: a byte-order mark (Windows Notepad)
    dropped, '\\n', '\\r\\n' or '\\r' line ends, non-UTF-8 bytes kept. Empty entries are
    skipped. An entry '-' is a file of that name, not stdin.
    """
    if spec == "-":
        data = _read_stdin("--from-list -")
    else:
        data = read_input(spec, label=f"--from-list {spec}", expected="a list of paths")
    entries = text_lines(data, label=f"--from-list {spec}", expected="a list of paths",
                         null=null, file_names=True)
    if not null and any("\0" in entry for entry in entries):  # no path holds a NUL
        raise DeeplabError(f"--from-list {spec}: the list is NUL-separated (find -print0); add -0")
    return [entry for entry in entries if entry]


def walk_images(root: Path, *, exclude: Path | None = None,
                errors: list[OSError] | None = None) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path.

    Only known image suffixes (any case); hidden files and folders (names starting with
    '.', e.g. temporary '.part' outputs or macOS '._' files) are skipped, and so is
    `exclude` (the output folder, when it sits inside an input folder). Symlinked folders
    are not followed (no loops). Folders that cannot be listed (permissions) are appended
    to `errors` when given.
    """
    from deeplab_cli.image_io import IMAGE_EXTENSIONS

    found = []
    exclude_real = os.path.realpath(exclude) if exclude is not None else None
    on_error = errors.append if errors is not None else None
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and os.path.realpath(os.path.join(dirpath, d)) != exclude_real]
        for filename in filenames:
            if filename.startswith("."):
                continue
            if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / filename)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def collect_jobs(inputs: tuple[str, ...], from_list: str | None, null: bool,
                 output_dir: Path | None) -> list[Job]:
    """Expand the inputs (files, folders, '-', list entries) into jobs, in order, once each."""
    if "" in inputs:  # Path("") is the current folder: never what `"$UNSET"` meant
        raise DeeplabError("an input is an empty string (an unset shell variable?)")
    if from_list == "-" and "-" in inputs:
        raise DeeplabError("stdin cannot hold both the image (-) and the list (--from-list -)")
    if list(inputs).count("-") > 1:
        raise DeeplabError("- (stdin) can be given only once")
    # (entry, whether '-' there means stdin): in a list, '-' is a file of that name.
    entries = [(entry, True) for entry in inputs]
    if from_list is not None:
        entries += [(entry, False) for entry in read_list(from_list, null=null)]
    if not entries:
        raise DeeplabError("no input: give image files, folders, - (stdin) or --from-list FILE")

    jobs: list[Job] = []
    loose: list[Job] = []  # files named directly; mirrored relative to their common folder
    unlisted: list[Job] = []  # folders that could not be listed: failures, no output
    for entry, dash_is_stdin in entries:
        if entry == "-" and dash_is_stdin:
            if _stdin_is_tty():
                raise DeeplabError("- (stdin) is a terminal: pipe an image into it, or name a file")
            data = _read_stdin("- (stdin)")  # read once, kept: stdin cannot be read again
            jobs.append(Job(source=data, name="<stdin>", rel=PurePath("stdin")))
            if not data:  # known now, so the model need not load to say so
                jobs[-1].problem = "<stdin>: empty input (0 bytes); pipe an image into it"
            continue
        path = Path(entry)
        if path.is_dir():
            errors: list[OSError] = []
            images = walk_images(path, exclude=output_dir, errors=errors)
            for exc in errors:
                folder = exc.filename if exc.filename is not None else entry
                unlisted.append(Job(source=Path(folder), name=str(folder), rel=PurePath(),
                                    problem=f"{folder}: cannot list this folder "
                                            f"({exc.strerror or exc}); its images were not read",
                                    folder=True))
            if not images and not errors:
                click.echo(f"deeplab: {one_line(entry)}: no images found in this folder", err=True)
            for image in images:
                jobs.append(Job(source=image, name=str(image), rel=PurePath(image.relative_to(path))))
        else:
            loose.append(Job(source=path, name=str(path), rel=PurePath()))  # rel set below
            jobs.append(loose[-1])

    if loose:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(job.source)) for job in loose])
        for job in loose:
            job.rel = PurePath(os.path.relpath(os.path.abspath(job.source), root))

    # The same file named twice (or reached twice) is segmented once.
    seen: set[str] = set()
    unique = []
    for job in jobs:
        key = os.path.abspath(job.source) if isinstance(job.source, Path) else "<stdin>"
        if key not in seen:
            seen.add(key)
            unique.append(job)
    for job in unique:
        if job.rel.is_absolute() or ".." in job.rel.parts:
            raise DeeplabError(f"{job.name}: cannot be mirrored inside the output folder")
    return unique + unlisted


# --- outputs -----------------------------------------------------------------------------


def choose_mode(output: str | None, inputs: tuple[str, ...], from_list: str | None,
                suffix: str) -> str:
    """'stdout', 'file' or 'dir' (see the module docstring), or a one-line error."""
    from deeplab_cli.image_io import IMAGE_EXTENSIONS

    if output is None:
        if shared.stdout_is_tty():
            raise DeeplabError("no -o given and stdout is a terminal: give -o FILE or -o DIR, "
                               "or pipe the output")
        if sys.stdout is None:
            raise DeeplabError("no -o given and stdout is closed: give -o FILE or -o DIR")
        output = "-"
    if output == "-":
        if shared.stdout_is_tty():
            raise DeeplabError("-o -: refusing to write an image to a terminal; redirect stdout")
        if sys.stdout is None:
            raise DeeplabError("-o -: stdout is closed")
        return "stdout"
    if not output:  # Path("") is the current folder: never what `-o "$UNSET"` meant
        raise DeeplabError("-o: an empty path (an unset shell variable?)")
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)):
        return "dir"
    single = (len(inputs) == 1 and from_list is None
              and (inputs[0] == "-" or not Path(inputs[0]).is_dir()))
    if single and path.suffix:
        if path.suffix.lower() != suffix:
            raise DeeplabError(f"-o {output}: this format writes {suffix} files; "
                               f"name the output *{suffix}")
        return "file"
    if path.exists():
        raise DeeplabError(f"-o {output}: exists and is not a folder, and there are several inputs")
    # An image or .npy suffix says "this is a file name": with several inputs, a mistake.
    if path.suffix.lower() in IMAGE_EXTENSIONS | {".npy"}:
        raise DeeplabError(f"-o {output}: looks like a file name, but the inputs can hold "
                           "several images; give a folder")
    return "dir"


def assign_outputs(jobs: list[Job], out_dir: Path, suffix: str) -> None:
    """Set each job's output under `out_dir`, resolving collisions (module docstring)."""
    def key(path: PurePath) -> str:
        return str(path).casefold()

    jobs = [job for job in jobs if job.problem is None]  # unlisted folders get no output
    plain = {id(job): job.rel.with_suffix(suffix) if job.rel.suffix else job.rel.with_name(job.rel.name + suffix)
             for job in jobs}
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(key(plain[id(job)]), []).append(job)
    rel_out = {}
    for members in groups.values():
        for job in members:
            rel_out[id(job)] = (plain[id(job)] if len(members) == 1
                                else job.rel.with_name(job.rel.name + suffix))
    # Still colliding (e.g. inputs `a.jpg`, `a.png` and `a.jpg.png`): number them.
    taken: dict[str, Job] = {}
    for job in sorted(jobs, key=lambda j: str(j.rel)):
        rel = rel_out[id(job)]
        n = 2
        while key(rel) in taken:
            stem = rel_out[id(job)].name[: -len(suffix)]
            rel = rel_out[id(job)].with_name(f"{stem}-{n}{suffix}")
            n += 1
        taken[key(rel)] = job
        rel_out[id(job)] = rel

    out_real = os.path.realpath(out_dir)
    inputs_real = {os.path.realpath(j.source) for j in jobs if isinstance(j.source, Path)}
    for job in jobs:
        job.output = out_dir / rel_out[id(job)]
        check_output(job, out_real, inputs_real)


def check_output(job: Job, out_real: str | None, inputs_real: set[str]) -> None:
    """Refuse outputs that would overwrite an input or land outside the output folder."""
    target = os.path.realpath(job.output)
    if target in inputs_real:
        job.problem = f"{job.name}: output {job.output} would overwrite an input; refused"
    elif out_real is not None and os.path.commonpath([out_real, target]) != out_real:
        job.problem = f"{job.name}: output {job.output} would land outside {out_real}; refused"


# --- the command -------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", metavar="FILE|DIR|-",
              help="Output file (one input), folder (mirrors the inputs' paths) or - for stdout.")
@click.option("--from-list", metavar="FILE|-", help="Also read input paths from FILE (- = stdin), one per line.")
@click.option("-0", "--null", "null", is_flag=True, help="--from-list entries are NUL-separated (find -print0).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="palette", show_default=True,
              help="palette: PNG of class ids with the dataset colours; gray: PNG of class ids; "
                   "overlay: mask blended on the image; probs: float32 .npy (C, H, W).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Mask opacity for --format overlay.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON line per image on stdout (classes, fractions, timings).")
@click.option("--model", metavar="NAME", help="Registered weights (see `deeplab weights list`).")
@click.option("--weights", type=click.Path(dir_okay=False), metavar="FILE", help="A weights file.")
@device_option
@click.option("--no-crf", is_flag=True, help="Skip the CRF: labels straight from the network.")
@click.option("--no-msc", is_flag=True, help="Run the network at one scale (faster, slightly worse).")
@crf_options
@click.option("--max-size", type=click.IntRange(min=0), default=513, show_default=True,
              help="Longest side the network sees (0 = native); masks keep the original size.")
@click.option("--max-pixels", type=click.IntRange(min=0), default=100_000_000, show_default=True,
              help="Refuse images with more pixels than this (0 = no limit).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Same-size images run through the network together, up to this many.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Network arithmetic (autocast); the CRF always runs in fp32.")
@click.option("--skip-existing", is_flag=True, help="Leave outputs that already exist (resume a run).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first image that fails; nothing after it is written.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, and no summary unless an image failed.")
@click.pass_context
def segment(ctx: click.Context, inputs, output, from_list, null, fmt, alpha, as_json, model,
            weights, device, no_crf, no_msc, max_size, max_pixels, batch_size, precision,
            skip_existing, fail_fast, quiet, **crf_flags) -> None:
    """Segment INPUT images (files, folders, or - for stdin) into masks.

    \b
    Examples:
      deeplab segment photo.jpg -o mask.png
      deeplab segment photos/ -o masks/ --format overlay
      cat photo.jpg | deeplab segment - > mask.png
      find photos -name '*.jpg' -print0 | deeplab segment --from-list - -0 -o masks --json | jq .
    """
    from deeplab_cli.image_io import output_suffix, quiet_decoders

    quiet_decoders()
    if model and weights:
        raise DeeplabError("give either --model NAME or --weights FILE, not both")
    if weights and not Path(weights).is_file():
        raise DeeplabError(f"--weights {weights}: no such file")
    # Bad CRF flags are a mistake even with --no-crf (which only skips the CRF): said now,
    # before any input is read or the weights load.
    shared.crf_params_from_options(dict(crf_flags))
    suffix = output_suffix(fmt)
    mode = choose_mode(output, inputs, from_list, suffix)
    if mode == "stdout" and as_json:
        raise DeeplabError("--json and the mask would both go to stdout; give -o FILE or -o DIR")
    if as_json and sys.stdout is None:
        raise DeeplabError("--json: stdout is closed")
    out_dir = Path(output) if mode == "dir" else None
    jobs = collect_jobs(inputs, from_list, null, out_dir)
    if not jobs:
        raise DeeplabError("no input images found")
    n_images = sum(job.problem is None for job in jobs)
    if mode == "stdout" and n_images > 1:
        raise DeeplabError(f"stdout holds one image but there are {n_images} inputs; give -o DIR")
    if mode == "dir":
        assign_outputs(jobs, out_dir, suffix)
    elif mode == "file":
        jobs[0].output = Path(output)
        check_output(jobs[0], None, {os.path.realpath(j.source) for j in jobs
                                     if isinstance(j.source, Path)})

    existing = {id(job) for job in jobs if job.problem is None and skip_existing
                and job.output is not None and job.output.exists()}
    todo = [job for job in jobs if job.problem is None and id(job) not in existing]
    if todo and mode != "stdout":
        # Before the model loads and every image fails alike: a read-only or misplaced -o.
        check_writable_folder(out_dir if mode == "dir" else Path(output).parent, f"-o {output}")

    stats = _Stats(total=sum(not job.folder for job in jobs))
    for job in jobs:
        if job.problem:
            stats.fail(job, job.problem, as_json=as_json)
            if fail_fast:
                _finish(ctx, stats, quiet)
        elif id(job) in existing:
            stats.skipped += 1
            if as_json:
                _emit({"input": job.name, "output": str(job.output), "status": "skipped"})

    if todo:
        # This process reads images only through read_image, whose --max-pixels check (made
        # on the header) stands in for PIL's process-wide bomb guard and its warnings.
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        segmenter = load_segmenter(model or weights, device, no_crf=no_crf, crf_flags=crf_flags,
                                   quiet=quiet, msc=not no_msc, max_size=max_size,
                                   precision=precision)
        try:
            _run(segmenter, todo, stats, fmt=fmt, alpha=alpha, as_json=as_json,
                 max_pixels=max_pixels, batch_size=batch_size, fail_fast=fail_fast, quiet=quiet)
        except BrokenPipeError:
            # Whoever read stdout went away (e.g. `| head -1`): stop quietly, as cat does.
            _abandon_stdout()
            ctx.exit(1)
        except _StdoutError as exc:  # the JSON lines cannot be written (a full disk)
            _abandon_stdout()
            stats.broken = True
            click.echo(f"deeplab: stdout: cannot write ({exc}); stopped", err=True)
    _finish(ctx, stats, quiet)


@dataclasses.dataclass
class _Stats:
    total: int  # images (folders that could not be listed are counted apart)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    folders: int = 0  # folders that could not be listed
    broken: bool = False  # stdout failed: the run stopped early
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def fail(self, job: Job, message: str, *, as_json: bool) -> None:
        if job.folder:
            self.folders += 1
        else:
            self.failed += 1
        click.echo(f"deeplab: {one_line(message)}", err=True)
        if as_json:
            _emit({"input": job.name, "output": str(job.output) if job.output else "-",
                   "status": "error", "error": message})


class _StdoutError(Exception):
    """Writing a JSON line to stdout failed (other than its reader leaving)."""


def _strict_json(record: dict) -> dict:
    """`record` with every string valid Unicode, so strict JSON parsers take the line. A
    file name that is not UTF-8 (its bytes kept by os.fsdecode as lone surrogates, which
    JSON can only write as invalid \\udcXX escapes) shows with U+FFFD in their place, and
    its exact bytes go base64-encoded under `<key>_bytes` (as ripgrep's --json does)."""
    import base64

    out = {}
    for key, value in record.items():
        raw = None
        if isinstance(value, str) and not _is_unicode(value):
            try:
                raw = value.encode("utf-8", "surrogateescape")  # the name's bytes, as read
            except UnicodeEncodeError:  # some other lone surrogate: no bytes to give back
                raw = value.encode("utf-8", "replace")
            value = raw.decode("utf-8", "replace")
        out[key] = value
        if raw is not None and key in ("input", "output"):
            out[f"{key}_bytes"] = base64.b64encode(raw).decode("ascii")
    return out


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _emit(record: dict) -> None:
    try:
        click.echo(json.dumps(_strict_json(record)))
        sys.stdout.flush()  # one line at a time, so `| jq` sees each image as it finishes
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _StdoutError(exc.strerror or str(exc)) from None


def _describe_error(job: Job, exc: BaseException) -> str:
    if isinstance(exc, DeeplabError):
        text = str(exc)
        return text if job.name in text else f"{job.name}: {text}"
    if isinstance(exc, OSError) and job.output is not None:
        return f"{job.output}: cannot write ({exc.strerror or exc})"
    if isinstance(exc, OSError):
        return f"{job.name}: cannot write the result to stdout ({exc.strerror or exc})"
    return f"{job.name}: {type(exc).__name__}: {exc}"


def _run(segmenter, jobs: list[Job], stats: _Stats, *, fmt, alpha, as_json, max_pixels,
         batch_size, fail_fast, quiet) -> None:
    import numpy as np

    from deeplab_cli.image_io import encode_output, read_image, write_bytes

    meta = segmenter.meta
    stdout = _binary_stream("stdout")

    def read(job: Job):
        return read_image(job.source, name=job.name, max_pixels=max_pixels)

    def save(item):
        """On the writer thread: encode, write (atomically), count the classes."""
        job, result = item.source, item.result
        t0 = time.perf_counter()
        data = encode_output(fmt, labels=result.labels, palette=meta.palette, image=item.image,
                             probs=result.probs, alpha=alpha)
        write_bytes(stdout if job.output is None else job.output, data)
        result.timings["encode"] = time.perf_counter() - t0
        result.probs = item.image = None  # free them before the item waits in the queue
        if as_json:
            return np.bincount(result.labels.ravel(), minlength=len(meta.classes))
        return None

    bar = None
    if not quiet and _stderr_is_tty() and len(jobs) > 1:
        bar = click.progressbar(length=len(jobs), label="segmenting", file=sys.stderr,
                                show_eta=True, show_pos=True)
    # stop_on_error: with --fail-fast nothing after the failing image is written, although
    # the stream reads and segments ahead. closing(): leaving early (a broken pipe) drops
    # the writes not started and lets the one under way finish.
    items = segmenter.segment_many(jobs, read=read, batch_size=batch_size,
                                   keep_probs=fmt == "probs", on_result=save,
                                   stop_on_error=fail_fast)
    with bar if bar is not None else contextlib.nullcontext(), contextlib.closing(items):
        for item in items:
            job = item.source
            if job.output is None and isinstance(item.error, BrokenPipeError):
                raise item.error  # stdout's reader left (the writer thread saw it); see segment()
            if item.error is not None:
                stats.fail(job, _describe_error(job, item.error), as_json=as_json)
                if job.output is None and isinstance(item.error, OSError):
                    _abandon_stdout()
            else:
                stats.done += 1
                if as_json:
                    _emit(_record(job, item.result, item.output, meta))
            if bar is not None:
                bar.update(1)


def _record(job: Job, result, counts, meta) -> dict:
    """The JSON line for one segmented image."""
    import numpy as np

    height, width = result.labels.shape
    total = float(height * width)
    classes = [{"id": int(i), "name": meta.classes[i] if i < len(meta.classes) else f"class_{i}",
                "pixels": int(counts[i]), "fraction": counts[i] / total}
               for i in np.flatnonzero(counts)]
    return {
        "input": job.name,
        "output": str(job.output) if job.output is not None else "-",
        "status": "ok",
        "width": width,
        "height": height,
        "classes": classes,
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
    }


def _finish(ctx: click.Context, stats: _Stats, quiet: bool) -> None:
    """The summary line on stderr; exit status 1 if any image or folder failed."""
    elapsed = time.perf_counter() - stats.started
    failed = stats.failed or stats.folders or stats.broken
    if not quiet or failed:
        rate = stats.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{stats.done} segmented"]
        if stats.skipped:
            parts.append(f"{stats.skipped} skipped (existing)")
        if stats.failed:
            parts.append(f"{stats.failed} failed")
        not_run = stats.total - stats.done - stats.skipped - stats.failed
        if not_run:
            parts.append(f"{not_run} not run ({'stdout failed' if stats.broken else '--fail-fast'})")
        speed = f" ({rate:.2f} images/s)" if stats.done else ""
        folders = f"; {plural(stats.folders, 'folder')} could not be read" if stats.folders else ""
        click.echo(f"deeplab: {plural(stats.total, 'image')}: {', '.join(parts)} "
                   f"in {elapsed:.1f} s{speed}{folders}", err=True)
    ctx.exit(1 if failed else 0)

