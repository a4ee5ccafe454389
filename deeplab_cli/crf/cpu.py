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

Implementation: the lattice is built once per image with vectorised NumPy (keys packed into
int64 with a mixed radix and deduplicated by a stable sort, or deduplicated as byte rows when
the ranges do not fit 63 bits; vertices numbered by the first pixel that uses them, for
locality). Each iteration runs on torch CPU tensors in a (N, C) row-major layout as a few
sparse CSR products per kernel: splat, the blur axes multiplied out in groups of three,
slice, with the normalization, α and the kernel weight folded into the matrices (see
`_KernelOperator`). `Lattice.filter` is the plain staged form, kept as the reference.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from deeplab_cli.crf.params import CRFParams

# Pixels handled at once while building the lattice: bounds the temporaries (about
# 100 bytes per pixel) independently of the image size.
_CHUNK_PIXELS = 1 << 20
# Packed int64 keys need the product of the coordinate ranges below this.
_MAX_PACKED = 1 << 62


@dataclasses.dataclass
class Lattice:
    """A permutohedral lattice over N points with features of dimension d.

    Attributes:
        offsets: (N, d+1) int64, the vertex id of each point's r-th simplex corner.
        weights: (N, d+1) float32, the barycentric weights (each row sums to 1).
        neighbours: (d+1, 2, M) int64, for blur axis j the vertex ids of the neighbours
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


def _simplex(features: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Enclosing simplex of each point: rem0 (d+1, n) int32, rank (d+1, n) int8 and the
    barycentric weights (d+1, n) float32, in pydensecrf's float32 operation order."""
    n, d = features.shape
    f = np.ascontiguousarray(features.T)  # (d, n)
    down = np.float32(1.0) / np.float32(d + 1)
    up = np.float32(d + 1)

    elevated = np.empty((d + 1, n), np.float32)
    sm = np.zeros(n, np.float32)
    for j in range(d, 0, -1):
        cf = f[j - 1] * scale[j - 1]
        elevated[j] = sm - np.float32(j) * cf
        sm += cf
    elevated[0] = sm

    v = np.rint(elevated * down)  # round half to even, like the SSE conversion
    rem0 = v * up
    total = v.sum(axis=0).astype(np.int32)  # integer valued, exact

    delta = elevated - rem0
    rank = np.zeros((d + 1, n), np.int32)
    for i in range(d):
        for j in range(i + 1, d + 1):
            later_larger = delta[i] < delta[j]
            rank[i] += later_larger
            rank[j] += ~later_larger
    rank += total
    shift = (d + 1) * ((rank < 0).astype(np.int32) - (rank > d).astype(np.int32))
    rank += shift
    rem0 += shift.astype(np.float32)

    u = (elevated - rem0) * down
    bary = np.zeros((d + 2, n), np.float32)
    cols = np.arange(n)
    for i in range(d + 1):
        slot = d - rank[i]
        bary[slot, cols] += u[i]
        bary[slot + 1, cols] -= u[i]
    bary[0] += np.float32(1.0) + bary[d + 1]
    return rem0.astype(np.int32), rank.astype(np.int8), bary[: d + 1]


