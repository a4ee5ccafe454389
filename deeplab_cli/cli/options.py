"""Option groups shared by several commands (CRF flags, device), as single decorators."""

from __future__ import annotations

from typing import Any, Callable

import click

CRF_FLAGS = ("iters", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std", "crf_norm", "crf_params")


def crf_options(func: Callable) -> Callable:
    """Add the CRF flags. Unset flags stay None, so defaults can come from the weights."""
    options = [
        click.option("--iters", type=click.IntRange(min=0), default=None,
                     help="Mean-field iterations [default: 10]."),
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
    """Build CRFParams: `defaults` (e.g. the weights' metadata), then the preset, then flags.

    Removes the CRF flags from `options` so the rest can be passed on.
    """
    from deeplab_cli.crf.params import CRFParams

    values = {name: options.pop(name, None) for name in CRF_FLAGS}
    params = defaults if defaults is not None else CRFParams()
    if values["crf_params"]:
        params = CRFParams.from_json_file(values["crf_params"])
    return params.replace(
        iterations=values["iters"],
        pos_w=values["pos_w"],
        pos_xy_std=values["pos_xy_std"],
        bi_w=values["bi_w"],
        bi_xy_std=values["bi_xy_std"],
        bi_rgb_std=values["bi_rgb_std"],
        normalization=values["crf_norm"],
    )


def device_option(func: Callable) -> Callable:
    return click.option(
        "--device", default="auto", show_default=True,
        help="auto, cpu, cuda or cuda:N. 'auto' uses CUDA when available, else the CPU.",
    )(func)
