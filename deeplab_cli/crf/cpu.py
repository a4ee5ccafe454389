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
time, then the corners go through an open-addressing hash table in point order, so
vertices are numbered by first use (for locality), and the blur neighbours are looked up
in parallel. Each mean-field iteration works on (N, C') and (M+1, C') row-major float32
buffers allocated once (C' = C rounded up to 8 lanes): the splat scatters in pixel order
as pydensecrf does (one task per kernel), the d+1 blur passes are Jacobi steps between
two buffers (parallel over vertices), and one pass over the pixels (parallel) slices
both kernels and takes the softmax. The normalization, α and the kernel weight are
folded into the splat and slice weights. Every output element is written by one thread
in a fixed order, so results do not depend on the thread count. `Lattice.filter` is the
plain staged NumPy form, kept as the reference.

Threads: numba's pool, `threads=` of `dense_crf_cpu`, else `NUMBA_NUM_THREADS` (default:
all cores). Compiled code is cached under `NUMBA_CACHE_DIR` if set, else next to this file,
else in the user's cache directory (~/.cache/numba); with none writable it is compiled in
every process. Compiling takes about 10 s (once per install); loading it about 0.2 s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import llvmlite.ir
import numba
import numba.extending
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from deeplab_cli.crf.params import CRFParams

# Points whose simplices are computed at once while building the lattice: bounds the
# temporaries (about 60 bytes per point) independently of the image size.
_CHUNK_PIXELS = 1 << 18
# Vertices room is first made for, per point (both grow as needed); the hash table has
# twice as many slots and doubles whenever it is half full.
_VERTICES_PER_POINT = 1
# Rows (vertices or pixels) per parallel task where a task needs a scratch buffer.
_BLOCK = 256


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
        return 1.0 / (1.0 + 2.0 ** -self.dim)

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
    height, width = image.shape[:2]
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)

    def positions(std: float) -> np.ndarray:
        std32 = np.float32(std)
        feats = np.empty((height, width, 2), np.float32)
        feats[..., 0] = (xs / std32)[None, :]
        feats[..., 1] = (ys / std32)[:, None]
        return feats.reshape(-1, 2)

    gauss = positions(params.pos_xy_std)
    bilateral = np.empty((height * width, 5), np.float32)
    bilateral[:, :2] = positions(params.bi_xy_std)
    bilateral[:, 2:] = image.reshape(-1, 3).astype(np.float32) / np.float32(params.bi_rgb_std)
    return gauss, bilateral


def _scale_factors(d: int) -> np.ndarray:
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], np.float32)