def build_lattice(features: np.ndarray, *, block: int = 4) -> Lattice:
    """Build the permutohedral lattice of float32 features (N, d) exactly as pydensecrf does.

    Vertex ids differ from pydensecrf's hash-table order (here: order of first use by
    pixel index) but the set of vertices, each pixel's corners and weights, and the blur
    neighbourhoods are the same.

    `block`: pydensecrf's SSE build handles points in blocks of 4 and fills the unused
    lanes of the last block with all-zero features, whose simplex corners it inserts into
    the lattice too. So when N is not a multiple of 4 the lattice also holds the d+1
    corners of the origin: no point splats onto them or reads them, but they exist, so
    the blur passes values through them (it changes results near x = y = 0 in dark
    regions). With block=1 no such vertices are added.
    """
    features = np.asarray(features, dtype=np.float32)
    n_points, d = features.shape
    if n_points % block:  # one zero row stands for all padding lanes (same corners)
        features = np.concatenate([features, np.zeros((1, d), np.float32)])
    n = features.shape[0]
    scale = _scale_factors(d)

    rems, ranks, weights = [], [], np.empty((n, d + 1), np.float32)
    for start in range(0, n, _CHUNK_PIXELS):
        rem0, rank, bary = _simplex(features[start:start + _CHUNK_PIXELS], scale)
        rems.append(rem0[:d].T.astype(np.int32))
        ranks.append(rank[:d].T)
        weights[start:start + rem0.shape[1]] = bary.T
    rem0 = np.concatenate(rems)  # (n, d), coordinate d is implied
    rank = np.concatenate(ranks)  # (n, d)
    del rems, ranks

    # Corner r of the simplex: key = rem0 + r - (d+1)·[rank > d - r], coordinates 0..d-1.
    # Key coordinates lie in [rem0 - d - 1, rem0 + d]; blur neighbours move them by up to
    # d more, so this range encloses every key we will ever look up.
    lo = rem0.min(axis=0).astype(np.int64) - 2 * d - 2
    hi = rem0.max(axis=0).astype(np.int64) + 2 * d + 2
    radix = hi - lo + 1
    if float(np.prod(radix.astype(np.float64))) < _MAX_PACKED:
        lattice = _build_packed(rem0, rank, weights, lo, radix)
    else:
        lattice = _build_rows(rem0, rank, weights)
    # Padding corners keep their vertices (numbered last when new) but no point uses them.
    lattice.offsets = lattice.offsets[:n_points]
    lattice.weights = lattice.weights[:n_points]
    return lattice


def _corner_keys(rem0: np.ndarray, rank: np.ndarray, r: int) -> np.ndarray:
    d = rem0.shape[1]
    return rem0 + r - (d + 1) * (rank > d - r)


def _neighbour_deltas(d: int) -> np.ndarray:
    """(d+1, 2, d) coordinate offsets of the blur neighbours n1, n2 along each axis."""
    deltas = np.empty((d + 1, 2, d), np.int64)
    deltas[:, 0, :] = -1
    deltas[:, 1, :] = 1
    for axis in range(d):
        deltas[axis, 0, axis] = d
        deltas[axis, 1, axis] = -d
    return deltas


