"""`deeplab evaluate` (score against ground truth) and `deeplab tune-crf` (CRF grid search).

Both read a labelled set (PASCAL VOC layout or image/label folders) and run the same
pipeline as `deeplab segment`; the work lives in `deeplab_cli.datasets`, `.metrics` and
`.tune`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import click

from deeplab_cli.cli.options import (check_output_file, crf_options, crf_params_from_options, device_option,
                                     flag_names, load_segmenter)
from deeplab_cli.crf.params import MAX_ITERATIONS
from deeplab_cli.errors import plural
from deeplab_cli.fsutil import check_writable_folder

VOC_HELP = "PASCAL VOC root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)."


def dataset_options(func):
    """--root/--split or --images/--labels, and --limit."""
    options = [
        click.option("--root", type=click.Path(file_okay=False), default=None, help=VOC_HELP),
        click.option("--split", default="val", show_default=True,
                     help="Split name under ImageSets/Segmentation (or a split .txt file)."),
        click.option("--images", "images_dir", type=click.Path(file_okay=False), default=None,
                     help="Folder of images, paired with --labels by file stem."),
        click.option("--labels", "labels_dir", type=click.Path(file_okay=False), default=None,
                     help="Folder of label PNGs (class indices, 255 = ignore); with --root it "
                          "replaces SegmentationClass (e.g. SegmentationClassAug)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func):
    """The network flags, as `deeplab segment` spells them."""
    options = [
        click.option("--model", metavar="NAME", default=None,
                     help="Registered weights (see `deeplab weights list`) [default: voc12]."),
        click.option("--weights", type=click.Path(dir_okay=False), metavar="FILE", default=None,
                     help="A weights file."),
        device_option,
        click.option("--no-msc", is_flag=True, help="Run the network at one scale (no 0.75/0.5 inputs)."),
        click.option("--max-size", type=click.IntRange(min=0), default=513, show_default=True,
                     help="Longest side the network sees (0 = native); scores use the original size."),
        click.option("--max-pixels", type=click.IntRange(min=0), default=100_000_000, show_default=True,
                     help="Refuse images with more pixels than this (0 = no limit)."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                     show_default=True, help="Network precision (autocast)."),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Threads reading images ahead of the network."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command()
@dataset_options
@click.option("--pred", "pred_dir", type=click.Path(file_okay=False), default=None,
              help="Score the prediction PNGs in this folder (matched by stem) instead of "
                   "running the network.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N images of the split / folder.")
@model_options
@click.option("--no-crf", is_flag=True, help="Network only, no CRF.")
@crf_options
@click.option("--n-classes", type=click.IntRange(min=2), default=None,
              help="Class count of --pred files [default: the --weights' classes, else VOC's 21].")
@click.option("--save-pred", type=click.Path(file_okay=False), default=None,
              help="Also write each prediction as a palette PNG into this folder.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write scores, per-class IoU and the confusion matrix as JSON.")
@click.option("--all-classes", is_flag=True,
              help="List every class in the table, also those never seen.")
def evaluate(root, split, images_dir, labels_dir, pred_dir, limit, model, weights, device, no_msc,
             max_size, max_pixels, precision, workers, no_crf, n_classes, save_pred, json_path,
             all_classes, **crf_flags):
    """Score segmentations against ground truth: pixel accuracy, mean accuracy, mean IoU,
    frequency-weighted IoU and per-class IoU (pixels labelled 255 are ignored).

    \b
    deeplab evaluate --root VOCdevkit/VOC2012 --split val
    deeplab evaluate --images imgs/ --labels gt/ --no-crf --json scores.json
    deeplab evaluate --pred out/ --root VOCdevkit/VOC2012 --split val
    """
    from deeplab_cli import datasets
    from deeplab_cli.errors import DeeplabError
    from deeplab_cli.image_io import quiet_decoders
    from deeplab_cli.metrics import ConfusionMatrix

    quiet_decoders()
    started = time.perf_counter()
    weights = _weights_choice(model, weights)
    # A bad CRF flag or preset is refused even where no CRF runs (--no-crf, --pred): a typo
    # that a later run without --no-crf would trip on shows now, before any weights load.
    crf_params_from_options(dict(crf_flags))
    if pred_dir is not None:
        if images_dir is not None:
            raise DeeplabError("--pred scores saved predictions against --labels or --root; "
                               "--images is not used")
        if root is not None:
            samples = datasets.voc_samples(root, split, labels=labels_dir, images=False)
        elif labels_dir is not None:
            samples = datasets.label_samples(labels_dir)
        else:
            raise DeeplabError("--pred needs the ground truth: --labels DIR or --root DIR --split NAME")
        samples = datasets.with_predictions(samples[:limit], pred_dir)
        _check_outputs(samples, json_path=json_path, save_dir=save_pred,
                       inputs=(weights, crf_flags.get("crf_params"), _split_file(root, split)))
        meta, segmenter = _meta_for_pred(weights, n_classes), None
    else:
        samples = _samples(root, split, images_dir, labels_dir)[:limit]
        if n_classes is not None:
            raise DeeplabError("--n-classes only applies to --pred; the weights fix the classes")
        _check_outputs(samples, json_path=json_path, save_dir=save_pred,
                       inputs=(weights, crf_flags.get("crf_params"), _split_file(root, split)))
        segmenter = load_segmenter(weights, device, no_crf=no_crf, crf_flags=crf_flags,
                                   msc=not no_msc, max_size=max_size, precision=precision)
        meta, crf = segmenter.meta, segmenter.crf
        click.echo(f"deeplab: {plural(len(samples), 'image')}, weights {meta.name}, "
                   f"{'multi-scale' if segmenter.msc else 'single-scale'}, CRF "
                   + (f"w1={crf.bi_w:g} xy={crf.bi_xy_std:g} rgb={crf.bi_rgb_std:g} "
                      f"w2={crf.pos_w:g} xy2={crf.pos_xy_std:g} iters={crf.iterations}"
                      if crf is not None else "off"), err=True)
    classes, palette = list(meta.classes), meta.palette
    confusion = ConfusionMatrix(len(classes))
    save_dir = Path(save_pred) if save_pred else None

    loaded = datasets.prefetch(
        lambda s: datasets.load_sample(s, n_classes=len(classes), max_pixels=max_pixels),
        samples, workers=workers)
    with _progress(len(samples), "evaluating") as advance:
        for item in loaded:
            if item.pred is not None:
                pred = item.pred
            else:
                pred = segmenter.segment(item.rgb).labels  # (H, W)
            confusion.update(item.label, pred, name=str(item.sample.pred or item.sample.label))
            if save_dir is not None:
                _save_labels(save_dir / f"{item.name}.png", pred, palette)
            advance()

    click.echo(confusion.format_table(classes, all_classes=all_classes))
    if json_path:
        from deeplab_cli.tune import write_json

        report = confusion.to_dict(classes)
        report["settings"] = _settings(root, split, images_dir, labels_dir, pred_dir, weights,
                                       segmenter)
        write_json(json_path, report)
    elapsed = time.perf_counter() - started
    click.echo(f"deeplab: scored {plural(confusion.images, 'image')} in {elapsed:.1f} s", err=True)


@click.command("tune-crf")
@dataset_options
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Tune on the first N images (the paper used 100 VOC val images).")
@model_options
@click.option("--bi-w", "grid_bi_w", default=None, metavar="LIST",
              help="w1 values: comma list and/or start:stop:step ranges (inclusive) "
                   "[default: 3:6:1].")
@click.option("--bi-xy-std", "grid_bi_xy_std", default=None, metavar="LIST",
              help="sigma_alpha values [default: 40:100:20].")
@click.option("--bi-rgb-std", "grid_bi_rgb_std", default=None, metavar="LIST",
              help="sigma_beta values [default: 3:6:1].")
@click.option("--pos-w", type=float, default=None,
              help="Fixed w2 [default: from the weights' CRF settings].")
@click.option("--pos-xy-std", type=float, default=None,
              help="Fixed sigma_gamma [default: from the weights' CRF settings].")
@click.option("--iters", type=click.IntRange(min=0), default=None,
              help=f"Mean-field iterations, at most {MAX_ITERATIONS} [default: 10].")
@click.option("--crf-norm", type=click.Choice(["symmetric", "after"]), default=None,
              help="Kernel normalization [default: symmetric].")
@click.option("--crf-params", type=click.Path(dir_okay=False), default=None,
              help="Preset whose fixed parameters (w2, sigma_gamma, ...) to start from.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="crf-preset.json",
              show_default=True, help="Where to write the best setting (a --crf-params preset).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every setting's scores as JSON.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the network's probabilities here (float16 .npy) so later runs "
                   "with another grid skip the network.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rows of the table printed (best first); --json has them all.")
def tune_crf(root, split, images_dir, labels_dir, limit, model, weights, device, no_msc,
             max_size, max_pixels, precision, workers, grid_bi_w, grid_bi_xy_std, grid_bi_rgb_std, pos_w, pos_xy_std, iters,
             crf_norm, crf_params, output, json_path, cache_dir, top):
    """Grid-search the CRF's appearance kernel (w1, sigma_alpha, sigma_beta) by mean IoU.

    The network runs once per image; each grid setting then refines its probabilities.
    w2 and sigma_gamma stay fixed. The best setting is written as a preset for
    `--crf-params`.

    \b
    deeplab tune-crf --root VOCdevkit/VOC2012 --split val --limit 100
    deeplab tune-crf --images imgs/ --labels gt/ --bi-w 3,4,5 --bi-xy-std 50:80:10 --bi-rgb-std 3,4,5
    """
    from deeplab_cli import datasets, tune
    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.errors import DeeplabError
    from deeplab_cli.image_io import quiet_decoders

    quiet_decoders()
    started = time.perf_counter()
    weights = _weights_choice(model, weights)
    grid_specs = {
        "bi_w": ("--bi-w", grid_bi_w), "bi_xy_std": ("--bi-xy-std", grid_bi_xy_std),
        "bi_rgb_std": ("--bi-rgb-std", grid_bi_rgb_std),
    }
    # an option given but empty (an unset shell variable) is a mistake, not the default grid
    values = {field: tune.parse_values(tune.DEFAULT_GRID[field] if spec is None else spec, option=option)
              for field, (option, spec) in grid_specs.items()}
    samples = _samples(root, split, images_dir, labels_dir)[:limit]
    preset = CRFParams.from_json_file(crf_params) if crf_params else None  # before the slow load
    # Every mistake a user can make shows before the weights load (or download): the grid's
    # values and size, the fixed parameters, and the outputs.
    fixed = dict(pos_w=pos_w, pos_xy_std=pos_xy_std, iterations=iters, normalization=crf_norm)
    try:
        tune.build_grid((preset or CRFParams()).replace(**fixed), **values)
    except DeeplabError as exc:  # name what the user typed: --bi-rgb-std, not bi_rgb_std
        typed = [*values, *(field for field, value in fixed.items() if value is not None)]
        raise DeeplabError(flag_names(str(exc), typed)) from None
    _check_outputs(samples, json_path=json_path, output=output,
                   inputs=(weights, crf_params, _split_file(root, split)), reread=(crf_params,))
    if cache_dir:
        check_writable_folder(Path(cache_dir), f"--cache-dir {cache_dir}")

    segmenter = load_segmenter(weights, device, msc=not no_msc, max_size=max_size,
                               precision=precision)
    meta = segmenter.meta
    base = (preset or meta.crf).replace(**fixed)
    grid = tune.build_grid(base, **values)
    n_classes = len(meta.classes)

    cache = None
    if cache_dir:
        key = tune.fingerprint(_weights_identity(weights), meta.name, n_classes, not no_msc,
                               max_size, precision)
        cache = tune.ProbsCache(cache_dir, key, device=segmenter.device)

    def items() -> Iterator[tune.TuneItem]:
        loaded = datasets.prefetch(
            lambda s: datasets.load_sample(s, n_classes=n_classes, max_pixels=max_pixels),
            samples, workers=workers)
        for item in loaded:
            key = tune.image_key(item.name, item.sample.image) if cache is not None else None
            yield tune.TuneItem(item.name, item.rgb, item.label, key)

    click.echo(f"deeplab: {plural(len(grid), 'CRF setting')} x {plural(len(samples), 'image')}", err=True)
    with _progress(len(samples), "tuning") as advance:
        result = tune.tune_crf(
            items(), grid, n_classes=n_classes, probs_fn=segmenter.probs,
            params_for=segmenter.crf_params_for, cache=cache,
            on_image=lambda item, partial: advance(),
        )

    click.echo(result.format_table(top=top))
    best = result.best
    click.echo(f"best: --bi-w {best.bi_w:g} --bi-xy-std {best.bi_xy_std:g} "
               f"--bi-rgb-std {best.bi_rgb_std:g}  mIoU {100 * result.best_score:.2f} "
               f"(no CRF {100 * result.baseline.mean_iou():.2f}, {plural(result.images, 'image')})")
    source = (f"deeplab tune-crf on {_describe(root, split, images_dir, labels_dir)}, "
              f"{plural(result.images, 'image')}, weights {meta.name}")
    tune.write_preset(output, result, source=source)
    if json_path:
        report = result.to_dict(meta.classes)
        report["settings_used"] = _settings(root, split, images_dir, labels_dir, None, weights,
                                            segmenter)
        tune.write_json(json_path, report)
    elapsed = time.perf_counter() - started
    click.echo(f"deeplab: wrote {output} ({elapsed:.1f} s)", err=True)


# Helpers


def _samples(root, split, images_dir, labels_dir):
    from deeplab_cli import datasets
    from deeplab_cli.errors import DeeplabError

    if root is not None:
        if images_dir is not None:
            raise DeeplabError("give either --root (VOC layout) or --images/--labels, not both")
        return datasets.voc_samples(root, split, labels=labels_dir)
    if images_dir is None or labels_dir is None:
        raise DeeplabError("no dataset: give --root DIR [--split NAME] or --images DIR --labels DIR")
    return datasets.paired_samples(images_dir, labels_dir)


def _check_outputs(samples, *, json_path=None, save_dir=None, output=None, inputs=(),
                   reread=()) -> None:
    """Refuse, before any slow work, outputs that would overwrite an input (a label, an
    image, a prediction, the weights...) or each other, and outputs that cannot be
    written (a file where a folder should be, no permission). `reread` are inputs read
    in full before the run that `-o` may replace (a --crf-params preset refined in place)."""
    from deeplab_cli.errors import DeeplabError

    taken: dict[str, str] = {}  # real path -> what it is
    for sample in samples:
        for kind in ("label", "image", "pred"):
            path = getattr(sample, kind)
            if path is not None:
                taken.setdefault(os.path.realpath(path), f"the {kind} {path}")
    for path in inputs:
        if path and Path(path).is_file():
            taken.setdefault(os.path.realpath(path), f"the input {path}")
    rereadable = {os.path.realpath(p) for p in reread if p}

    files = [(f"-o {output}", output), (f"--json {json_path}", json_path)]
    for option, path in files:
        if path is None:
            continue
        check_output_file(option, path, ".json")
        real = os.path.realpath(path)
        if real in taken and real not in rereadable:
            raise DeeplabError(f"{option}: is {taken[real]}; refusing to overwrite it")
        taken[real] = f"the {option.split()[0]} output"
        check_writable_folder(Path(path).parent, option)
    if save_dir is not None:
        option = f"--save-pred {save_dir}"
        for sample in samples:
            real = os.path.realpath(Path(save_dir) / f"{sample.name}.png")
            if real in taken:
                raise DeeplabError(f"{option}: {sample.name}.png would overwrite {taken[real]}; "
                                   "save predictions to a folder of their own")
        check_writable_folder(Path(save_dir), option)


def _split_file(root, split) -> Path | None:
    """The split file a --root dataset was listed from (an input outputs must spare)."""
    from deeplab_cli import datasets

    return datasets.split_path(root, split) if root is not None else None


def _weights_choice(model, weights):
    from deeplab_cli.errors import DeeplabError

    if model and weights:
        raise DeeplabError("give either --model NAME or --weights FILE, not both")
    if weights and not Path(weights).is_file():
        from deeplab_cli.weights import REGISTRY

        hint = f" (registered weights are named with --model {weights})" if weights in REGISTRY else ""
        raise DeeplabError(f"--weights {weights}: no such file{hint}")
    return weights or model


def _meta_for_pred(weights, n_classes):
    """Class names and palette (`.classes`, `.palette`) for scoring saved predictions: the
    weights' (when given), else the known label set with --n-classes classes, else the
    default weights' set."""
    from deeplab_cli import labels
    from deeplab_cli.errors import DeeplabError
    from deeplab_cli.weights import DEFAULT_WEIGHTS, REGISTRY

    if weights is None and n_classes is not None:
        return labels.for_class_count(n_classes)
    if weights is None or weights in REGISTRY:
        # A registry file has no metadata of its own: its entry's label set is all there
        # is to learn, so there is nothing to download or read.
        meta = labels.LABEL_SETS[REGISTRY[weights or DEFAULT_WEIGHTS].label_set]
    else:
        from deeplab_cli.weights import load_state_dict, resolve

        _, meta = load_state_dict(resolve(weights))
    if n_classes is not None and n_classes != len(meta.classes):
        raise DeeplabError(f"--n-classes {n_classes}: the weights have {plural(len(meta.classes), 'class')}")
    return meta