def build_lattice(features: np.ndarray, *, block: int = 4) -> Lattice:
    """Build the permutohedral lattice of float32 features (N, d) exactly as pydensecrf does.

    Vertex ids differ from pydensecrf's hash-table order (here: order of first use by
    point index, then corner index) but the set of vertices, each point's corners and
    weights, and the blur neighbourhoods are the same.

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
    scale = _scale_factors(d)

    offsets = np.empty((n_points, d + 1), np.int32)  # the padding row's corners are not kept
    weights = np.empty((n, d + 1), np.float32)
    capacity = max(16, _VERTICES_PER_POINT * n)
    table = np.full(1 << (2 * capacity - 1).bit_length(), -1, np.int64)
    keys = np.empty((capacity, d), np.int32)
    n_vertices = 0
    chunk = min(_CHUNK_PIXELS, n)
    rem0 = np.empty((chunk, d + 1), np.int32)
    rank = np.empty((chunk, d + 1), np.int32)
    elevated = np.empty((chunk, d + 1), np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        _simplices(features[start:stop], scale, elevated, rem0, rank, weights[start:stop])
        table, keys, n_vertices = _insert_corners(rem0[: stop - start], rank[: stop - start],
                                                  start, offsets, table, keys, n_vertices)
    keys = keys[:n_vertices].copy()
    neighbours = _find_neighbours(table, keys)
    return Lattice(offsets, weights[:n_points].copy() if n != n_points else weights,
                   neighbours, keys)


class _KernelOperator:
    """K̃ for one kernel, scaled by the kernel weight, as splat / blur / slice loops.

    Splat and slice both walk the pixels' d+1 corners (`offsets`), the splat scattering
    in pixel order like pydensecrf (consecutive pixels mostly share vertices, so this
    stays in cache where a gather per vertex would not). The normalization n is folded
    into the splat weights (symmetric) and, with α and the kernel weight, into the slice
    weights. Only the floating-point rounding order differs from `Lattice.filter`.
    """

    def __init__(self, lattice: Lattice, weight: float, normalization: str):
        n, m = lattice.n_points, lattice.n_vertices
        self.n_points, self.n_vertices = n, m
        self.offsets = np.ascontiguousarray(lattice.offsets, dtype=np.int32)  # (N, d+1)
        self.neighbours = np.ascontiguousarray(lattice.neighbours, dtype=np.int32)  # (d+1, 2, M)
        bary = np.ascontiguousarray(lattice.weights, dtype=np.float32)  # (N, d+1)
        self.splat_weights = bary
        self.slice_weights = bary * np.float32(lattice.alpha)
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None

        norm = np.zeros((n, 1), np.float32)
        self.add_message(norm, np.ones((n, 1), np.float32))  # K·1
        norm = norm[:, 0].astype(np.float64)
        if normalization == "symmetric":
            scale = (1.0 / np.sqrt(norm + 1e-20)).astype(np.float32)
            self.splat_weights = bary * scale[:, None]
        else:
            scale = (1.0 / (norm + 1e-20)).astype(np.float32)
        self.slice_weights *= (scale * np.float32(weight))[:, None]
        self._buffers = None

    def buffers(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """The two (M+1, C) vertex buffers (row M stays 0: the missing neighbour)."""
        if self._buffers is None or self._buffers[0].shape[1] != channels:
            self._buffers = (np.zeros((self.n_vertices + 1, channels), np.float32),
                             np.zeros((self.n_vertices + 1, channels), np.float32))
        return self._buffers

    def add_message(self, out, q) -> None:
        """out += K̃(q) for q (N, C); NumPy arrays or CPU tensors (`out` updated in place)."""
        out = np.asarray(out)
        q = np.ascontiguousarray(q, dtype=np.float32)
        grid, scratch = self.buffers(q.shape[1])
        _splat(self.offsets, self.splat_weights, q, grid)
        _slice_add(self.offsets, self.slice_weights, _blur(self.neighbours, grid, scratch), out)


def dense_crf_cpu(image: np.ndarray, probs: np.ndarray, params: "CRFParams", *,
                  threads: int | None = None) -> np.ndarray:
    """Mean-field inference of the fully connected CRF, matching pydensecrf.

    Args:
        image: RGB uint8 (H, W, 3).
        probs: class probabilities float32 (C, H, W) (e.g. a softmax).
        params: kernel parameters, iterations and normalization.
        threads: worker threads (at most `NUMBA_NUM_THREADS`); None keeps numba's current
            setting. The result is the same for any thread count.

    Returns:
        Refined probabilities, float32 (C, H, W), summing to 1 over C.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    probs = np.asarray(probs, dtype=np.float32)
    n_labels, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        return _mean_field(image, probs, params)
    finally:
        numba.set_num_threads(previous)


