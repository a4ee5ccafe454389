"""Lattice geometry shared by the CPU and CUDA CRF: the two Potts kernels, their elevation
scale factors, the range of lattice coordinates an image can reach, and the limits on sizes
and parameters.

Both paths build pydensecrf's lattices (REFERENCE §2), so they refuse the same inputs with
the same message: a user sees one limit whatever the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from deeplab_cli.crf.params import CRFParams, check_float32
from deeplab_cli.errors import DeeplabError

KEY_LIMIT = 32767  # pydensecrf stores lattice coordinates as int16
INDEX_LIMIT = 2**31 - 1  # entry and vertex indices are int32
# Simplex corners per pixel: the CUDA build keeps both lattices' corners, 3 + 6, in arrays
# indexed by int32 (the CPU one lattice's at a time); one limit for both devices.
MAX_CORNERS = 9


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One pairwise kernel: its Potts weight and its features' standard deviations (float32)."""

    name: str
    weight: float
    d: int
    stds: tuple[float, ...]
    std_options: tuple[str, ...]


def float32(value: float) -> np.float32:
    """`value` rounded to float32 as pydensecrf takes it (beyond float32's range: inf, quietly)."""
    with np.errstate(over="ignore"):
        return np.float32(value)


def kernel_specs(params: CRFParams) -> list[KernelSpec]:
    """The two kernels in pydensecrf's order: Gaussian (x, y), then bilateral (x, y, r, g, b)."""
    xy = float(float32(params.pos_xy_std))
    bxy, rgb = float(float32(params.bi_xy_std)), float(float32(params.bi_rgb_std))
    return [
        KernelSpec("Gaussian", float(params.pos_w), 2, (xy, xy), ("pos_xy_std",)),
        KernelSpec("bilateral", float(params.bi_w), 5, (bxy, bxy, rgb, rgb, rgb), ("bi_xy_std", "bi_rgb_std")),
    ]


def lattice_key(params: CRFParams) -> tuple:
    """What a setting's lattices and their norms depend on: (pos_xy_std, bi_xy_std,
    bi_rgb_std) as float32, the normalization, which kernels are on (weight not 0) and
    whether any iteration runs. Settings with equal keys differ only in the kernel weights
    and the iteration count, so they can share what was built (`dense_crf_each`); the first
    three entries alone fix the two lattices themselves."""
    on = params.iterations > 0
    return (float(float32(params.pos_xy_std)), float(float32(params.bi_xy_std)),
            float(float32(params.bi_rgb_std)), params.normalization, on and params.pos_w != 0,
            on and params.bi_w != 0, on)


@functools.lru_cache(maxsize=None)
def _scale_factors(d: int) -> tuple[float, ...]:
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return tuple(float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d))


def scale_factors(d: int) -> np.ndarray:
    """Per-feature elevation scale of a d-dimensional lattice, rounded as pydensecrf does
    (computed in double, stored as float32): (d,) float32."""
    return np.array(_scale_factors(d), dtype=np.float32)


def alpha(d: int) -> np.float32:
    """pydensecrf's slice scale of a d-dimensional lattice, 1 / (1 + 2^-d), in float32."""
    return np.float32(1.0) / (np.float32(1.0) + np.float32(2.0**-d))


def scaled_feature_bounds(spec: KernelSpec, height: int, width: int) -> list[float]:
    """Upper bounds of the scaled features cf_i = f_i * scale_i (x, y, then colours 0..255)
    over any image of this size, with slack for float32 rounding (all are >= 0)."""
    fmax = [(width - 1) / spec.stds[0], (height - 1) / spec.stds[1]] + [255.0 / s for s in spec.stds[2:]]
    return [f * s * (1 + 1e-5) + 1e-3 for f, s in zip(fmax, _scale_factors(spec.d))]


def corner_margin(d: int) -> int:
    """How far, per coordinate, a simplex corner or its blur neighbour can lie from the point
    elevated: rounding to a multiple of d+1, the +-(d+1) fix, the corner offset."""
    return 3 * (d + 1)


@functools.lru_cache(maxsize=256)
def key_bounds(spec: KernelSpec, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Inclusive bounds of each of the d stored lattice coordinates (simplex corners and their
    blur neighbours included) over any image of this size, colours 0..255."""
    d = spec.d
    # Non-negative features elevate to e_j = sum(cf[j:]) - j * cf[j-1], so e_j lies in
    # [-j * cf[j-1], sum(cf[j:])]; float32 rounding is covered by the slack.
    cf = scaled_feature_bounds(spec, height, width)
    margin = corner_margin(d)
    bounds = []
    for j in range(d):
        lo = 0.0 if j == 0 else -j * cf[j - 1]
        hi = sum(cf[j:])
        bounds.append((math.floor(lo) - margin, math.ceil(hi) + margin))
    return tuple(bounds)


def check_size(height: int, width: int, params: CRFParams | None = None, *, n_images: int = 1) -> None:
    """Raise DeeplabError when the lattices cannot index `n_images` images of (at most) this
    size: every lattice coordinate must fit int16 (pydensecrf's key type; it depends on
    width/σ, height/σ and 255/σβ), and all simplex corners, 9 per pixel plus an image's
    padding origin, must be countable with int32. Also refuses parameters the float32
    arithmetic cannot carry: a σ that rounds to 0 (features x/σ would be inf or NaN) and a
    weight above params.MAX_WEIGHT (the energies would overflow to inf, the result to NaN)."""
    params = params or CRFParams()
    check_float32(params)
    n = height * width * n_images
    if height <= 0 or width <= 0:
        raise DeeplabError(f"CRF: empty image ({width}x{height})")
    if MAX_CORNERS * (n + n_images) > INDEX_LIMIT:
        what = f"a {width}x{height} image is" if n_images == 1 else f"{n_images} images of {width}x{height} are"
        fewer = "a smaller image" if n_images == 1 else "fewer or smaller images"
        raise DeeplabError(
            f"CRF: {what} {n / 1e6:.0f} MP, over the lattice's {INDEX_LIMIT // MAX_CORNERS / 1e6:.0f} MP "
            f"limit (int32 indices); use {fewer}"
        )
    for spec in kernel_specs(params):
        bounds = key_bounds(spec, height, width)
        if min(lo for lo, _ in bounds) < -KEY_LIMIT or max(hi for _, hi in bounds) > KEY_LIMIT:
            raise DeeplabError(
                f"CRF: a {width}x{height} image needs {spec.name} lattice coordinates beyond int16 with "
                f"these {' and '.join(spec.std_options)}; use larger standard deviations or a smaller image"
            )