def _number_vertices(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dedupe int64 codes (n, d+1). Returns vertex ids (n, d+1), the sorted unique codes
    and, for each of them, its vertex id. Vertices are numbered by first use."""
    flat = codes.ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    starts = np.empty(flat.size, bool)
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    group = np.cumsum(starts) - 1  # id in sorted order
    first_use = order[starts]  # stable sort: the first flat index using each vertex
    renumber = np.empty(first_use.size, np.int64)
    renumber[np.argsort(first_use, kind="stable")] = np.arange(first_use.size)
    ids = np.empty(flat.size, np.int64)
    ids[order] = renumber[group]
    return ids.reshape(codes.shape), ordered[starts], renumber


def _build_packed(rem0, rank, weights, lo, radix) -> Lattice:
    n, d = rem0.shape
    stride = np.ones(d, np.int64)
    for i in range(d - 2, -1, -1):
        stride[i] = stride[i + 1] * radix[i + 1]
    base = ((rem0.astype(np.int64) - lo) * stride).sum(axis=1)  # (n,)
    codes = np.empty((n, d + 1), np.int64)
    for r in range(d + 1):
        # key - rem0 = r - (d+1)·[rank > d-r], so only that difference is encoded per corner.
        codes[:, r] = base + ((r - (d + 1) * (rank > d - r)) * stride).sum(axis=1)
    offsets, unique_codes, vertex_of = _number_vertices(codes)
    del codes
    m = unique_codes.size

    # Keys by vertex id, unpacked from the codes.
    keys = np.empty((m, d), np.int32)
    rest = unique_codes.copy()
    for i in range(d):
        keys[vertex_of, i] = rest // stride[i] + lo[i]
        rest %= stride[i]

    deltas = (_neighbour_deltas(d) * stride).sum(axis=2)  # (d+1, 2) packed offsets
    neighbours = np.empty((d + 1, 2, m), np.int64)
    for axis in range(d + 1):
        for side in range(2):
            query = unique_codes + deltas[axis, side]
            pos = np.minimum(np.searchsorted(unique_codes, query), m - 1)
            found = unique_codes[pos] == query
            neighbours[axis, side, vertex_of] = np.where(found, vertex_of[pos], m)
    return Lattice(offsets, weights, neighbours, keys)


def _build_rows(rem0, rank, weights) -> Lattice:
    """Fallback when the coordinate ranges do not fit one int64: dedupe key rows as bytes."""
    n, d = rem0.shape
    keys_all = np.empty((n, d + 1, d), np.int32)
    for r in range(d + 1):
        keys_all[:, r] = _corner_keys(rem0, rank, r)
    rows = keys_all.reshape(-1, d)
    _, first, inverse = np.unique(_as_void(rows), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty(first.size, np.int64)
    renumber[order] = np.arange(first.size)
    offsets = renumber[inverse.ravel()].reshape(n, d + 1)
    keys = rows[first[order]]  # (m, d) by vertex id
    m = keys.shape[0]

    # Look neighbours up by deduplicating keys and queries together: a query's group holds
    # a vertex iff the first member of the group is one of the keys (listed first).
    deltas = _neighbour_deltas(d)
    queries = (keys[None, None] + deltas[:, :, None, :]).reshape(-1, d)
    both = np.concatenate([keys.astype(np.int64), queries])
    _, first, inverse = np.unique(_as_void(both), return_index=True, return_inverse=True)
    group_vertex = np.where(first < m, first, m)
    neighbours = group_vertex[inverse.ravel()[m:]].reshape(d + 1, 2, m)
    return Lattice(offsets, weights, neighbours, keys)


def _as_void(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()


class _KernelOperator:
    """K̃ for one kernel as a short chain of sparse CSR matrices applied to Q (N, C).

    K = slice · B_d ⋯ B_0 · splat, with splat (M, N) holding the barycentric weights,
    B_j (M, M) the blur along axis j (1 on the diagonal, 0.5 for each existing neighbour)
    and slice (N, M) = α·splatᵀ. Consecutive blur axes are multiplied out in groups of
    three (two when d = 2): a group of fewer than d+1 axes has at most 3^k distinct
    neighbours per vertex and no repeated ones, so the product is a plain gather and the
    chain is built in a few vectorised steps. The normalization and the kernel weight are
    folded into the splat's columns and the slice's rows. Only the floating-point
    rounding order differs from `Lattice.filter`.
    """

    def __init__(self, lattice: Lattice, weight: float, normalization: str):
        import torch

        n, m, dp1 = lattice.n_points, lattice.n_vertices, lattice.dim + 1
        offsets = torch.from_numpy(lattice.offsets.reshape(-1))
        bary = torch.from_numpy(lattice.weights.reshape(-1))
        slice_rows = torch.arange(0, n * dp1 + 1, dp1, dtype=torch.int64)
        group = 3 if dp1 > 3 else 2
        self.chain = [_splat_matrix(offsets, bary, n, m)]
        for first in range(0, dp1, group):
            self.chain.append(_blur_group_matrix(lattice, range(first, min(first + group, dp1))))
        self.chain.append(_csr(slice_rows, offsets, bary * np.float32(lattice.alpha), (n, m)))

        norm = self._apply(torch.ones(n, 1))[:, 0].double()  # K·1, (N,)
        if normalization == "symmetric":
            scale = (1.0 / torch.sqrt(norm + 1e-20)).float()
            self.chain[0] = _scale_columns(self.chain[0], scale)
        else:
            scale = (1.0 / (norm + 1e-20)).float()
        self.chain[-1] = _scale_rows(self.chain[-1], scale * np.float32(weight))

    def _apply(self, values: "torch.Tensor") -> "torch.Tensor":
        import torch

        for stage in self.chain:
            values = torch.sparse.mm(stage, values)
        return values

    def add_message(self, out: "torch.Tensor", q: "torch.Tensor") -> None:
        """out += K̃(q) for q (N, C)."""
        import torch

        values = q
        for stage in self.chain[:-1]:
            values = torch.sparse.mm(stage, values)  # (M, C) on the lattice
        torch.addmm(out, self.chain[-1], values, out=out)


def _splat_matrix(offsets, bary, n, m):
    """The (M, N) splat matrix: row v lists the (pixel, weight) pairs landing on vertex v."""
    import torch

    dp1 = offsets.numel() // n
    order = torch.argsort(offsets, stable=True)  # stable: pixels ascending within a row
    rows = torch.zeros(m + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(offsets, minlength=m), 0, out=rows[1:])
    cols = torch.div(order, dp1, rounding_mode="floor")
    return _csr(rows, cols, bary[order], (m, n))


def _blur_group_matrix(lattice: Lattice, axes):
    """(M, M) matrix B_last ⋯ B_first of consecutive blur axes (fewer than d+1 of them).

    Row v holds every vertex reached from v by one step (or none) along each axis, the
    last axis first, with weight 0.5 per step; a path through a missing vertex adds
    nothing, as in the staged blur.
    """
    import torch

    m = lattice.n_vertices
    cols = np.arange(m)[:, None]
    vals = np.ones((m, 1), np.float32)
    half = np.float32(0.5)
    for axis in reversed(list(axes)):  # row vector times B_last first
        n1 = np.append(lattice.neighbours[axis, 0], m)
        n2 = np.append(lattice.neighbours[axis, 1], m)
        cols = np.concatenate([cols, n1[cols], n2[cols]], axis=1)
        vals = np.concatenate([vals, vals * half, vals * half], axis=1)
    order = np.argsort(cols, axis=1)  # sorted columns, missing (M) last
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    keep = cols < m
    rows = np.zeros(m + 1, np.int64)
    np.cumsum(keep.sum(axis=1), out=rows[1:])
    return _csr(torch.from_numpy(rows), torch.from_numpy(cols[keep]),
                torch.from_numpy(vals[keep]), (m, m))


def _csr(rows, cols, values, size):
    import torch

    index_dtype = torch.int32 if cols.numel() < 2**31 and max(size) < 2**31 else torch.int64
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(rows.to(index_dtype), cols.to(index_dtype),
                                       values.contiguous(), size=size, check_invariants=False)


def _scale_columns(matrix, scale):
    return _csr(matrix.crow_indices(), matrix.col_indices(),
                matrix.values() * scale[matrix.col_indices().long()], tuple(matrix.shape))


def _scale_rows(matrix, scale):
    import torch

    counts = torch.diff(matrix.crow_indices().long())
    return _csr(matrix.crow_indices(), matrix.col_indices(),
                matrix.values() * torch.repeat_interleave(scale, counts), tuple(matrix.shape))


def dense_crf_cpu(image: np.ndarray, probs: np.ndarray, params: "CRFParams") -> np.ndarray:
    """Mean-field inference of the fully connected CRF, matching pydensecrf.

    Args:
        image: RGB uint8 (H, W, 3).
        probs: class probabilities float32 (C, H, W) (e.g. a softmax).
        params: kernel parameters, iterations and normalization.

    Returns:
        Refined probabilities, float32 (C, H, W), summing to 1 over C.
    """
    import torch

    image = np.ascontiguousarray(image, dtype=np.uint8)
    probs = np.asarray(probs, dtype=np.float32)
    n_labels, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    n = height * width

    neg_unary = torch.from_numpy(
        np.log(np.clip(probs.reshape(n_labels, n).T, np.float32(1e-5), np.float32(1.0)))
    ).contiguous()  # (N, C), -U
    q = torch.softmax(neg_unary, dim=1)
    if params.iterations == 0:
        return q.T.contiguous().reshape(n_labels, height, width).numpy()

    gauss, bilateral = kernel_features(image, params)
    operators = []
    for feats, weight in ((gauss, params.pos_w), (bilateral, params.bi_w)):
        lattice = build_lattice(feats)
        del feats
        operators.append(_KernelOperator(lattice, weight, params.normalization))
        del lattice
    del gauss, bilateral

    tmp = torch.empty_like(neg_unary)
    for _ in range(params.iterations):
        tmp.copy_(neg_unary)
        for op in operators:  # Gaussian, then bilateral
            op.add_message(tmp, q)
        torch.softmax(tmp, dim=1, out=q)
    return q.T.contiguous().reshape(n_labels, height, width).numpy()
