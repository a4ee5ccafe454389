"""The dense CRF on CUDA: permutohedral lattice and mean field as CuPy raw kernels.

The CUDA C++ lives in `kernels/*.cu` (shipped as package data `deeplab_cli.kernels`) and is
compiled once per process and device with NVRTC through `cupy.RawModule`. Everything runs on
the current CuPy stream; the host waits on the device once per lattice, to learn its size.

How one batch goes (all images of a batch share each lattice; keys carry the image index):
  1. unary: -U = log(clip(p, 1e-5, 1)) into (N, ld) rows, Q = softmax(-U);
  2. per kernel (Gaussian d = 2, bilateral d = 5): elevate every pixel to its d+1 simplex
     corners (keys and barycentric weights, bit-identical to pydensecrf), stable-sort the
     keys, mark and number unique vertices, build the per-vertex entry ranges (CSR) and the
     neighbour table along the d+1 axes; then norm = K 1 through the same filter. An image
     whose H*W is not a multiple of 4 also gets the origin's d+1 corners as vertices, as in
     pydensecrf (its 4-wide build pads the last group with all-zero features);
  3. each iteration: per kernel splat (gather over each vertex's entries, no atomics) and
     blur along the d+1 axes (Jacobi, double buffer); then one kernel slices both lattices,
     adds the normalized Potts messages to -U and takes the softmax over labels.
Per-pixel and per-vertex label rows are padded to a multiple of 4 floats (pad columns stay 0)
so every pass moves them as float4; each label's arithmetic is pydensecrf's.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError

KERNEL_FILES = ("permutohedral.cu", "meanfield.cu")
KERNELS = {
    "permutohedral.cu": (
        "lattice_elevate_d2", "lattice_elevate_d5", "lattice_elevate_origin_d2", "lattice_elevate_origin_d5",
        "lattice_mark", "lattice_segments", "lattice_lengths",
        "lattice_neighbours_d2", "lattice_neighbours_d5", "lattice_run_counts", "lattice_runs", "lattice_splat",
        "lattice_splat_reduce", "lattice_blur", "lattice_slice", "lattice_entries", "lattice_norm",
        "lattice_splat_v4", "lattice_splat_reduce_v4", "lattice_blur_v4",
    ),
    "meanfield.cu": ("mf_unary_rows", "mf_slice_softmax_v4", "mf_to_planes_rows"),
}
# No fused multiply-add anywhere: the lattice must round exactly as pydensecrf's SSE code.
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")
NVCC_OPTIONS = ("--std=c++14", "--fmad=false")

UNARY_CLIP = 1e-5  # U = -log(clip(p, 1e-5, 1)), as pydensecrf.utils.unary_from_softmax
# Splat runs: a vertex with at most this many entries is summed by one thread per label in one
# go; longer ones in two levels: runs of max(this, about sqrt(entries)) entries each, then the
# vertex's runs. Short runs keep the threads of a warp (neighbouring vertices) equally busy.
RUN_MIN = 16
_BLOCK = 256
_KEY_LIMIT = 32767  # pydensecrf stores lattice coordinates as int16
_INDEX_LIMIT = 2**31 - 1  # entry and vertex indices are int32


def kernel_dir() -> Path:
    """The folder holding the .cu sources: the installed package data, else `<repo>/kernels`."""
    try:
        root = importlib.resources.files("deeplab_cli.kernels")
        path = Path(str(root))
        if (path / KERNEL_FILES[0]).is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    path = Path(__file__).resolve().parents[2] / "kernels"
    if (path / KERNEL_FILES[0]).is_file():
        return path
    raise DeeplabError(f"CUDA kernel sources not found (looked in deeplab_cli.kernels and {path})")


def kernel_source(name: str) -> str:
    """The text of one kernel file, e.g. 'permutohedral.cu'."""
    return (kernel_dir() / name).read_text()


def compile_ptx(arch: str = "sm_80", nvcc: str | None = None) -> dict[str, str]:
    """Compile every kernel file to PTX with nvcc (no GPU needed); {file name: PTX text}.

    Raises DeeplabError when nvcc is missing or a file does not compile (with nvcc's message).
    """
    nvcc = nvcc or shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if nvcc is None:
        raise DeeplabError("nvcc not found on PATH; cannot compile the CUDA kernels")
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="deeplab-ptx-") as tmp:
        for name in KERNEL_FILES:
            target = Path(tmp) / (name + ".ptx")
            cmd = [nvcc, "-ptx", f"-arch={arch}", *NVCC_OPTIONS, str(kernel_dir() / name), "-o", str(target)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise DeeplabError(f"{name}: nvcc failed: {proc.stderr.strip().splitlines()[-1:]}")
            out[name] = target.read_text()
    return out


_modules: dict[tuple[int, str], Any] = {}
_modules_lock = threading.Lock()


def load_kernels(device: int | None = None) -> dict[str, Any]:
    """Every kernel as a compiled `cupy.RawKernel` for `device` (default: the current one).

    Compiles with NVRTC on first use in this process and caches per device.
    """
    import cupy

    device = cupy.cuda.Device().id if device is None else int(device)
    functions: dict[str, Any] = {}
    with _modules_lock, cupy.cuda.Device(device):
        for name in KERNEL_FILES:
            key = (device, name)
            if key not in _modules:
                module = cupy.RawModule(code=kernel_source(name), options=NVRTC_OPTIONS)
                module.compile()
                _modules[key] = module
            for fn in KERNELS[name]:
                functions[fn] = _modules[key].get_function(fn)
    return functions


def compile_all(arch: str | None = None) -> list[str]:
    """Compile every kernel and return their names: with NVRTC for the current GPU when CuPy
    sees one (and no `arch` is asked for), else to PTX with nvcc for `arch` (default sm_80)."""
    from deeplab_cli.device import cupy_available

    if arch is None and cupy_available():
        return sorted(load_kernels())
    ptx = compile_ptx(arch or "sm_80")
    names = [fn for name in KERNEL_FILES for fn in KERNELS[name] if f".entry {fn}(" in ptx[name]]
    return sorted(names)


# --------------------------------------------------------------------------------------------
# Lattice geometry, decided on the host from image sizes and parameters alone (no device sync)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One pairwise kernel: its Potts weight and its features' standard deviations (float32)."""

    name: str
    weight: float
    d: int
    stds: tuple[float, ...]
    std_options: tuple[str, ...]


def kernel_specs(params: CRFParams) -> list[KernelSpec]:
    """The two kernels in pydensecrf's order: Gaussian (x, y), then bilateral (x, y, r, g, b)."""
    xy = float(np.float32(params.pos_xy_std))
    bxy, rgb = float(np.float32(params.bi_xy_std)), float(np.float32(params.bi_rgb_std))
    return [
        KernelSpec("gaussian", float(params.pos_w), 2, (xy, xy), ("pos_xy_std",)),
        KernelSpec("bilateral", float(params.bi_w), 5, (bxy, bxy, rgb, rgb, rgb), ("bi_xy_std", "bi_rgb_std")),
    ]


def scale_factors(d: int) -> np.ndarray:
    """Per-feature elevation scale, rounded as pydensecrf does (double, then float32)."""
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([(1.0 / math.sqrt((i + 2) * (i + 1))) * inv_std_dev for i in range(d)], dtype=np.float32)


def key_bounds(spec: KernelSpec, height: int, width: int) -> list[tuple[int, int]]:
    """Inclusive bounds of each of the d stored lattice coordinates over any image this size."""
    d = spec.d
    fmax = [(width - 1) / spec.stds[0], (height - 1) / spec.stds[1]] + [255.0 / s for s in spec.stds[2:]]
    cf = [f * float(s) * (1 + 1e-5) + 1e-3 for f, s in zip(fmax, scale_factors(d))]
    bounds = []
    margin = 3 * (d + 1)  # rounding to a multiple of d+1, the +-(d+1) fix, the simplex corner
    for j in range(d):
        lo = 0.0 if j == 0 else -j * cf[j - 1]
        hi = sum(cf[j:])
        bounds.append((math.floor(lo) - margin, math.ceil(hi) + margin))
    return bounds


def check_lattice_size(height: int, width: int, params: CRFParams, n_images: int = 1) -> None:
    """Raise DeeplabError when the lattice cannot index an image of this size (int16 keys,
    int32 entry indices), before any memory is touched."""
    n = height * width * n_images
    if 6 * (n + n_images) > _INDEX_LIMIT:
        raise DeeplabError(
            f"CRF: {n_images} image(s) of {width}x{height} is {n / 1e6:.0f} MP, over the lattice's "
            f"{_INDEX_LIMIT // 6 / 1e6:.0f} MP limit (int32 indices); run fewer or smaller images"
        )
    for spec in kernel_specs(params):
        if spec.weight == 0:
            continue
        lo = min(b[0] for b in key_bounds(spec, height, width))
        hi = max(b[1] for b in key_bounds(spec, height, width))
        if lo < -_KEY_LIMIT or hi > _KEY_LIMIT:
            stds = ", ".join(f"{o}={getattr(params, o)}" for o in spec.std_options)
            raise DeeplabError(
                f"CRF: a {width}x{height} image with {stds} needs {spec.name} lattice coordinates "
                f"beyond int16 (pydensecrf's key type); use larger standard deviations or a smaller image"
            )


def pack_layout(spec: KernelSpec, height: int, width: int, n_images: int,
                *, spread: bool = False) -> tuple[np.ndarray, int]:
    """How keys pack into 64-bit words: int32 (word, shift, bits, lo) per field (remainder,
    image, q_0 .. q_{d-1}, with coordinate = q * (d+1) + remainder), and the word count (1 or 2).

    `spread` puts the last field in a second word even when one would do (tests use it).
    """
    fields = [(spec.d.bit_length(), 0), (max(n_images - 1, 0).bit_length(), 0)]
    for lo, hi in key_bounds(spec, height, width):
        q_lo, q_hi = lo // (spec.d + 1) - 1, hi // (spec.d + 1) + 1
        fields.append(((q_hi - q_lo).bit_length(), q_lo))
    table, word, shift = [], 0, 0
    for index, (bits, lo) in enumerate(fields):
        if bits == 0:
            table.append((0, 0, 0, lo))  # never shift by 64: empty fields sit at bit 0
            continue
        if shift + bits > 64 or (spread and index == len(fields) - 1 and word == 0):
            word, shift = word + 1, 0
        if word > 1:
            raise DeeplabError(f"CRF: {spec.name} lattice keys do not fit 128 bits")
        table.append((word, shift, bits, lo))
        shift += bits
    return np.array(table, dtype=np.int32).reshape(-1), word + 1


def alpha(d: int) -> np.float32:
    """pydensecrf's slice scale 1 / (1 + 2^-d), in float32."""
    return np.float32(1.0) / (np.float32(1.0) + np.float32(2.0**-d))


# --------------------------------------------------------------------------------------------
# Backends: CuPy on the GPU; tests plug in the same kernels compiled for the CPU.


class CupyBackend:
    """Runs the kernels with CuPy on the current device and stream."""

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.functions = load_kernels()
        self.max_blocks = cupy.cuda.Device().attributes["MultiProcessorCount"] * 32
        self._null = np.uint64(0)

    def launch(self, name: str, rows: int, args: Sequence[Any], width: int = 1) -> None:
        """Run kernel `name` over `rows` rows of `width` lanes each (labels; 32 for a warp per
        row): blocks of (width, rows) threads, the kernels' grid-stride loops cover any grid."""
        if rows <= 0:
            return
        lanes = min(width, _BLOCK)
        per_block = max(1, _BLOCK // lanes)
        grid = min((rows + per_block - 1) // per_block, self.max_blocks)
        self.functions[name]((grid,), (lanes, per_block), tuple(self._null if a is None else a for a in args))

    def to_host(self, array: Any) -> np.ndarray:
        return array.get()

    def capture(self, work: Any) -> Any:
        """Record the launches `work()` makes into a CUDA graph (on a private stream)."""
        import cupy

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                work()
            finally:
                graph = stream.end_capture()
        return graph

    def replay(self, graph: Any) -> None:
        """Run a captured graph on the current stream."""
        import cupy

        graph.launch(cupy.cuda.get_current_stream())

    def free_bytes(self) -> int:
        import cupy

        return int(cupy.cuda.runtime.memGetInfo()[0]) + int(cupy.get_default_memory_pool().free_bytes())


_i32, _i64, _f32 = np.int32, np.int64, np.float32


@dataclasses.dataclass
class Lattice:
    """One kernel's lattice over a whole batch (device arrays; M vertices, E entries)."""

    spec: KernelSpec
    n_vertices: int
    longest: int  # most entries on one vertex
    entry_vertex: Any  # (E,) int32, entry = pixel * (d+1) + corner
    entry_weight: Any  # (E,) float32 barycentric weights
    sorted_pixel: Any  # (E,) int32, entries in key order
    sorted_weight: Any  # (E,) float32
    run_bounds: Any  # (R+1,) int32 splat runs over sorted entries (the vertices themselves when one level)
    n_runs: Any  # (1,) int32 on the device: R
    n_runs_max: int  # host bound on R, for launch sizes
    run_offset: Any  # (M+1,) int32 runs of each vertex, or None for a one-level splat
    run_vertex: Any  # (R,) int32 vertex of a run that is all of its vertex, else -1 (None: one level)
    neighbours: Any  # (d+1, M, 2) int32, -1 = missing
    norm: Any = None  # (N,) float32: 1/sqrt(K1) (symmetric) or 1/K1 (after)
    values: Any = None  # two (M * ld,) float32 buffers: the splat/blur double buffer


def _bytes_before_lattice(n_pixels: int, row: int, words: int) -> int:
    """Device bytes for the per-pixel arrays (rows of `row` floats), both lattices' entry
    tables, and the peak of building the larger (bilateral, E = 6N) lattice; vertex-sized
    arrays come later."""
    per_pixel = 3 * n_pixels * row * 4 + 4 * n_pixels * 4  # -U, Q, outputs; norms, ones
    entries = 16 * 9 * n_pixels  # vertex id, weight, sorted pixel, sorted weight for E = 3N + 6N
    # keys, order, flags/ids, sort scratch, the regrouping by first use
    build = 6 * n_pixels * (3 * 8 * words + 8 + 4 * 4 + 16 + 16)
    return per_pixel + entries + build


def _bytes_after_lattice(lattices: list[Lattice], row: int) -> int:
    vertices = sum(lat.n_vertices for lat in lattices)  # each lattice keeps its own double buffer
    partial = max(lat.n_runs_max if lat.run_offset is not None else 0 for lat in lattices)
    return 4 * (2 * vertices + partial) * row + 4 * partial  # value buffers, partial sums, run_vertex


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class CudaCRF:
    """Mean-field inference for one batch on the GPU, in stages (`prepare`, `iterate`,
    `result`) so benchmarks can time the lattice build and the iterations apart."""

    def __init__(self, images: Sequence[Any], probs: Sequence[Any], params: CRFParams = CRFParams(),
                 backend: Any = None, *, spread_keys: bool = False, reorder: bool = False,
                 run_min: int = RUN_MIN) -> None:
        self.bk = backend if backend is not None else CupyBackend()
        xp = self.bk.xp
        if len(images) != len(probs) or not images:
            raise DeeplabError(f"CRF batch: {len(images)} image(s) but {len(probs)} probability map(s)")
        self.params = params
        self.images = [xp.ascontiguousarray(im) for im in images]
        self.probs = [xp.ascontiguousarray(p) for p in probs]
        self.n_labels = int(self.probs[0].shape[0]) if self.probs[0].ndim == 3 else 0
        for i, (im, p) in enumerate(zip(self.images, self.probs)):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise DeeplabError(f"CRF image {i}: expected uint8 (H, W, 3), got {im.dtype} {tuple(im.shape)}")
            if p.ndim != 3 or p.dtype != np.float32 or tuple(p.shape[1:]) != tuple(im.shape[:2]):
                raise DeeplabError(
                    f"CRF probabilities {i}: expected float32 (C, {im.shape[0]}, {im.shape[1]}), "
                    f"got {p.dtype} {tuple(p.shape)}"
                )
            if p.shape[0] != self.n_labels or self.n_labels < 1:
                raise DeeplabError(f"CRF probabilities {i}: {p.shape[0]} labels, batch has {self.n_labels}")
            if im.shape[0] < 1 or im.shape[1] < 1:
                raise DeeplabError(f"CRF image {i}: empty image {tuple(im.shape)}")
        self.sizes = [(int(im.shape[0]), int(im.shape[1])) for im in self.images]
        self.offsets = np.cumsum([0] + [h * w for h, w in self.sizes]).tolist()
        self.n_pixels = self.offsets[-1]
        self.max_h = max(h for h, _ in self.sizes)
        self.max_w = max(w for _, w in self.sizes)
        check_lattice_size(self.max_h, self.max_w, params, len(self.images))
        self.specs = [s for s in kernel_specs(params) if s.weight != 0] if params.iterations > 0 else []
        self.spread_keys = spread_keys
        # Vertices numbered by first use instead of key order: same bits, but measured slower on
        # an H200 (key order is already raster-like for the Gaussian lattice), so off by default.
        self.reorder = reorder
        # Label rows padded to whole float4s (pad columns 0), moved 16 bytes at a time.
        self.n_vec = -(-self.n_labels // 4)
        self.ld = 4 * self.n_vec
        # Lanes per pixel in the slice/softmax kernel: enough for one float4 each, at most a warp.
        self.group = min(32, 1 << max(self.n_vec - 1, 0).bit_length())
        self.run_min = run_min
        self.lattices: list[Lattice] = []
        self.q = self.neg_unary = None

    # -- stage 1: unary, Q0, lattices and their norms ------------------------------------------

    def prepare(self) -> None:
        bk, xp = self.bk, self.bk.xp
        n, c, ld = self.n_pixels, self.n_labels, self.ld
        words = max((pack_layout(s, self.max_h, self.max_w, len(self.images))[1] for s in self.specs), default=1)
        need = _bytes_before_lattice(n, ld, words)
        free = bk.free_bytes()
        if need > free:
            raise DeeplabError(
                f"CRF: {n / 1e6:.1f} MP with {c} labels needs about {_gib(need)} of GPU memory "
                f"to build the lattice, {_gib(free)} free; use smaller or fewer images"
            )
        self.neg_unary = xp.empty((n, ld), dtype=xp.float32)  # (N, ld), C labels used
        for b, p in enumerate(self.probs):
            count = self.offsets[b + 1] - self.offsets[b]
            bk.launch("mf_unary_rows", count, (p, _i64(count), _i32(c), _i64(self.offsets[b]), _f32(UNARY_CLIP),
                                               _i32(self.n_vec), self.neg_unary))
        # (N, ld): pad columns 0, so splatting and blurring them adds nothing anywhere
        self.q = xp.empty((n, ld), dtype=xp.float32)
        self._slice_softmax(None)
        if not self.specs:
            return
        self.lattices = [self._build(spec) for spec in self.specs]
        need = _bytes_after_lattice(self.lattices, ld)
        free = bk.free_bytes()
        if need > free:
            most = max(lat.n_vertices for lat in self.lattices)
            raise DeeplabError(
                f"CRF: the lattice has {most} vertices; filtering {c} labels needs about {_gib(need)} "
                f"more GPU memory, {_gib(free)} free; use smaller or fewer images"
            )
        for lat in self.lattices:
            m = lat.n_vertices
            lat.values = (xp.empty(m * ld, dtype=xp.float32), xp.empty(m * ld, dtype=xp.float32))  # (M, ld) each
        partial = max(lat.n_runs_max if lat.run_offset is not None else 0 for lat in self.lattices)
        self._partial = xp.empty(max(partial, 1) * ld, dtype=xp.float32)
        ones = xp.ones(n, dtype=xp.float32)  # (N, 1)
        raw = xp.empty(n, dtype=xp.float32)
        for lat in self.lattices:
            self._filter(lat, ones, 1, in_scale=None, out_scale=None, base=None, weight=0.0, out=raw, seq=True)
            lat.norm = xp.empty(n, dtype=xp.float32)
            bk.launch("lattice_norm", n, (raw, _i64(n), _i32(self.params.normalization == "symmetric"), lat.norm))

    def _build(self, spec: KernelSpec) -> Lattice:
        bk, xp = self.bk, self.bk.xp
        d, n = spec.d, self.n_pixels
        # Images whose pixel count is not a multiple of 4 add one pseudo-pixel each, past all
        # real pixels: the origin, whose corners pydensecrf's padded build inserts.
        padded = [b for b, (h, w) in enumerate(self.sizes) if (h * w) % 4]
        e = (d + 1) * (n + len(padded))
        pack, words = pack_layout(spec, self.max_h, self.max_w, len(self.images), spread=self.spread_keys)
        pack_dev = xp.asarray(pack)
        stds = xp.asarray(np.array(spec.stds, dtype=np.float32))
        scale = xp.asarray(scale_factors(d))
        inv_dp1 = np.float32(1.0) / np.float32(d + 1)
        key_lo = xp.empty(e, dtype=xp.uint64)
        key_hi = xp.empty(e, dtype=xp.uint64) if words == 2 else None
        weight = xp.empty(e, dtype=xp.float32)
        error = xp.zeros(1, dtype=xp.int32)
        for b, im in enumerate(self.images):
            h, w = self.sizes[b]
            bk.launch(f"lattice_elevate_d{d}", h * w, (im, _i32(h), _i32(w), _i64(self.offsets[b]), _i32(b), stds,
                                                       scale, inv_dp1, pack_dev, key_lo, key_hi, weight, error))
        if padded:
            bk.launch(f"lattice_elevate_origin_d{d}", len(padded), (xp.asarray(np.array(padded, np.int32)),
                                                                    _i64(len(padded)), _i64(n), stds, scale, inv_dp1,
                                                                    pack_dev, key_lo, key_hi, weight, error))
        # Stable sorts keep each vertex's entries in pixel order, pydensecrf's splat order.
        order = xp.argsort(key_lo, kind="stable")
        if key_hi is not None:
            order = order[xp.argsort(key_hi[order], kind="stable")]
        sorted_lo = key_lo[order]
        sorted_hi = key_hi[order] if key_hi is not None else None
        del key_lo, key_hi
        flags = xp.empty(e, dtype=xp.int32)
        bk.launch("lattice_mark", e, (sorted_lo, sorted_hi, _i64(e), flags))
        vertex = xp.cumsum(flags, dtype=xp.int32)
        vertex -= 1
        starts = xp.empty(e + 1, dtype=xp.int32)
        unique_lo = xp.empty(e, dtype=xp.uint64)
        unique_hi = xp.empty(e, dtype=xp.uint64) if sorted_hi is not None else None
        bk.launch("lattice_segments", e, (flags, vertex, sorted_lo, sorted_hi, _i64(e), starts, unique_lo, unique_hi))
        lengths = xp.zeros(e, dtype=xp.int32)
        bk.launch("lattice_lengths", e, (flags, vertex, starts, _i64(e), lengths))
        # The build's one wait on the device: the vertex count sizes everything after.
        info = bk.to_host(xp.stack([vertex[-1] + 1, lengths.max(), error[0]]))
        m, longest, err = (int(x) for x in info)
        if err:
            raise RuntimeError(f"CRF {spec.name} lattice: a key fell outside its packed range (a bug)")
        del flags, sorted_lo, sorted_hi
        starts = starts[: m + 1]
        lengths = lengths[:m]
        renumber = None
        if self.reorder:
            # Number vertices by first use (pixel order) instead of key order, so the vertices of
            # nearby pixels, and blur neighbours, sit close in memory. A stable sort put each
            # vertex's smallest entry first; entries are regrouped by the new ids without a sort.
            first_entry = order[starts[:m]]
            by_first_use = xp.argsort(first_entry)  # old ids in new order (keys distinct)
            renumber = xp.empty(m, dtype=xp.int32)
            renumber[by_first_use] = xp.arange(m, dtype=xp.int32)
            lengths = lengths[by_first_use]
            new_starts = xp.empty(m + 1, dtype=xp.int32)
            new_starts[0] = 0
            xp.cumsum(lengths, dtype=xp.int32, out=new_starts[1:])
            # (E,) new sorted position of each old sorted position: same offset within its vertex
            dest = new_starts[renumber[vertex]] + (xp.arange(e, dtype=xp.int32) - starts[vertex])
            regrouped = xp.empty_like(order)
            regrouped[dest] = order
            regrouped_vertex = xp.empty_like(vertex)
            regrouped_vertex[dest] = renumber[vertex]
            vertex = regrouped_vertex
            del dest, first_entry, by_first_use
            order, starts = regrouped, new_starts
        entry_vertex = xp.empty(e, dtype=xp.int32)
        sorted_pixel = xp.empty(e, dtype=xp.int32)
        sorted_weight = xp.empty(e, dtype=xp.float32)
        bk.launch("lattice_entries", e, (order, vertex, weight, _i64(e), _i64(n), _i32(d + 1), entry_vertex,
                                         sorted_pixel, sorted_weight))
        del order, vertex
        neighbours = xp.empty((d + 1, m, 2), dtype=xp.int32)
        bk.launch(f"lattice_neighbours_d{d}", m, (unique_lo[:m], None if unique_hi is None else unique_hi[:m],
                                                  _i64(m), pack_dev, renumber, neighbours))
        del unique_lo, unique_hi, renumber
        if longest <= self.run_min:
            run_bounds, n_runs, n_runs_max = starts, xp.asarray(np.array([m], np.int32)), m
            run_offset = run_vertex = None
        else:
            # Each vertex's split depends on its own length only, so a batch sums exactly as
            # its images would alone.
            counts = xp.empty(m, dtype=xp.int32)
            bk.launch("lattice_run_counts", m, (lengths, _i64(m), _i32(self.run_min), counts))
            run_offset = xp.zeros(m + 1, dtype=xp.int32)
            run_offset[1:] = xp.cumsum(counts, dtype=xp.int32)
            n_runs_max = m + e // self.run_min + 1
            run_bounds = xp.empty(n_runs_max + 1, dtype=xp.int32)
            run_vertex = xp.empty(n_runs_max, dtype=xp.int32)
            bk.launch("lattice_runs", m, (starts, lengths, run_offset, _i64(m), _i32(self.run_min), _i64(e),
                                          run_bounds, run_vertex))
            n_runs = run_offset[m:]
        return Lattice(spec, m, longest, entry_vertex, weight, sorted_pixel, sorted_weight, run_bounds, n_runs,
                       n_runs_max, run_offset, run_vertex, neighbours)

    def _filter(self, lat: Lattice, src: Any, c: int, *, in_scale: Any, out_scale: Any, base: Any,
                weight: float, out: Any, seq: bool) -> None:
        """out = slice(blur(splat(src * in_scale))) * out_scale, or base + weight * that."""
        bk = self.bk
        d = lat.spec.d
        a, b = self._splat_blur(lat, src, c, in_scale=in_scale, seq=seq)
        n = self.n_pixels
        bk.launch("lattice_slice", n, (a, lat.entry_vertex, lat.entry_weight, _i64(n), _i32(c), _i32(d + 1),
                                       alpha(d), _i32(seq), out_scale, base, _f32(weight), out), c)

    def _splat_blur(self, lat: Lattice, src: Any, c: int, *, in_scale: Any, seq: bool) -> tuple[Any, Any]:
        """Splat src * in_scale (rows of c floats) onto the lattice and blur it; (result,
        scratch), (M, c) each. Label rows (c = ld) move as float4, the norm's ones (c = 1) as floats."""
        bk = self.bk
        m, d = lat.n_vertices, lat.spec.d
        a, b = lat.values[0][: m * c], lat.values[1][: m * c]  # (M, c) each
        suffix, lanes = ("_v4", c // 4) if c == self.ld else ("", c)
        splat = "lattice_splat" + suffix
        if lat.run_offset is None:
            bk.launch(splat, m, (src, in_scale, lat.run_bounds, lat.n_runs, _i64(m),
                                                    _i32(lanes), lat.sorted_pixel, lat.sorted_weight, None, a, None),
                      lanes)
        else:
            partial = self._partial[: lat.n_runs_max * c]  # (R, c)
            bk.launch(splat, lat.n_runs_max, (src, in_scale, lat.run_bounds, lat.n_runs,
                                                                 _i64(lat.n_runs_max), _i32(lanes), lat.sorted_pixel,
                                                                 lat.sorted_weight, lat.run_vertex, a, partial),
                      lanes)
            bk.launch("lattice_splat_reduce" + suffix, m, (partial, lat.run_offset, _i64(m), _i32(lanes), a), lanes)
        for axis in range(d + 1):
            bk.launch("lattice_blur" + suffix, m, (a, b, lat.neighbours[axis], _i64(m), _i32(lanes), _i32(seq)),
                      lanes)
            a, b = b, a
        return a, b

    # -- stage 2: mean-field iterations -----------------------------------------------------------

    def iterate(self, *, graph: bool = False) -> None:
        """Run the mean-field iterations; with `graph`, launch one captured CUDA graph per
        iteration instead of its ~16 kernels (less launch overhead, same arithmetic)."""
        if not self.lattices:
            return  # no pairwise term: every iteration gives softmax(-U) again
        if graph and hasattr(self.bk, "capture"):
            recorded = self.bk.capture(self._iteration)
            for _ in range(self.params.iterations):
                self.bk.replay(recorded)
        else:
            for _ in range(self.params.iterations):
                self._iteration()

    def _iteration(self) -> None:
        symmetric = self.params.normalization == "symmetric"
        blurred = {}
        for lat in self.lattices:  # Gaussian, then bilateral
            blurred[lat.spec.d], _ = self._splat_blur(lat, self.q, self.ld, in_scale=lat.norm if symmetric else None,
                                                      seq=self._seq)
        # Q is read by the splats above and only then rewritten.
        self._slice_softmax(blurred)

    @property
    def _seq(self) -> bool:
        return self.n_labels <= 2  # pydensecrf filters 1 or 2 labels with its scalar code, more with SSE

    def _slice_softmax(self, blurred: dict[int, Any] | None) -> None:
        """Q = softmax(-U + the Potts messages of the lattices in `blurred` {d: blurred values});
        with None, Q0 = softmax(-U)."""
        n, c = self.n_pixels, self.n_labels
        slots = {2: [None, None, None, None, _f32(0), _f32(0)], 5: [None, None, None, None, _f32(0), _f32(0)]}
        for lat in self.lattices if blurred else []:
            d = lat.spec.d
            slots[d] = [blurred[d], lat.entry_vertex, lat.entry_weight, lat.norm, alpha(d), _f32(lat.spec.weight)]
        args = (self.neg_unary, _i64(n), _i32(c), _i32(self.n_vec), _i32(self._seq), *slots[2], *slots[5], self.q)
        self.bk.launch("mf_slice_softmax_v4", n, args, self.group)

    # -- stage 3: back to (C, H, W) per image ----------------------------------------------------

    def result(self) -> list[Any]:
        bk, xp, c = self.bk, self.bk.xp, self.n_labels
        outs = []
        for b, (h, w) in enumerate(self.sizes):
            out = xp.empty((c, h, w), dtype=xp.float32)
            bk.launch("mf_to_planes_rows", h * w, (self.q, _i64(h * w), _i32(c), _i64(self.offsets[b]),
                                                   _i32(self.n_vec), out))
            outs.append(out)
        return outs

    def run(self, *, graph: bool = False) -> list[Any]:
        self.prepare()
        self.iterate(graph=graph)
        return self.result()


def dense_crf_cuda_batch(images: Sequence[Any], probs: Sequence[Any],
                         params: CRFParams = CRFParams()) -> list[Any]:
    """Refine a batch on the current CUDA device and CuPy stream.

    Args:
        images: CuPy uint8 arrays (H, W, 3), RGB; sizes may differ.
        probs: CuPy float32 arrays (C, H, W), softmax probabilities; C the same for all.
        params: kernel parameters, iterations and normalization.

    Returns:
        CuPy float32 arrays (C, H, W): the mean-field marginals Q after `params.iterations`.
    """
    return CudaCRF(images, probs, params).run()
