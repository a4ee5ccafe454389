"""Dense CRF on the CPU: permutohedral-lattice mean field that reproduces pydensecrf.

This module is the oracle for the CUDA kernels, so it spells out the lattice exactly.
Everything below follows Krähenbühl's densecrf (as built by pydensecrf2 1.1, SSE path);
see REFERENCE §2. With N pixels, C labels and a kernel of feature dimension d:

Features (float32, pixel index n = y*W + x, x and y counted from 0):
  Gaussian  (d = 2): (x/σγ, y/σγ)
  bilateral (d = 5): (x/σα, y/σα, r/σβ, g/σβ, b/σβ), raw 0..255 colours, in this order.
  Each is one float32 division of the integer by the float32 σ.

Lattice (all arithmetic in float32, in this operation order, because it decides which
lattice vertices exist and a one-ulp change moves a pixel to another simplex):
  sf[i]   = float32(1/sqrt((i+1)(i+2)) * float32(sqrt(2/3)(d+1)))   (computed in double)
  elevate:  sm = 0; for j = d..1: cf = f[j-1]*sf[j-1]; e[j] = sm - j*cf; sm += cf;  e[0] = sm
  rounding: v[i] = rint(e[i] * float32(1/(d+1))) (round half to even); rem0[i] = v[i]*(d+1);
            s = Σ v[i]
  ranking:  δ[i] = e[i] - rem0[i]; for each pair i < j: if δ[i] < δ[j] then rank[i] += 1
            else rank[j] += 1 (rank 0 = largest remainder; ties rank the later index lower)
  correct:  rank[i] += s; if rank[i] < 0: rank += d+1, rem0 += d+1;
            if rank[i] > d: rank -= d+1, rem0 -= d+1
  weights:  u[i] = (e[i] - rem0[i]) * float32(1/(d+1)); b = 0 (d+2 slots);
            b[d-rank[i]] += u[i]; b[d-rank[i]+1] -= u[i]; then b[0] += 1 + b[d+1].
            Vertex r (r = 0..d) gets weight b[r]; the d+1 weights sum to 1.
  padding:  pydensecrf builds in blocks of 4 points; when N % 4 != 0 the zero-feature
            padding lanes of the last block add the origin's d+1 corners as vertices
            (never splatted or sliced, but present for the blur). See `build_lattice`.
  keys:     vertex r has the d integer coordinates key[i] = rem0[i] + r - (d+1)·[rank[i] > d-r]
            (i = 0..d-1; the (d+1)-th coordinate is implied by the zero sum). Keys are int16 in
            pydensecrf, so `deeplab_cli.crf.check_size` refuses images whose keys would overflow.

Filtering (K·V for values V of shape (N, C)):
  splat:  vertex value = Σ over (pixel, r) landing on it of b[r] · V[pixel]
  blur:   for axis j = 0..d in order, Jacobi (all vertices read the previous buffer):
          new = old + 0.5·(old[n1] + old[n2]) where n1 = key - 1 on every coordinate but
          key + d on coordinate j, n2 = key + 1 on every coordinate but key - d on
          coordinate j (axis j = d: all -1 / all +1). A neighbour that is not a lattice
          vertex contributes 0; vertices are never created by the blur.
  slice:  out[pixel] = α · Σ_r b[r] · vertex value, α = 1/(1 + 2^-d). The pixel's own
          contribution stays in (no subtraction of the diagonal).

Mean field (pydensecrf `inference`):
  U = -log(clip(p, 1e-5, 1)); Q = softmax(-U) over labels.
  Normalization 'symmetric' (default): norm = K·1, n = 1/sqrt(norm + 1e-20),
     K̃(Q) = n ⊙ K(n ⊙ Q).  'after' (DeepLab's code): n = 1/(norm + 1e-20), K̃(Q) = n ⊙ K(Q).
  Each iteration: tmp = -U + w_pos·K̃_gauss(Q) + w_bi·K̃_bilateral(Q) (Potts: agreement is
  rewarded), Q = softmax(tmp). No damping; exactly `iterations` steps; 0 steps return
  softmax(-U).

Implementation: the hot loops are compiled with numba (cached on disk, see below), in
strict float32 (no fast-math) except the two reductions of the softmax.
The lattice is built once per image: the simplices in parallel, a chunk of points at a
time; each corner's key becomes one integer code, linear in the key, whose order sorts
the vertices by their y, then x feature (`_vertex_coding`); the corners go through an
open-addressing hash table of codes in point order, the distinct codes are radix-sorted,
and the vertices are numbered in code order. A blur neighbour's code is the vertex's
code plus a fixed step, and any such order is kept by that shift, so the neighbours of
vertices in increasing order are themselves increasing: one merge-like walk per axis
finds them without lookups, and the blur reads memory in order. Each mean-field
iteration works on (N, C') and (M+1, C') row-major float32 buffers allocated once
(C' = C rounded up to 8 lanes): the splat scatters in pixel order as pydensecrf does
(one task per kernel), the d+1 blur passes are Jacobi steps between two buffers
(parallel over vertices; on one thread, runs of axes whose neighbours lie close by are
swept together while in cache, see `_blur_sweep`), and one pass over the pixels
(parallel) slices both kernels and takes the softmax. Splat and slice prefetch the
scattered vertex rows of the pixels a few ahead. The normalization, α and the kernel
weight are folded into the splat and slice weights. Every output element is computed
by one thread by the same operations in a fixed order, so results do not depend on the
thread count. `Lattice.filter` is the plain staged NumPy form, kept as the reference.

Threads: numba's pool, `threads=` of `dense_crf_cpu`, else `NUMBA_NUM_THREADS` (default:
all cores); the caller's torch thread count, which shares numba's OpenMP runtime, is left
as it was (`_torch_threads`). Compiled code is cached under `NUMBA_CACHE_DIR` if set, else
next to this file, else in the user's cache directory (~/.cache/numba); with none writable
it is compiled in every process. Compiling takes about 10 s (once per install); loading it
about 0.2 s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import llvmlite.ir
import numba
import numba.core.cgutils
import numba.extending
import numpy as np

from deeplab_cli.crf.geometry import alpha, check_size, float32, lattice_key, scale_factors

if TYPE_CHECKING:  # pragma: no cover
    from deeplab_cli.crf.params import CRFParams

# Points whose simplices are computed at once while building the lattice: bounds the
# temporaries (about 60 bytes per point) independently of the image size.
_CHUNK_PIXELS = 1 << 18
# Vertices room is first made for, per point (grows as needed); the hash table has
# twice as many slots and doubles whenever it is half full.
_VERTICES_PER_POINT = 1
# Rows (vertices or pixels) per parallel task where a task needs a scratch buffer.
_BLOCK = 256
# A run of blur axes is swept at once when the vertex rows the sweep keeps live fit in
# the (per-core) L2 cache; see `_blur_sweep`.
_SWEEP_WINDOW_BYTES = 1 << 20
# Pixels ahead whose vertex rows the splat and slice prefetch (measured: 4 to 12 do
# about as well).
_AHEAD = 4


def _compiled(**options):
    """numba.njit with the on-disk cache, or without it where no cache directory is
    writable (numba refuses to cache then rather than falling back)."""
    def wrap(func):
        try:
            return numba.njit(cache=True, **options)(func)
        except RuntimeError:
            return numba.njit(**options)(func)
    return wrap


_jit = _compiled()
_pjit = _compiled(parallel=True)


@dataclasses.dataclass
class Lattice:
    """A permutohedral lattice over N points with features of dimension d.

    Attributes:
        offsets: (N, d+1) int32, the vertex id of each point's r-th simplex corner.
        weights: (N, d+1) float32, the barycentric weights (each row sums to 1).
        neighbours: (d+1, 2, M) int32, for blur axis j the vertex ids of the neighbours
            n1 and n2; `M` (one past the last vertex) means "not a vertex".
        keys: (M, d) int32, the vertex coordinates (the first d of d+1).
    """

    offsets: np.ndarray
    weights: np.ndarray
    neighbours: np.ndarray
    keys: np.ndarray

    @property
    def n_points(self) -> int:
        return self.offsets.shape[0]

    @property
    def dim(self) -> int:
        return self.offsets.shape[1] - 1

    @property
    def n_vertices(self) -> int:
        return self.keys.shape[0]

    @property
    def alpha(self) -> float:
        return float(alpha(self.dim))

    def filter(self, values: np.ndarray) -> np.ndarray:
        """K·values for values (N, C): splat, blur axes 0..d, slice with α (plain NumPy).

        The straightforward reference form of the filter; `dense_crf_cpu` uses a faster
        equivalent. Returns float32 (N, C).
        """
        values = np.asarray(values, dtype=np.float32).reshape(self.n_points, -1)
        n_vertices, channels = self.n_vertices, values.shape[1]
        grid = np.zeros((n_vertices + 1, channels), np.float32)  # last row: missing neighbour
        for r in range(self.dim + 1):
            np.add.at(grid, self.offsets[:, r], self.weights[:, r, None] * values)
        for axis in range(self.dim + 1):
            n1, n2 = self.neighbours[axis]
            new = np.zeros_like(grid)
            new[:n_vertices] = grid[:n_vertices] + np.float32(0.5) * (grid[n1] + grid[n2])
            grid = new
        out = np.zeros((self.n_points, channels), np.float32)
        for r in range(self.dim + 1):
            out += self.weights[:, r, None] * grid[self.offsets[:, r]]
        return out * np.float32(self.alpha)


def kernel_features(image: np.ndarray, params: "CRFParams") -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian (N, 2) and bilateral (N, 5) float32 features of an (H, W, 3) uint8 image."""
    return gauss_features(image, params), bilateral_features(image, params)