def _weights_identity(weights) -> tuple:
    """What changes when the weights file does: its path, size and mtime (or the name)."""
    from deeplab_cli.weights import resolve

    path = resolve(weights)  # None: the default weights
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _save_labels(path: Path, labels, palette) -> None:
    from deeplab_cli.image_io import write_labels

    write_labels(path, labels, palette, "palette")


def _describe(root, split, images_dir, labels_dir) -> str:
    if root is not None:
        return f"{root} split {split}"
    return f"{images_dir} with labels {labels_dir}"


def _settings(root, split, images_dir, labels_dir, pred_dir, weights, segmenter) -> dict[str, Any]:
    settings: dict[str, Any] = {"dataset": _describe(root, split, images_dir, labels_dir)}
    if pred_dir is not None:
        settings["pred"] = str(pred_dir)
        return settings
    from deeplab_cli.weights import DEFAULT_WEIGHTS

    settings.update(weights=weights or DEFAULT_WEIGHTS, msc=segmenter.msc,
                    max_size=segmenter.max_size, precision=segmenter.precision,
                    crf=segmenter.crf.to_dict() if segmenter.crf is not None else None,
                    device=str(segmenter.device))
    return settings


@contextlib.contextmanager
def _progress(total: int, label: str) -> Iterator:
    """Yield an `advance()` callable; draws a bar on stderr only when it is a terminal."""
    if not sys.stderr.isatty():
        yield lambda: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield lambda: bar.update(1)