def _mean_field(image: np.ndarray, probs: np.ndarray, params: "CRFParams") -> np.ndarray:
    n_labels, height, width = probs.shape
    n = height * width
    neg_unary = np.log(np.clip(probs.reshape(n_labels, n), np.float32(1e-5), np.float32(1.0)))
    neg_unary = np.ascontiguousarray(neg_unary.T)  # (N, C), -U
    # Q and the lattice values carry whole 8-lane vectors: labels padded with zeros,
    # which every step keeps at 0.
    lanes = -(-n_labels // 8) * 8
    q = np.zeros((n, lanes), np.float32)  # (N, C')
    _softmax_rows(neg_unary, q)
    if params.iterations > 0:
        gauss, bilateral = kernel_features(image, params)
        operators = []
        for feats, weight in ((gauss, params.pos_w), (bilateral, params.bi_w)):
            operators.append(_KernelOperator(build_lattice(feats), weight, params.normalization))
        del gauss, bilateral, feats
        first, second = operators  # Gaussian, then bilateral
        buffers1, buffers2 = first.buffers(lanes), second.buffers(lanes)
        for _ in range(params.iterations):
            _splat_both(q, first.offsets, first.splat_weights, buffers1[0],
                        second.offsets, second.splat_weights, buffers2[0])
            grid1 = _blur(first.neighbours, *buffers1)
            grid2 = _blur(second.neighbours, *buffers2)
            _slice_softmax(neg_unary, first.offsets, first.slice_weights, grid1,
                           second.offsets, second.slice_weights, grid2, q)
    return np.ascontiguousarray(q[:, :n_labels].T).reshape(n_labels, height, width)


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
_ID_BITS = np.int64(0xFFFFFFFF)


@_jit
def _slot(table, keys, key):
    """The slot of the hash table holding `key` (d,), or the empty slot where it belongs.

    Linear probing; an entry is tag << 32 | vertex id (-1: empty), the tag being 31 more
    bits of the hash, so a probe reads the key row only when the tags agree."""
    h = np.uint64(0)
    for c in range(key.size):
        h = (h ^ np.uint64(np.int64(key[c]))) * _MIX1
        h ^= h >> np.uint64(29)
    h = (h ^ (h >> np.uint64(32))) * _MIX2
    h ^= h >> np.uint64(31)
    tag = np.int64(h >> np.uint64(33))
    mask = np.uint64(table.size - 1)
    slot = h & mask
    while True:
        entry = table[slot]
        if entry < 0:
            return slot, tag
        if entry >> 32 == tag:
            v = entry & _ID_BITS
            same = True
            for c in range(key.size):
                if keys[v, c] != key[c]:
                    same = False
                    break
            if same:
                return slot, tag
        slot = (slot + np.uint64(1)) & mask


@_jit
def _insert_corners(rem0, rank, start, offsets, table, keys, n_vertices):
    """Give each corner of points start .. start+len(rem0) its vertex id, adding new
    vertices (keys by id) in order of first use. Points at or past len(offsets) (the
    padding) add their vertices without recording them. Grows the table and keys;
    returns them with the new vertex count."""
    d = keys.shape[1]
    key = np.empty(d, np.int32)
    for p in range(rem0.shape[0]):
        i = start + p
        if 0 < p and i < offsets.shape[0]:
            # Neighbouring pixels often share a simplex: same corners, no lookups.
            same = True
            for c in range(d + 1):
                if rem0[p, c] != rem0[p - 1, c] or rank[p, c] != rank[p - 1, c]:
                    same = False
                    break
            if same:
                offsets[i] = offsets[i - 1]
                continue
        for r in range(d + 1):
            for c in range(d):
                key[c] = rem0[p, c] + r - (d + 1 if rank[p, c] > d - r else 0)
            if 2 * (n_vertices + 1) > table.size:
                table = _rehash(keys, n_vertices, 2 * table.size)
            slot, tag = _slot(table, keys, key)
            if table[slot] >= 0:
                v = table[slot] & _ID_BITS
            else:
                if n_vertices == keys.shape[0]:
                    grown = np.empty((2 * n_vertices, d), np.int32)
                    grown[:n_vertices] = keys
                    keys = grown
                keys[n_vertices] = key
                v = n_vertices
                table[slot] = tag << 32 | v
                n_vertices += 1
            if i < offsets.shape[0]:
                offsets[i, r] = v
    return table, keys, n_vertices


@_jit
def _rehash(keys, n_vertices, size):
    table = np.full(size, -1, np.int64)
    for v in range(n_vertices):
        slot, tag = _slot(table, keys, keys[v])
        table[slot] = tag << 32 | v
    return table


@_pjit
def _find_neighbours(table, keys):
    """(d+1, 2, M) blur neighbours n1, n2 of every vertex along each axis (M: none).
    n1 is looked up; n2 is its inverse (n2(n1(v)) = v). One task: a block of vertices."""
    m, d = keys.shape
    out = np.full((d + 1, 2, m), m, np.int32)
    for block in numba.prange((m + _BLOCK - 1) // _BLOCK):
        query = np.empty(d, np.int32)
        for v in range(block * _BLOCK, min(m, (block + 1) * _BLOCK)):
            for axis in range(d + 1):
                for c in range(d):  # n1: -1 on every coordinate but +d on the axis
                    query[c] = keys[v, c] + (d if c == axis else -1)
                entry = table[_slot(table, keys, query)[0]]
                if entry >= 0:
                    u = entry & _ID_BITS
                    out[axis, 0, v] = u
                    out[axis, 1, u] = v
    return out


@_jit
def _splat(offsets, weights, values, grid):
    """grid[v] = Σ weights[p, r]·values[p] over the (p, r) with offsets[p, r] = v, summed
    in pixel order, for v < M (row M is left alone)."""
    grid[:-1] = 0
    channels = values.shape[1]
    for p in range(offsets.shape[0]):
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
def _blur(neighbours, grid, scratch):
    """Blur (M+1, C) vertex values along axes 0..d, Jacobi steps between grid and scratch
    (row M, the missing neighbour, stays 0); returns the buffer holding the result.
    One task: a vertex."""
    m = grid.shape[0] - 1
    channels = grid.shape[1]
    half = np.float32(0.5)
    src, dst = grid, scratch
    for axis in range(neighbours.shape[0]):
        for v in numba.prange(m):
            old = src[v]
            n1 = src[neighbours[axis, 0, v]]
            n2 = src[neighbours[axis, 1, v]]
            new = dst[v]
            for k in range(channels):
                new[k] = old[k] + half * (n1[k] + n2[k])
        src, dst = dst, src
    return src


@_pjit
def _slice_add(offsets, weights, grid, out):
    """out[p] += Σ_r weights[p, r]·grid[offsets[p, r]]. One task: a block of pixels."""
    n, channels = out.shape
    for block in numba.prange((n + _BLOCK - 1) // _BLOCK):
        acc = np.empty(channels, np.float32)
        for p in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            _slice_into(acc, offsets, weights, grid, p)
            for k in range(channels):
                out[p, k] += acc[k]


@_jit
def _slice_into(acc, offsets, weights, grid, p):
    acc[:] = 0
    for r in range(offsets.shape[1]):
        w = weights[p, r]
        src = grid[offsets[p, r]]
        for k in range(acc.size):
            acc[k] += w * src[k]


@_pjit
def _slice_softmax(neg_unary, offsets1, weights1, grid1, offsets2, weights2, grid2, q):
    """q[p, :C] = softmax(-U[p] + slice1[p] + slice2[p]) for the two kernels' sliced
    messages, -U (N, C), q (N, C' >= C). One task: a block of pixels."""
    n, channels = neg_unary.shape
    lanes = q.shape[1]
    for block in numba.prange((n + _BLOCK - 1) // _BLOCK):
        acc1 = np.empty(lanes, np.float32)
        acc2 = np.empty(lanes, np.float32)
        logits = np.empty(channels, np.float32)
        for p in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            _slice_into(acc1, offsets1, weights1, grid1, p)
            _slice_into(acc2, offsets2, weights2, grid2, p)
            for k in range(channels):
                logits[k] = neg_unary[p, k] + acc1[k] + acc2[k]
            _softmax(logits, q[p, :channels])


@_jit
def _softmax(row, out):
    """out = softmax(row) for one pixel's labels."""
    top = _max(row)
    for k in range(row.size):
        out[k] = _exp(row[k] - top)
    total = _sum(out)
    for k in range(row.size):
        out[k] /= total


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


@_pjit
def _softmax_rows(values, out):
    """out[p, :C] = softmax(values[p]) for values (N, C), out (N, C' >= C).
    One task: a pixel."""
    channels = values.shape[1]
    for p in numba.prange(values.shape[0]):
        _softmax(values[p], out[p, :channels])