def gauss_features(image: np.ndarray, params: "CRFParams") -> np.ndarray:
    """The Gaussian kernel's float32 features (N, 2): x / pos_xy_std, y / pos_xy_std."""
    return _positions(*image.shape[:2], params.pos_xy_std)


def bilateral_features(image: np.ndarray, params: "CRFParams") -> np.ndarray:
    """The bilateral kernel's float32 features (N, 5): x, y over bi_xy_std, r, g, b over
    bi_rgb_std."""
    height, width = image.shape[:2]
    bilateral = np.empty((height * width, 5), np.float32)
    bilateral[:, :2] = _positions(height, width, params.bi_xy_std)
    bilateral[:, 2:] = image.reshape(-1, 3).astype(np.float32) / float32(params.bi_rgb_std)
    return bilateral


def _positions(height: int, width: int, std: float) -> np.ndarray:
    """(x / std, y / std) per pixel, float32 (N, 2), the division in float32 as pydensecrf."""
    std32 = float32(std)
    feats = np.empty((height, width, 2), np.float32)
    feats[..., 0] = (np.arange(width, dtype=np.float32) / std32)[None, :]
    feats[..., 1] = (np.arange(height, dtype=np.float32) / std32)[:, None]
    return feats.reshape(-1, 2)


def build_lattice(features: np.ndarray, *, block: int = 4) -> Lattice:
    """Build the permutohedral lattice of float32 features (N, d) exactly as pydensecrf does.

    The set of vertices, each point's corners and weights, and the blur neighbourhoods
    are pydensecrf's; only the vertex ids differ: here they follow the order of
    `_vertex_coding` (by the y, then x feature), so the blur's neighbours are read in
    increasing order and pixels near each other use vertices near each other.

    `block`: pydensecrf's SSE build handles points in blocks of 4 and fills the unused
    lanes of the last block with all-zero features, whose simplex corners it inserts into
    the lattice too. So when N is not a multiple of 4 the lattice also holds the d+1
    corners of the origin: no point splats onto them or reads them, but they exist, so
    the blur passes values through them (it changes results near x = y = 0 in dark
    regions). With block=1 no such vertices are added.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    n_points, d = features.shape
    if n_points % block:  # one zero row stands for all padding lanes (same corners)
        features = np.concatenate([features, np.zeros((1, d), np.float32)])
    n = features.shape[0]
    scale = scale_factors(d)
    coding, constant, bits = _vertex_coding(features, scale)
    # Codes of one word (any photo with sensible σ): distinct corners through a hash
    # table. Wider ones (tiny σ) are rare: all corners' codes are sorted at once.
    packed = coding.shape[0] == 1

    offsets = np.empty((n_points, d + 1), np.int32)  # the padding row's corners are not kept
    weights = np.empty((n, d + 1), np.float32)
    chunk = min(_CHUNK_PIXELS, n)
    if packed:
        capacity = max(16, _VERTICES_PER_POINT * n)
        table = _new_table(1 << (2 * capacity - 1).bit_length())
        codes = np.empty(capacity, np.uint64)
        keys = np.empty((capacity, d), np.int32)
        n_vertices = 0
        last = np.full((2, d + 1), _EMPTY, np.uint64)  # see _insert_corners
        corner_codes = np.empty((chunk, d + 1, 1), np.uint64)
    else:  # every corner's code, sorted below (memory: 8·w·(d+1) bytes per point)
        corner_codes = np.empty((n, d + 1, coding.shape[0]), np.uint64)
        rem0_all = np.empty((n, d + 1), np.int32)
        rank_all = np.empty((n, d + 1), np.int32)
    rem0 = np.empty((chunk, d + 1), np.int32)
    rank = np.empty((chunk, d + 1), np.int32)
    elevated = np.empty((chunk, d + 1), np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        _simplices(features[start:stop], scale, elevated, rem0, rank, weights[start:stop])
        if packed:
            _corner_codes(rem0[: stop - start], rank[: stop - start], coding, constant,
                          corner_codes[: stop - start])
            p = 0
            while True:
                p, n_vertices = _insert_corners(
                    corner_codes[: stop - start, :, 0], rem0, rank, start, p, offsets,
                    table, codes, keys, n_vertices, last)
                if p == stop - start:
                    break
                if n_vertices + d + 1 > codes.size:
                    codes = np.concatenate([codes, np.empty_like(codes)])
                    keys = np.concatenate([keys, np.empty_like(keys)])
                if 2 * (n_vertices + d + 1) > len(table):
                    table = _rehash(codes, n_vertices, 2 * len(table))
        else:
            rem0_all[start:stop] = rem0[: stop - start]
            rank_all[start:stop] = rank[: stop - start]
            _corner_codes(rem0[: stop - start], rank[: stop - start], coding, constant,
                          corner_codes[start:stop])

    if packed:
        order = _argsort_codes(codes[:n_vertices], bits)
        rows = codes[order][:, None]  # (M, 1)
        keys = keys[order]
        _renumber(offsets, order)
    else:
        rows, first, inverse = np.unique(corner_codes.reshape(-1, coding.shape[0]), axis=0,
                                         return_index=True, return_inverse=True)
        offsets[:] = inverse.reshape(n, d + 1)[:n_points]
        keys = _corner_keys(rem0_all, rank_all, first)
    neighbours = _walk_neighbours(np.ascontiguousarray(rows), _neighbour_steps(coding))
    return Lattice(offsets, weights[:n_points].copy() if n != n_points else weights,
                   neighbours, keys)


# Vertex codes are compared as unsigned 64-bit integers below 2^62 (room for the empty
# marker of the hash table).
_CODE_BITS = 62
_EMPTY = np.uint64(2**64 - 1)


def _order_functionals(d: int) -> np.ndarray:
    """(d, d) int64 rows A: vertices are ordered by A·key, compared row by row.

    Any such order is kept by translations, so the blur neighbours (key + a fixed step)
    of vertices in increasing order are themselves in increasing order. For the 2-D image
    kernels the first rows pick out the y and the x feature: k0 + k1 - 2·k2 ∝ y and
    k0 - k1 ∝ x (for d = 2, k2 = -(k0 + k1) is implied and the first row is k0 + k1); the
    other rows are k2, k3, ..., which makes A invertible (distinct keys, distinct codes).
    """
    a = np.eye(d, dtype=np.int64)
    if d >= 2:
        a[:2] = 0
        a[0, :2] = 1
        if d >= 3:
            a[0, 2] = -2
        a[1, :2] = (1, -1)
    return a


def _vertex_coding(features: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Linear integer codes for the keys of every vertex the lattice (and its blur) can reach.

    Each field A_f·key of `_order_functionals`, shifted to start at 0, gets the bits its
    range over these features needs (the range of the elevated features plus margins for
    the rounding, the ±(d+1) correction, the corner offsets and a blur step); the fields
    are packed from the most significant end into as few words of `_CODE_BITS` as they
    fit. Word w of a key's code is coding[w]·key + constant[w] in wrapping uint64
    arithmetic; codes compare (word by word) like the field vectors, and a blur
    neighbour's code is the code plus a fixed step per word. Returns coding (w, d) uint64,
    constant (w,) uint64 and the number of bits word 0 uses.
    """
    n, d = features.shape
    a = _order_functionals(d)
    elevation = np.zeros((d + 1, d))  # elevated = elevation @ feature, before rounding
    for k in range(d):
        elevation[: k + 1, k] = scale[k]
        elevation[k + 1, k] = -(k + 1) * float(scale[k])
    g = a @ elevation[:d]  # (d, d): the fields as linear functions of the features
    # Column by column: NumPy's axis-0 reductions of a narrow array are slow.
    fmin = np.array([features[:, k].min() if n else 0.0 for k in range(d)], np.float64)
    fmax = np.array([features[:, k].max() if n else 0.0 for k in range(d)], np.float64)
    low = np.minimum(g * fmin, g * fmax).sum(axis=1)
    high = np.maximum(g * fmin, g * fmax).sum(axis=1)
    margin = 4 * (d + 1) * np.abs(a).sum(axis=1) + 2
    low = np.floor(low).astype(np.int64) - margin
    high = np.ceil(high).astype(np.int64) + margin
    bits = [int(h - lo).bit_length() for lo, h in zip(low, high)]
    if max(bits) > _CODE_BITS:
        raise ValueError("lattice coordinates out of range")
    words: list[list[int]] = [[]]
    used = 0
    for f, b in enumerate(bits):
        if used + b > _CODE_BITS:
            words.append([])
            used = 0
        words[-1].append(f)
        used += b
    mask = (1 << 64) - 1
    coding = np.zeros((len(words), d), np.uint64)
    constant = np.zeros(len(words), np.uint64)
    for w, fields in enumerate(words):
        shift = 0
        for f in reversed(fields):
            for i in range(d):
                coding[w, i] = (int(coding[w, i]) + (int(a[f, i]) << shift)) & mask
            constant[w] = (int(constant[w]) - (int(low[f]) << shift)) & mask
            shift += bits[f]
    return coding, constant, sum(bits[f] for f in words[0])


