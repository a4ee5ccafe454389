"""Option groups shared by several commands (CRF flags, device), as single decorators, and
the one way those commands turn them into a pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from deeplab_cli.crf.params import MAX_ITERATIONS  # light: no NumPy or torch

# The CRF flags' parameter names and the CRFParams fields they set; --crf-params is a preset.
_FLAG_FIELDS = {
    "iters": "iterations", "pos_w": "pos_w", "pos_xy_std": "pos_xy_std", "bi_w": "bi_w",
    "bi_xy_std": "bi_xy_std", "bi_rgb_std": "bi_rgb_std", "crf_norm": "normalization",
}
CRF_FLAGS = (*_FLAG_FIELDS, "crf_params")


def crf_options(func: Callable) -> Callable:
    """Add the CRF flags. Unset flags stay None, so defaults can come from the weights."""
    options = [
        click.option("--iters", type=click.IntRange(min=0), default=None,
                     help=f"Mean-field iterations, at most {MAX_ITERATIONS} [default: 10]."),
        click.option("--pos-w", type=float, default=None,
                     help="Weight of the Gaussian (smoothness) kernel, w2."),
        click.option("--pos-xy-std", type=float, default=None,
                     help="Spatial std of the Gaussian kernel in pixels, sigma_gamma."),
        click.option("--bi-w", type=float, default=None,
                     help="Weight of the bilateral (appearance) kernel, w1."),
        click.option("--bi-xy-std", type=float, default=None,
                     help="Spatial std of the bilateral kernel in pixels, sigma_alpha."),
        click.option("--bi-rgb-std", type=float, default=None,
                     help="Colour std of the bilateral kernel (0..255 units), sigma_beta."),
        click.option("--crf-norm", type=click.Choice(["symmetric", "after"]), default=None,
                     help="Kernel normalization: pydensecrf's 'symmetric' [default] or "
                          "DeepLab's original 'after'."),
        click.option("--crf-params", type=click.Path(dir_okay=False), default=None,
                     help="JSON preset (as written by `deeplab tune-crf`); flags override it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def crf_params_from_options(options: dict[str, Any], defaults=None):
    """Build CRFParams from the CRF flags: the --crf-params preset if given (it replaces
    `defaults` as a whole; fields it lacks take CRFParams' defaults), else `defaults`
    (e.g. the weights' metadata; None: CRFParams()); then each flag that is set.

    Removes the CRF flags from `options` so the rest can be passed on.
    """
    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.errors import DeeplabError

    preset = options.pop("crf_params", None)
    flags = {field: options.pop(name, None) for name, field in _FLAG_FIELDS.items()}
    if preset:
        params = CRFParams.from_json_file(preset)
    else:
        params = defaults if defaults is not None else CRFParams()
    try:
        return params.replace(**flags)
    except DeeplabError as exc:
        raise DeeplabError(flag_names(str(exc), [f for f, v in flags.items() if v is not None])) from None


def flag_names(message: str, fields) -> str:
    """A CRFParams message with the given fields called by their flags ('CRF parameter
    bi_rgb_std' -> '--bi-rgb-std'), for values the user typed as flags."""
    import re

    flags = {field: "--" + name.replace("_", "-") for name, field in _FLAG_FIELDS.items()}
    for field in fields:
        message = re.sub(rf"\bCRF (?:parameter )?{field}\b", flags[field], message)
    return message


def stdout_is_tty() -> bool:
    """Whether stdout is an open terminal (where `-o -` must not write binary data).
    Commands look it up through this module when they run, so a test patches this one."""
    return sys.stdout is not None and sys.stdout.isatty()


def check_output_file(option: str, path: str, suffix: str) -> None:
    """One-line DeeplabError for an output file name that is empty or names a folder
    (`option`: how the message names it, e.g. '-o out.png'; `suffix`: what to name instead)."""
    from deeplab_cli.errors import DeeplabError

    if not path:
        raise DeeplabError(f"{option.split()[0]}: empty file name")
    if Path(path).is_dir() or path.endswith(("/", os.sep)):
        raise DeeplabError(f"{option}: names a folder; name the output file (*{suffix})")


def device_option(func: Callable) -> Callable:
    """Add --device (a string for `deeplab_cli.device.resolve_device`)."""
    return click.option(
        "--device", default="auto", show_default=True,
        help="auto, cpu, cuda or cuda:N. 'auto' uses CUDA when available, else the CPU.",
    )(func)


def load_segmenter(weights, device: str, *, no_crf: bool = False, crf_flags: dict | None = None,
                   quiet: bool = False, **segmenter_options):
    """The pipeline a command runs: `weights` (registry name, file, or None for the default)
    on `device`, with the weights' own CRF and the CRF flags applied over it (none with
    `no_crf`). `segmenter_options` go to `Segmenter` (msc, max_size, precision)."""
    from deeplab_cli.device import resolve_device
    from deeplab_cli.pipeline import Segmenter

    if crf_flags and not no_crf:
        # A bad flag or preset file is known now, before the weights load (or download): check
        # them over the plain defaults; they apply over the weights' own below.
        crf_params_from_options(dict(crf_flags))
    segmenter = Segmenter.from_weights(weights, device=resolve_device(device, quiet=quiet),
                                       **segmenter_options)
    if no_crf:
        segmenter.crf = None
    elif crf_flags:
        segmenter.crf = crf_params_from_options(dict(crf_flags), defaults=segmenter.meta.crf)
    return segmenter