def _neighbour_steps(coding: np.ndarray) -> np.ndarray:
    """(d+1, w) uint64: the code step from a vertex to its blur neighbour n1 along each
    axis (key - 1 on every coordinate but + d on the axis; axis d: all - 1)."""
    w, d = coding.shape
    deltas = np.full((d + 1, d), -1, np.int64)
    for axis in range(d):
        deltas[axis, axis] = d
    return (deltas.view(np.uint64)[:, None, :] * coding[None]).sum(axis=2, dtype=np.uint64)


class _KernelOperator:
    """K̃ for one kernel, scaled by the kernel weight, as splat / blur / slice loops.

    Splat and slice both walk the pixels' d+1 corners (`offsets`), the splat scattering
    in pixel order like pydensecrf (consecutive pixels mostly share vertices, so this
    stays in cache where a gather per vertex would not). The normalization n is folded
    into the splat weights (symmetric) and, with α and the kernel weight, into the slice
    weights. Only the floating-point rounding order differs from `Lattice.filter`.
    """

    def __init__(self, lattice: Lattice, weight: float, normalization: str):
        n = lattice.n_points
        self.n_vertices = lattice.n_vertices
        self.alpha = np.float32(lattice.alpha)
        self.offsets = np.ascontiguousarray(lattice.offsets, dtype=np.int32)  # (N, d+1)
        self.neighbours = np.ascontiguousarray(lattice.neighbours, dtype=np.int32)  # (d+1, 2, M)
        self.reach = _axis_reach(self.neighbours)  # (d+1,)
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None
        # K·1 through the plain filter (barycentric weights, α); n and the kernel weight
        # are then folded into the weights (`_fold`).
        self.bary = np.ascontiguousarray(lattice.weights, dtype=np.float32)  # (N, d+1)
        self.splat_weights = self.bary
        self.slice_weights = self.bary * self.alpha
        norm = np.zeros((n, 1), np.float32)
        self.add_message(norm, np.ones((n, 1), np.float32))
        self.k1 = norm[:, 0]  # (N,) K·1
        self._fold(weight, normalization)

    def reweighted(self, weight: float, normalization: str) -> "_KernelOperator":
        """This kernel with another weight and normalization: the lattice, K·1 and the
        vertex buffers are shared (one operator of the two in use at a time), only the
        folded splat and slice weights are new. The same arithmetic as a fresh operator,
        so the same result bit for bit."""
        other = copy.copy(self)
        other._fold(weight, normalization)
        return other

    def _fold(self, weight: float, normalization: str) -> None:
        self.splat_weights = np.empty_like(self.bary)
        self.slice_weights = self.bary * self.alpha
        _fold_normalization(self.bary, self.k1, normalization == "symmetric", np.float32(weight),
                            self.splat_weights, self.slice_weights)

    def buffers(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """The two (M+1, C) vertex buffers (row M stays 0: the missing neighbour)."""
        if self._buffers is None or self._buffers[0].shape[1] != channels:
            self._buffers = (np.zeros((self.n_vertices + 1, channels), np.float32),
                             np.zeros((self.n_vertices + 1, channels), np.float32))
        return self._buffers

    def add_message(self, out: np.ndarray, q: np.ndarray) -> None:
        """out += K̃(q) for q (N, C), `out` (N, C) float32 updated in place."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        grid, scratch = self.buffers(q.shape[1])
        _splat(self.offsets, self.splat_weights, q, grid)
        _slice_add(self.offsets, self.slice_weights, self.blur(grid, scratch), out)

    def blur(self, grid: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """Blur the (M+1, C) vertex values in `grid` along axes 0..d (`scratch`: the second
        buffer); returns the buffer holding the result. On one thread, runs of axes whose
        neighbours are near in memory (`blur_groups`) go through in one sweep
        (`_blur_sweep`); otherwise each axis is a parallel pass (a sweep is sequential,
        and measured slower than two threads' passes). The values are the same."""
        src, dst = grid, scratch
        sweep = numba.get_num_threads() == 1
        for first, stop, reach in self.blur_groups(grid.shape[1] * grid.itemsize):
            if sweep and stop - first > 1:
                result = _blur_sweep(self.neighbours, src, dst, first, stop, reach)
            else:
                result = _blur(self.neighbours, src, dst, first, stop)
            src, dst = (result, dst if result is src else src)
        return src

    def blur_groups(self, row_bytes: int) -> list[tuple[int, int, int]]:
        """Consecutive blur axes [first, stop) with the largest neighbour distance `reach`
        among them, grouped while the vertex rows a sweep keeps live (axes · reach rows)
        fit in `_SWEEP_WINDOW_BYTES`; other axes stand alone."""
        groups: list[tuple[int, int, int]] = []
        for axis, reach in enumerate(int(r) for r in self.reach):
            if groups:
                first, stop, widest = groups[-1]
                widest = max(widest, reach)
                if (stop + 1 - first) * widest * row_bytes <= _SWEEP_WINDOW_BYTES:
                    groups[-1] = (first, stop + 1, widest)
                    continue
            groups.append((axis, axis + 1, reach))
        return groups


def dense_crf_cpu(image: np.ndarray, probs: np.ndarray, params: "CRFParams", *,
                  threads: int | None = None) -> np.ndarray:
    """Mean-field inference of the fully connected CRF, matching pydensecrf.

    Args:
        image: RGB uint8 (H, W, 3).
        probs: class probabilities float32 (C, H, W) (e.g. a softmax).
        params: kernel parameters, iterations and normalization.
        threads: worker threads (at most `NUMBA_NUM_THREADS`); None keeps numba's current
            setting. The result is the same for any thread count. torch's thread count
            (`torch.get_num_threads()`) is the same after the call as before it.

    Returns:
        Refined probabilities, float32 (C, H, W), summing to 1 over C.

    Raises:
        DeeplabError: a size or parameters the lattice cannot take (`check_size`), before
            anything is allocated.
    """
    return next(dense_crf_cpu_each(image, probs, [params], threads=threads))


def dense_crf_cpu_each(image: np.ndarray, probs: np.ndarray, settings: Iterable["CRFParams"], *,
                       threads: int | None = None) -> Iterator[np.ndarray]:
    """`dense_crf_cpu` of one image under each of `settings` in turn, yielding each result
    (float32 (C, H, W)) as it is done; bit for bit what `dense_crf_cpu` gives for that setting.

    The unary and Q0 are worked out once, and a lattice with its K·1 is kept while the next
    setting has the same geometry: the Gaussian one while pos_xy_std stays, the bilateral one
    while bi_xy_std and bi_rgb_std do. Weights, normalization and iterations change nothing
    that is built, so settings that differ only there cost their iterations alone; order the
    settings by `lattice_key` to build each lattice once.

    Raises:
        DeeplabError: a size or parameters the lattice cannot take (`check_size`), for any
            setting, before anything is computed.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    probs = np.asarray(probs, dtype=np.float32)
    _, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    settings = list(settings)
    for params in settings:
        check_size(height, width, params)
    unary = None
    kernels: dict[str, tuple[tuple, _KernelOperator]] = {}  # kernel -> (geometry, operator)
    if settings and not _warm:
        _warm_up()
    for k, params in enumerate(settings):
        with _compute(threads):
            if unary is None:
                unary = _Unary(probs)
            # the last setting (the only one, for dense_crf_cpu) iterates on Q0 itself
            out = _mean_field(image, unary, params, kernels, keep_q0=k + 1 < len(settings))
        yield out


# Whether this process has run the compiled loops once (`_warm_up`).
_warm = False


def _warm_up() -> None:
    """Run every compiled loop once on tiny inputs, so numba compiles them (about 10 s on a
    new install) or loads them from its cache (0.2 s), with Ctrl-C held back until that
    is done (`_sigint_held`). numba compiles inside llvmlite callbacks, which drop a
    KeyboardInterrupt raised there: the interrupt was lost and the run failed later with
    "no compiled object yet". After this the real run stays interruptible, whatever
    thread count or σ it has: the CRF runs on all of numba's threads and on one (where the
    blur sweeps), and a lattice is built from codes wider than one word (tiny σ)."""
    global _warm
    from deeplab_cli.crf.params import CRFParams

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    probs = rng.random((3, 5, 7), dtype=np.float32) + np.float32(0.1)
    probs /= probs.sum(axis=0)
    with _sigint_held(), _compute(None):
        for count in sorted({numba.config.NUMBA_NUM_THREADS, 1}, reverse=True):
            numba.set_num_threads(count)
            _mean_field(image, _Unary(probs), CRFParams(iterations=1), {})
        build_lattice(np.array([[0.0] * 5, [1000.0] * 5], np.float32))
        _warm = True


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT recorded instead of raised while the block runs, then raised as the
    KeyboardInterrupt it was once the block is done. Only in the main thread (the only one
    that may set handlers, and the one Python interrupts) and only over Python's default
    handler: a caller's own handler is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    seen: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if seen:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _compute(threads: int | None) -> Iterator[None]:
    """Around compiled work: numba's thread count set to `threads` (None: kept) and put
    back after, torch's thread count left as the caller had it, and a Ctrl-C that lands
    inside a compiled loop raised as the KeyboardInterrupt it is."""
    torch_threads = _torch_threads()  # before numba's pool starts (get_num_threads starts it)
    try:
        previous = numba.get_num_threads()
        if threads is not None:
            numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        except SystemError as exc:
            # numba hands the interrupt back as a SystemError caused by the KeyboardInterrupt.
            interrupt = _interrupt_behind(exc)
            if interrupt is None:
                raise
            raise interrupt from None
        finally:
            numba.set_num_threads(previous)
    finally:
        _restore_torch_threads(torch_threads)


def _torch_threads() -> int | None:
    """torch's thread count for the calling thread, when the caller has imported torch.

    numba's OpenMP threading layer, started by the first parallel call of a thread, sets
    that thread's OpenMP thread count, and torch shares that OpenMP runtime (one libgomp):
    a caller's torch.set_num_threads(1) would silently become NUMBA_NUM_THREADS. So the
    count is read before each CPU CRF and put back after (`_restore_torch_threads`).
    numba's 'workqueue' layer would leave OpenMP alone but aborts when several threads
    run the CRF at once, as the pipeline does.
    """
    torch = sys.modules.get("torch")  # never imported here: a NumPy caller needs no torch
    get = getattr(torch, "get_num_threads", None)  # None: blocked (sys.modules['torch'] = None)
    return get() if callable(get) else None


def _restore_torch_threads(count: int | None) -> None:
    """Set torch's thread count back to `count` (from `_torch_threads`) if it changed."""
    if count is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt among `exc`'s causes and contexts, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class _Unary:
    """What every setting of one image starts from: -U (N, C) and Q0 = softmax(-U) (N, C'),
    C' = C rounded up to whole 8-lane vectors (pad columns 0, which every step keeps)."""

    def __init__(self, probs: np.ndarray):
        n_labels, height, width = probs.shape
        n = height * width
        self.shape = probs.shape
        clipped = np.clip(probs.reshape(n_labels, n), np.float32(1e-5), np.float32(1.0))  # (C, N)
        self.lanes = -(-n_labels // 8) * 8
        self.neg_unary = np.empty((n, n_labels), np.float32)  # (N, C), -U
        np.log(clipped.T, out=self.neg_unary)
        self.q0 = np.empty((n, self.lanes), np.float32)  # (N, C')
        clipped /= clipped.sum(axis=0)
        self.q0[:, :n_labels] = clipped.T  # softmax(-U) = softmax(log p) = p / Σp
        self.q0[:, n_labels:] = 0


def _operator(kernels: dict, name: str, geometry: tuple, features, weight: float,
              normalization: str) -> "_KernelOperator":
    """The kernel `name`'s operator: the kept one reweighted when its geometry matches,
    else one on a new lattice from `features()` (which then replaces it in `kernels`)."""
    kept = kernels.get(name)
    if kept is not None and kept[0] == geometry:
        return kept[1].reweighted(weight, normalization)
    kernels.pop(name, None)  # the old lattice's memory goes before the new one is built
    op = _KernelOperator(build_lattice(features()), weight, normalization)
    kernels[name] = (geometry, op)
    return op


def _mean_field(image: np.ndarray, unary: _Unary, params: "CRFParams", kernels: dict, *,
                keep_q0: bool = False) -> np.ndarray:
    """Q after params.iterations, from `unary`, with the lattices kept in `kernels`
    (`_operator`); `keep_q0`: iterate on a copy, leaving unary.q0 for a later setting."""
    n_labels, height, width = unary.shape
    if params.iterations == 0:
        return np.ascontiguousarray(unary.q0[:, :n_labels].T).reshape(n_labels, height, width)
    q = unary.q0.copy() if keep_q0 else unary.q0
    geometry = lattice_key(params)
    first = _operator(kernels, "gauss", geometry[:1], lambda: gauss_features(image, params), params.pos_w,
                      params.normalization)
    second = _operator(kernels, "bilateral", geometry[1:3], lambda: bilateral_features(image, params),
                       params.bi_w, params.normalization)
    buffers1, buffers2 = first.buffers(unary.lanes), second.buffers(unary.lanes)
    planes = np.empty((n_labels, height * width), np.float32)  # the result, (C, N)
    for step in range(params.iterations):
        _splat_both(q, first.offsets, first.splat_weights, buffers1[0],
                    second.offsets, second.splat_weights, buffers2[0])
        grid1 = first.blur(*buffers1)
        grid2 = second.blur(*buffers2)
        last = step == params.iterations - 1
        _slice_softmax(unary.neg_unary, first.offsets, first.slice_weights, grid1,
                       second.offsets, second.slice_weights, grid2, q,
                       planes if last else planes[:0])
    return planes.reshape(n_labels, height, width)


# -- compiled loops ------------------------------------------------------------------------
# Each loop says what one parallel task does; tasks write disjoint rows.

@_pjit
def _simplices(features, scale, elevated, rem0, rank, weights):
    """Point p of features (n, d): rem0[p] and rank[p] (d+1) int32 after the ±(d+1)
    correction, and its barycentric weights[p] (d+1), in pydensecrf's float32 order.
    elevated (at least n, d+1) is scratch."""
    n, d = features.shape
    down = np.float32(1.0) / np.float32(d + 1)
    up = np.float32(d + 1)
    for p in numba.prange(n):
        e = elevated[p]
        sm = np.float32(0.0)
        for j in range(d, 0, -1):
            cf = features[p, j - 1] * scale[j - 1]
            e[j] = sm - np.float32(j) * cf
            sm += cf
        e[0] = sm
        total = 0
        for i in range(d + 1):
            v = np.rint(e[i] * down)
            rem0[p, i] = np.int32(v * up)  # an exact integer in float32
            rank[p, i] = 0
            total += np.int32(v)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if e[i] - np.float32(rem0[p, i]) < e[j] - np.float32(rem0[p, j]):
                    rank[p, i] += 1
                else:
                    rank[p, j] += 1
        for i in range(d + 1):
            rank[p, i] += total
            if rank[p, i] < 0:
                rank[p, i] += d + 1
                rem0[p, i] += d + 1
            elif rank[p, i] > d:
                rank[p, i] -= d + 1
                rem0[p, i] -= d + 1
        w = weights[p]
        w[:] = 0
        last = np.float32(0.0)  # slot d+1
        for i in range(d + 1):
            u = (e[i] - np.float32(rem0[p, i])) * down
            slot = d - rank[p, i]
            w[slot] += u
            if slot < d:
                w[slot + 1] -= u
            else:
                last -= u
        w[0] += np.float32(1.0) + last


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@_jit
def _home(code, mask):
    """The first slot to probe for `code` in a hash table of mask + 1 slots."""
    h = (code ^ (code >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return (h ^ (h >> np.uint64(31))) & mask


@_jit
def _slot(table, code):
    """The slot of the hash table holding `code`, or the free slot where it belongs
    (linear probing). A slot is (code, vertex id), free: code `_EMPTY`; the id sits
    next to the code so that a lookup touches one cache line."""
    mask = np.uint64(table.shape[0] - 1)
    slot = _home(code, mask)
    while table[slot, 0] != code and table[slot, 0] != _EMPTY:
        slot = (slot + np.uint64(1)) & mask
    return slot


@_jit
def _insert_corners(corner_codes, rem0, rank, start, p, offsets, table, codes, keys,
                    n_vertices, last):
    """Give each corner of the chunk's points p, p+1, ... (point start + p of the image;
    corner_codes (n, d+1) their codes) a vertex id, adding new vertices (their codes and
    keys by id) in order of first use. Points at or past len(offsets) (the padding) add
    their vertices without recording them. Stops before a point when the hash table (see
    `_slot`) might get more than half full or the vertex store full; returns the next
    point and the vertex count. `last` (2, d+1) carries the previous point's codes and
    ids across calls."""
    n, corners = corner_codes.shape
    d = corners - 1
    mask = np.uint64(table.shape[0] - 1)
    limit = min(codes.size, table.shape[0] // 2) - corners
    ids = np.empty(corners, np.int64)
    while p < n and n_vertices <= limit:
        i = start + p
        # The lookups miss the cache and depend on each other through the vertex count,
        # so fetch the slots of a few points on ahead of time.
        if p + _AHEAD < n:
            for r in range(corners):
                _prefetch(table, _home(corner_codes[p + _AHEAD, r], mask))
        for r in range(corners):
            code = corner_codes[p, r]
            # Neighbouring points share most corners, and comparing with the previous
            # point's is cheaper than a lookup.
            v = -1
            for j in range(corners):
                if last[0, j] == code:
                    v = np.int64(last[1, j])
            if v < 0:
                slot = _slot(table, code)
                if table[slot, 0] == code:
                    v = np.int64(table[slot, 1])
                else:
                    v = n_vertices
                    n_vertices += 1
                    table[slot, 0] = code
                    table[slot, 1] = v
                    codes[v] = code
                    for c in range(d):
                        keys[v, c] = _corner_key(rem0, rank, p, r, c)
            ids[r] = v
            if i < offsets.shape[0]:
                offsets[i, r] = v
        for r in range(corners):
            last[0, r] = corner_codes[p, r]
            last[1, r] = ids[r]
        p += 1
    return p, n_vertices


@_jit
def _new_table(size):
    """An empty hash table of `size` slots (a power of 2), see `_slot`."""
    table = np.empty((size, 2), np.uint64)
    table[:, 0] = _EMPTY
    return table


@_jit
def _rehash(codes, n_vertices, size):
    table = _new_table(size)
    for v in range(n_vertices):
        slot = _slot(table, codes[v])
        table[slot, 0] = codes[v]
        table[slot, 1] = v
    return table


@_pjit
def _corner_codes(rem0, rank, coding, constant, out):
    """out[p, r] (w,) = the code of point p's corner r. One task: a point."""
    d = rem0.shape[1] - 1
    for p in numba.prange(rem0.shape[0]):
        for r in range(d + 1):
            for w in range(coding.shape[0]):
                code = constant[w]
                for c in range(d):
                    code += coding[w, c] * np.uint64(np.int64(_corner_key(rem0, rank, p, r, c)))
                out[p, r, w] = code


@_jit
def _corner_keys(rem0, rank, corners):
    """(len(corners), d) int32 keys of the corners numbered p·(d+1) + r."""
    d = rem0.shape[1] - 1
    keys = np.empty((corners.size, d), np.int32)
    for j in range(corners.size):
        p, r = corners[j] // (d + 1), corners[j] % (d + 1)
        for c in range(d):
            keys[j, c] = _corner_key(rem0, rank, p, r, c)
    return keys


@_jit
def _corner_key(rem0, rank, p, r, c):
    """Coordinate c of the key of point p's simplex corner r, from the point's corrected
    rem0 and rank (d+1 each): rem0 + r, less d+1 where rank > d - r."""
    d = rem0.shape[1] - 1
    return rem0[p, c] + r - (d + 1 if rank[p, c] > d - r else 0)


@_jit
def _argsort_codes(codes, bits):
    """The permutation sorting uint64 `codes` below 2^bits (LSD radix sort, 11-bit digits)."""
    m = codes.size
    order = np.arange(m).astype(np.int32)
    current = codes.copy()
    order2 = np.empty_like(order)
    current2 = np.empty_like(current)
    for shift in range(0, bits, 11):
        count = np.zeros(2049, np.int64)
        for i in range(m):
            count[((current[i] >> np.uint64(shift)) & np.uint64(2047)) + np.uint64(1)] += 1
        for b in range(2048):
            count[b + 1] += count[b]
        for i in range(m):
            digit = (current[i] >> np.uint64(shift)) & np.uint64(2047)
            at = count[digit]
            count[digit] += 1
            current2[at] = current[i]
            order2[at] = order[i]
        current, current2 = current2, current
        order, order2 = order2, order
    return order


@_pjit
def _renumber(offsets, order):
    """offsets[p, r] = the position of offsets[p, r] in `order`. One task: a point."""
    position = np.empty(order.size, np.int32)
    for j in range(order.size):
        position[order[j]] = j
    for p in numba.prange(offsets.shape[0]):
        for r in range(offsets.shape[1]):
            offsets[p, r] = position[offsets[p, r]]


@_jit
def _less(a, b):
    for c in range(a.size):
        if a[c] != b[c]:
            return a[c] < b[c]
    return False


@_pjit
def _walk_neighbours(rows, steps):
    """(d+1, 2, M) blur neighbours n1, n2 of every vertex along each axis (M: none), for
    vertices whose codes `rows` (M, w) increase. The code of n1 is the code plus
    steps[axis], so it increases with the vertex: one merge-like walk per axis finds
    them all. n2 is the inverse of n1 (n2(n1(v)) = v). One task: an axis."""
    m, w = rows.shape
    out = np.full((steps.shape[0], 2, m), m, np.int32)
    for axis in numba.prange(steps.shape[0]):
        target = np.empty(w, np.uint64)
        u = 0
        for v in range(m):
            if w == 1:  # the usual single-word codes: plain integer comparisons
                code = rows[v, 0] + steps[axis, 0]
                while u < m and rows[u, 0] < code:
                    u += 1
                if u == m:
                    break
                found = rows[u, 0] == code
            else:
                for c in range(w):
                    target[c] = rows[v, c] + steps[axis, c]
                while u < m and _less(rows[u], target):
                    u += 1
                if u == m:
                    break
                found = not _less(target, rows[u])
            if found:
                out[axis, 0, v] = u
                out[axis, 1, u] = v
    return out


@_jit
def _splat(offsets, weights, values, grid):
    """grid[v] = Σ weights[p, r]·values[p] over the (p, r) with offsets[p, r] = v, summed
    in pixel order, for v < M (row M is left alone). Prefetches the rows a few pixels on."""
    grid[:-1] = 0
    n, channels = values.shape
    for p in range(n):
        if p + _AHEAD < n:
            for r in range(offsets.shape[1]):
                _prefetch(grid, offsets[p + _AHEAD, r])
        src = values[p]
        for r in range(offsets.shape[1]):
            w = weights[p, r]
            dst = grid[offsets[p, r]]
            for k in range(channels):
                dst[k] += w * src[k]


@_pjit
def _splat_both(values, offsets1, weights1, grid1, offsets2, weights2, grid2):
    """`_splat` for two kernels; one task: a kernel."""
    for task in numba.prange(2):
        if task == 0:
            _splat(offsets1, weights1, values, grid1)
        else:
            _splat(offsets2, weights2, values, grid2)


@_pjit
def _blur(neighbours, grid, scratch, first, stop):
    """Blur (M+1, C) vertex values along axes first..stop-1, Jacobi steps between grid
    and scratch (row M, the missing neighbour, stays 0); returns the buffer holding the
    result. One task: a vertex."""
    m = grid.shape[0] - 1
    channels = grid.shape[1]
    half = np.float32(0.5)
    src, dst = grid, scratch
    for axis in range(first, stop):
        for v in numba.prange(m):
            old = src[v]
            n1 = src[neighbours[axis, 0, v]]
            n2 = src[neighbours[axis, 1, v]]
            new = dst[v]
            for k in range(channels):
                new[k] = old[k] + half * (n1[k] + n2[k])
        src, dst = dst, src
    return src


@_jit
def _blur_sweep(neighbours, grid, scratch, first, stop, reach):
    """`_blur` in one sequential sweep through the vertices: at step t, axis first + j
    blurs vertex t - j·reach, where `reach` bounds |neighbour id - vertex id| along these
    axes. So every value an axis reads has already been written by the axis before, and
    (alternating between the two buffers) none has yet been overwritten by the axis
    after: the same Jacobi values as separate passes, but read while they are still in
    cache when `reach` is small."""
    m = grid.shape[0] - 1
    channels = grid.shape[1]
    half = np.float32(0.5)
    axes = stop - first
    for t in range(m + (axes - 1) * reach):
        for j in range(axes):
            v = t - j * reach
            if v < 0 or v >= m:
                continue
            src, dst = (grid, scratch) if j % 2 == 0 else (scratch, grid)
            old = src[v]
            n1 = src[neighbours[first + j, 0, v]]
            n2 = src[neighbours[first + j, 1, v]]
            new = dst[v]
            for k in range(channels):
                new[k] = old[k] + half * (n1[k] + n2[k])
    return grid if axes % 2 == 0 else scratch


@_jit
def _axis_reach(neighbours):
    """(d+1,) the largest |neighbour id - vertex id| along each blur axis (0 if none)."""
    m = neighbours.shape[2]
    reach = np.zeros(neighbours.shape[0], np.int64)
    for axis in range(neighbours.shape[0]):
        for side in range(2):
            for v in range(m):
                u = neighbours[axis, side, v]
                if u < m:
                    reach[axis] = max(reach[axis], abs(u - v))
    return reach


@_pjit
def _slice_add(offsets, weights, grid, out):
    """out[p] += Σ_r weights[p, r]·grid[offsets[p, r]]. One task: a block of pixels."""
    n, channels = out.shape
    for block in numba.prange((n + _BLOCK - 1) // _BLOCK):
        acc = np.empty(channels, np.float32)
        for p in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            for k in range(channels):
                acc[k] = 0
            _slice_into(acc, offsets, weights, grid, p)
            for k in range(channels):
                out[p, k] += acc[k]


@_jit
def _slice_into(acc, offsets, weights, grid, p):
    """acc += Σ_r weights[p, r]·grid[offsets[p, r]], prefetching the rows a few pixels on."""
    if p + _AHEAD < offsets.shape[0]:
        for r in range(offsets.shape[1]):
            _prefetch(grid, offsets[p + _AHEAD, r])
    for r in range(offsets.shape[1]):
        w = weights[p, r]
        src = grid[offsets[p, r]]
        for k in range(acc.size):
            acc[k] += w * src[k]


@_pjit
def _slice_softmax(neg_unary, offsets1, weights1, grid1, offsets2, weights2, grid2, q,
                   planes):
    """q[p, :C] = softmax(-U[p] + slice1[p] + slice2[p]) for the two kernels' sliced
    messages, -U (N, C), q (N, C' >= C); or, when `planes` (C, N) is not empty, planes[:, p]
    (the final result, transposed on the way). One task: a block of pixels."""
    n, channels = neg_unary.shape
    lanes = q.shape[1]
    for block in numba.prange((n + _BLOCK - 1) // _BLOCK):
        acc = np.empty(lanes, np.float32)
        out = np.empty(channels, np.float32)
        for p in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            for k in range(channels):
                acc[k] = neg_unary[p, k]
            for k in range(channels, lanes):
                acc[k] = 0
            _slice_into(acc, offsets1, weights1, grid1, p)
            _slice_into(acc, offsets2, weights2, grid2, p)
            if planes.size:
                _softmax(acc[:channels], out)
                for k in range(channels):
                    planes[k, p] = out[k]
            else:
                _softmax(acc[:channels], q[p, :channels])


@_pjit
def _fold_normalization(bary, norm, symmetric, weight, splat_weights, slice_weights):
    """Fold the normalization n of K·1 = `norm` (N,) and the kernel weight into the
    barycentric weights (N, d+1); `slice_weights` holds α·bary and is scaled in place.
    Symmetric: n = 1/sqrt(norm + 1e-20) on both sides; after: n = 1/(norm + 1e-20) on
    the slice side only (n in double, then float32, as pydensecrf). One task: a point."""
    for p in numba.prange(bary.shape[0]):
        total = np.float64(norm[p]) + 1e-20
        if symmetric:
            scale = np.float32(1.0 / np.sqrt(total))
            for r in range(bary.shape[1]):
                splat_weights[p, r] = bary[p, r] * scale
        else:
            scale = np.float32(1.0 / total)
            for r in range(bary.shape[1]):
                splat_weights[p, r] = bary[p, r]
        scale = scale * weight
        for r in range(bary.shape[1]):
            slice_weights[p, r] *= scale


@_jit
def _softmax(row, out):
    """out = softmax(row) for one pixel's labels."""
    top = _max(row)
    for k in range(row.size):
        out[k] = _exp(row[k] - top)
    scale = np.float32(1.0) / _sum(out)
    for k in range(row.size):
        out[k] *= scale


# The two reductions of a softmax, vectorized: a maximum does not depend on the order
# (no NaN gets here); the sum's order is fixed per compiled binary, so results stay
# deterministic, but it need not be left to right.
@_compiled(fastmath={"nnan", "nsz"})
def _max(row):
    top = row[0]
    for k in range(1, row.size):
        top = max(top, row[k])
    return top


@_compiled(fastmath={"reassoc", "nsz"})
def _sum(row):
    total = np.float32(0.0)
    for k in range(row.size):
        total += row[k]
    return total


@numba.extending.intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""
    if bits != numba.types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())

    return numba.types.float32(numba.types.int32), codegen


@numba.extending.intrinsic
def _prefetch(typingctx, rows, row):
    """Hint the CPU to fetch the first two cache lines of rows[row] (2-D float32, C order):
    a pixel's vertex rows are scattered, so fetching them a few pixels ahead hides the
    memory latency (`_AHEAD`)."""
    if not (isinstance(rows, numba.types.Array) and rows.ndim == 2 and rows.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], numba.types.intp)
        stride = builder.extract_value(array.strides, 0)
        byte = llvmlite.ir.IntType(8).as_pointer()
        start = builder.gep(builder.bitcast(array.data, byte), [builder.mul(index, stride)])
        i32 = llvmlite.ir.IntType(32)
        hint = llvmlite.ir.FunctionType(llvmlite.ir.VoidType(), [byte, i32, i32, i32])
        prefetch = numba.core.cgutils.get_or_insert_function(builder.module, hint,
                                                             "llvm.prefetch.p0i8")
        for line in (0, 64):  # read, keep in all cache levels, data
            address = builder.gep(start, [llvmlite.ir.Constant(llvmlite.ir.IntType(64), line)])
            builder.call(prefetch, [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return numba.types.void(rows, row), codegen


@_jit
def _exp(x):
    """exp(x) for float32 x <= 88 (within 2 ulp; exp(-87) for anything smaller). libm's expf
    is a scalar call; this vectorizes. Cody-Waite reduction x = n·ln2 + r, |r| <= ln2/2,
    then the Cephes polynomial for exp(r) and 2^n from its exponent bits."""
    x = max(x, np.float32(-87.0))
    big = np.float32(12582912.0)  # 1.5·2^23: adding and subtracting it rounds to an integer
    n = (x * np.float32(1.44269504) + big) - big
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _float_from_bits(np.int32((np.int64(n) + 127) << 23))
