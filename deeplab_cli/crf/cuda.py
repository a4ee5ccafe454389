"""The dense CRF on CUDA: permutohedral lattice and mean field as CuPy raw kernels.

The CUDA C++ lives in `kernels/*.cu` (shipped as package data `deeplab_cli.kernels`) and is
compiled once per process and device with NVRTC through `cupy.RawModule`. Everything runs on
the current CuPy stream; the host waits on the device once per batch, to learn the lattices' size.

How one batch goes (all images of a batch share each lattice; keys carry the image index, and
both lattices share one set of arrays, so each step below is one launch for both):
  1. unary: -U = log(clip(p, 1e-5, 1)) into (N, ld) rows, Q = softmax(-U);
  2. build: elevate every pixel to its d+1 simplex corners on the Gaussian (d = 2) and the
     bilateral (d = 5) lattice (keys and barycentric weights, bit-identical to pydensecrf);
     one sort of all keys (the lattice index tops each key; each entry's slot below the key
     fields when one 64-bit word holds both, so the keys sort in place, else an argsort that
     keeps slot order within a vertex); mark and number unique vertices; per-entry vertex ids
     and per-vertex runs for the splat; the neighbour table along the d+1 axes; then each
     lattice's norm = K 1 through the same filter. An image whose H*W is not a multiple of 4
     also gets the origin's d+1 corners as vertices, as in pydensecrf (its 4-wide build pads
     the last group with all-zero features). The host waits once, for the vertex count;
     scalars go as kernel arguments, the small constant table is uploaded once per geometry;
  3. each iteration (6 launches, or a CUDA graph of them replayed): splat both lattices (gather over
     each vertex's entries, no atomics), reduce the vertices cut into several runs, blur in
     three launches (Jacobi, double buffer; each takes the Gaussian lattice's next axis and the
     bilateral lattice's next two); then one kernel slices both, adds the normalized Potts
     messages to -U and takes the softmax over labels, a lane group per pixel (a lane per
     float4 of labels; `pack_lanes`: groups side by side in the warp, 5 groups of 6 lanes for
     21 labels, the softmax's shuffle trees giving the same sums as a power-of-two group's).
Per-pixel and per-vertex label rows are padded to a multiple of 4 floats (pad columns stay 0)
so every pass moves them as float4; each label's arithmetic is pydensecrf's.

The sort numbers the vertices image by image and the bilateral ones by spatial tile
(`spatial_order`; with the key's colour coordinates on top instead, neighbouring ids lie all
over the image), so the pixels a wave of splat threads gathers, and the neighbours a blur pass
reads, lie close together and stay in L2 at large sizes. Each blur launch does two of the
bilateral lattice's passes (`pair_blur`): the first pass's result at a vertex and at its two
neighbours along the second axis is worked out from the same rows, so its values are written
once per two passes (pairing the dense Gaussian lattice's passes too measured slower: 14.9
instead of 13.8 ms of blur at 4 MP on an H200). With
`gauss_grid=True` the Gaussian lattice, whose vertices depend on pixel positions only, is also
indexed by its regular grid of cells and its neighbours come from the grid instead of a binary
search. Each option gives bit-identical results; `benchmarks/crf.py --ab` times them.

`gauss_stencil=True` (off by default until timed on a GPU) builds no Gaussian lattice at all: its
whole filter (splat, three blur passes, slice) with the norms and the Potts weight folded in is
one row of weights per pixel over the pixels within 4 sigma, worked out once per batch from the
pixels' simplex corners and a grid of the lattice cells that are vertices (gauss_corners,
gauss_stencil: no sort, no vertex ids), and the slice kernel gathers the Gaussian message from
the previous iteration's Q around each pixel (Q alternates between two buffers). Only the
bilateral lattice is sorted, and only it goes through memory each iteration. Its sums run in
another order, so it equals pydensecrf up to float rounding instead of bit for bit. A lane
group of the slice takes a strip of `stencil_strip` pixels one above the other, whose windows
share most rows: the weights lie in the order the strip reads them (a vector of the strip's
weights per window slot, 0 where a pixel's window lacks the row) and Q's buffers have zeroed
guard rows, so the gather is loads and fused multiply-adds with no branches or bounds checks.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.resources
import math
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from deeplab_cli.crf.geometry import (KernelSpec, alpha, check_size, corner_margin, kernel_specs, key_bounds,
                                      lattice_key, scale_factors, scaled_feature_bounds)
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError

KERNEL_FILES = ("permutohedral.cu", "meanfield.cu")
# The strip heights the stencil slice kernel is built for (meanfield.cu mf_slice_stencil_k<S>):
# a lane group takes S pixels one above the other and loads their shared window rows once.
STENCIL_STRIPS = (1, 2, 4)
KERNELS = {
    "permutohedral.cu": (
        "lattice_elevate", "lattice_mark", "lattice_vertices", "lattice_entries", "lattice_neighbours",
        "lattice_run_counts", "lattice_runs", "norm_splat", "norm_splat_reduce", "norm_blur", "norm_blur_pair",
        "lattice_norms", "lattice_splat", "lattice_splat_reduce", "lattice_blur", "lattice_blur_pair", "gauss_grid",
        "gauss_neighbours", "gauss_corners", *(f"gauss_stencil_r{r}" for r in range(5)), "gauss_stencil_scale",
    ),
    "meanfield.cu": ("mf_unary_rows", "mf_slice_softmax_v4", *(f"mf_slice_stencil_k{s}" for s in STENCIL_STRIPS),
                     "mf_to_planes_rows"),
}
# No multiply-add contracted into a fused one: the lattice must round exactly as pydensecrf's SSE
# code. (The Gaussian stencil's gather, which matches pydensecrf only up to rounding anyway, asks
# for its fused ones by name: __fmaf_rn.)
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false")
NVCC_OPTIONS = ("--std=c++14", "--fmad=false")

UNARY_CLIP = 1e-5  # U = -log(clip(p, 1e-5, 1)), as pydensecrf.utils.unary_from_softmax
# Splat runs: a vertex with at most this many entries is summed by one thread per label in one
# go; longer ones in two levels: runs of max(this, about sqrt(entries)) entries each, then the
# vertex's runs. Short runs keep the threads of a warp (neighbouring vertices) equally busy.
RUN_MIN = 16
_BLOCK = 256
# gauss_grid and gauss_stencil index the Gaussian lattice's box of cells only while its cell
# slots stay within this many per pixel (photos have about 3: 2.9 at 500x375, 2.8 at 4 MP), plus
# a few for any small batch; else the Gaussian lattice goes the sparse way (the same result).
_GAUSS_GRID_SLOTS_PER_PIXEL = 8
_GAUSS_GRID_SLOTS_FREE = 1 << 16
# gauss_stencil is used up to this window radius (R = 4: 81 floats a pixel, sigma up to 1.25;
# permutohedral.cu has a gauss_stencil_r<R> for each, and meanfield.cu's gather a case); a wider
# Gaussian has fewer lattice vertices per pixel and goes through its lattice.
STENCIL_RADIUS_MAX = 4
STENCIL_BLOCK_ROWS = 128  # pixels a block of gauss_stencil takes (its shared memory holds their rows)
_CONSTANTS_KEPT = 64  # constant tables a backend keeps on the device
GRAPH_MODES = ("off", "iteration", "all")  # how CudaCRF.iterate launches the iterations


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
# Key packing, decided on the host from image sizes and parameters alone (no device sync)


def q_ranges(spec: KernelSpec, height: int, width: int) -> list[tuple[int, int]]:
    """Inclusive range of each stored q_i (coordinate = q_i * (d+1) + remainder) over any image
    of this size, with one spare step each side: what the key packing and the Gaussian cell
    grid both span."""
    return [(lo // (spec.d + 1) - 1, hi // (spec.d + 1) + 1) for lo, hi in key_bounds(spec, height, width)]


def pack_layout(spec: KernelSpec, height: int, width: int, n_images: int, *, spread: bool = False,
                spatial: bool = False, reserve: int = 0) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """How one lattice's keys pack into 64-bit words, the lattice field left out: (word, shift,
    bits, lo) per field (remainder, image, q_0 .. q_{d-1}, with coordinate = q * (d+1) +
    remainder; for the bilateral lattice then its spatial tile x and y, see tile_layout), the
    word count (1 or 2) and the bits used in the last word.

    Fields are placed from the least significant bit up: remainder, image, q_0 .. q_{d-1} (the
    tile fields empty). With `spatial`, remainder, q_0 .. q_{d-1}, tile x, tile y, image: the
    sort then numbers vertices image by image and, on the bilateral lattice, tile by tile, so
    vertices near each other in the image get nearby ids (the result is the same either way).
    There the bilateral key holds the point's position instead of q_0 and q_1 (permutohedral.cu
    pack_coords): its fields 3 and 4 take the low bits of X and Y within their tile, the tile
    fields the rest, so the position is stored once (about 10 bits shorter than q_0, q_1 and
    tiles side by side).
    `spread` puts the last field in a second word even when one would do (tests use it).
    `reserve`: the first word's low bits left free (for a slotted key's slot, see CudaCRF).
    """
    fields = {1: (spec.d.bit_length(), 0), 2: (max(n_images - 1, 0).bit_length(), 0)}
    for k, (q_lo, q_hi) in enumerate(q_ranges(spec, height, width)):
        fields[3 + k] = ((q_hi - q_lo).bit_length(), q_lo)
    if spec.d == 5:
        tiles = tile_layout(spec, height, width) if spatial else _NO_TILES
        for k, (_, shift, count) in enumerate(tiles):
            fields[3 + spec.d + k] = (max(count - 1, 0).bit_length(), 0)
            if spatial:
                fields[3 + k] = (shift, 0)  # the position within its tile instead of q_k
    coords, tiles = list(range(3, 3 + spec.d)), [i for i in (3 + spec.d, 4 + spec.d) if i in fields]
    order = [1, *coords, *tiles, 2] if spatial else [1, 2, *coords, *tiles]
    last = [index for index in order if fields[index][0]][-1]
    table, word, shift = [None] * len(fields), 0, reserve
    for index in order:
        bits, lo = fields[index]
        if bits == 0:
            table[index - 1] = (0, 0, 0, lo)  # never shift by 64: empty fields sit at bit 0
            continue
        if shift + bits > 64 or (spread and index == last and word == 0):
            word, shift = word + 1, 0
        if word > 1:
            raise DeeplabError(f"CRF: {spec.name} lattice keys do not fit 128 bits")
        table[index - 1] = (word, shift, bits, lo)
        shift += bits
    return table, word + 1, shift


# Spatial tiles of the bilateral lattice (pack_layout's `spatial`): a lattice point k (k_5 =
# -(k_0 + ... + k_4)) with k_i = q_i (d+1) + remainder lies at X = q_0 - q_1 and Y = q_0 + q_1 -
# 2 q_2, in lattice spacings; a pixel's own elevated point at X = 2 cf_x / (d+1), Y = 6 cf_y /
# (d+1), cf the scaled position features. A tile is 2^TILE_SHIFTS spacings across in x and in y
# (4 and 8) whatever the standard deviations: about 3.5 sigma_xy pixels wide, 4 tall. At most
# TILE_COUNT_MAX tiles a side keep the fields short for tiny sigmas.
TILE_SHIFTS = (2, 3)
TILE_COUNT_MAX = 256
_NO_TILES = ((0, -1, 0), (0, -1, 0))  # key order: no position fields (shift -1), no tiles


def tile_layout(spec: KernelSpec, height: int, width: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(lo, shift, count) of the bilateral lattice's position X and Y (lattice spacings): tile =
    (X - lo) >> shift, the low `shift` bits the position within the tile.

    Every simplex corner of a pixel lies within corner_margin(d) of the pixel's elevated point
    in each coordinate (as key_bounds allows), and that point has (d+1) X = 2 cf_x in [0, 2 cf_x
    max], (d+1) Y = 6 cf_y in [0, 6 cf_y max]; so (d+1) X and (d+1) Y of any vertex fall in
    those ranges widened by 2 and 4 margins. A point outside them is no vertex, so a neighbour
    lookup there finds none, as it should."""
    d = spec.d
    margin = corner_margin(d)
    cf_x, cf_y = scaled_feature_bounds(spec, height, width)[:2]
    spans = ((-2 * margin, math.ceil(2 * cf_x) + 2 * margin), (-4 * margin, math.ceil(6 * cf_y) + 4 * margin))
    out = []
    for (lo, hi), shift in zip(spans, TILE_SHIFTS):
        lo, hi = -(-lo // (d + 1)), hi // (d + 1)  # the multiples of d+1 in [lo, hi], over d+1
        while ((hi - lo) >> shift) + 1 > TILE_COUNT_MAX:
            shift += 1
        out.append((lo, shift, ((hi - lo) >> shift) + 1))
    return out[0], out[1]


def gauss_cells(spec: KernelSpec, height: int, width: int) -> tuple[int, int]:
    """The box of Gaussian lattice cells (q0, q1) an image of this size can reach, as the key
    packing bounds them (origin at the packed q_lo): (span0, span1)."""
    assert spec.d == 2
    (lo0, hi0), (lo1, hi1) = q_ranges(spec, height, width)
    return hi0 - lo0 + 1, hi1 - lo1 + 1


def pack_layouts(specs: Sequence[KernelSpec], height: int, width: int, n_images: int, *, spread: bool = False,
                 spatial: bool = False, reserve: int = 0) -> tuple[list[np.ndarray], int]:
    """Key packing of every lattice of a batch sharing one sort: per lattice int32 (word, shift,
    bits, lo) per field (lattice, remainder, image, q_0 .. q_{d-1}, and on the bilateral lattice
    tile x, tile y), and the shared word count (`spread`, `spatial`, `reserve`: as pack_layout's).
    The lattice index is the most significant field (the top bits of the last word, laid out
    alike in every table), so sorted keys group by lattice, lattice 0 first."""
    layouts = [pack_layout(s, height, width, n_images, spread=spread, spatial=spatial, reserve=reserve) for s in specs]
    lattice_bits = max(len(specs) - 1, 0).bit_length()
    words = max((w for _, w, _ in layouts), default=1)
    if any(w == words and used + lattice_bits > 64 for _, w, used in layouts):
        words += 1  # no room left at the top of the last word: the lattice field gets its own
    if words > 2:
        raise DeeplabError("CRF: lattice keys do not fit 128 bits")
    lattice = (words - 1, 64 - lattice_bits, lattice_bits, 0) if lattice_bits else (0, 0, 0, 0)
    return [np.array([lattice, *t], dtype=np.int32).reshape(-1) for t, _, _ in layouts], words


# The constant table lattice_elevate and friends read (int32; offsets as CONST_* in
# permutohedral.cu): Gaussian and bilateral key packing, the bilateral position's (lo, shift)
# in x and y (tile_layout; shift -1 in key order), then float32 stds and scales.
_CONST_PACK = {2: 0, 5: 20}
_CONST_TILE = 60
_CONST_STD = {2: 64, 5: 68}
_CONST_SCALE = {2: 66, 5: 73}
_CONST_SIZE = 78


def constant_table(specs: Sequence[KernelSpec], height: int, width: int, n_images: int, *, spread: bool = False,
                   spatial: bool = False, reserve: int = 0) -> tuple[np.ndarray, int]:
    """The (78,) int32 constant table of a batch's lattices (read-only: one per geometry, kept
    for the next batch of that size) and their key word count (pack_layouts' options)."""
    return _constant_table(tuple(specs), height, width, n_images, spread, spatial, reserve)


@functools.lru_cache(maxsize=_CONSTANTS_KEPT)
def _constant_table(specs: tuple[KernelSpec, ...], height: int, width: int, n_images: int, spread: bool,
                    spatial: bool, reserve: int) -> tuple[np.ndarray, int]:
    tables, words = pack_layouts(specs, height, width, n_images, spread=spread, spatial=spatial, reserve=reserve)
    table = np.zeros(_CONST_SIZE, dtype=np.int32)
    floats = table.view(np.float32)
    for spec, pack in zip(specs, tables):
        table[_CONST_PACK[spec.d]:_CONST_PACK[spec.d] + len(pack)] = pack
        if spec.d == 5:  # shift -1: no position fields (key order)
            (x_lo, x_shift, _), (y_lo, y_shift, _) = tile_layout(spec, height, width) if spatial else _NO_TILES
            table[_CONST_TILE:_CONST_TILE + 4] = (x_lo, x_shift, y_lo, y_shift)
        floats[_CONST_STD[spec.d]:_CONST_STD[spec.d] + spec.d] = np.array(spec.stds, dtype=np.float32)
        floats[_CONST_SCALE[spec.d]:_CONST_SCALE[spec.d] + spec.d] = scale_factors(spec.d)
    for d in (2, 5):  # the lattice field reads alike through either table
        table[_CONST_PACK[d]:_CONST_PACK[d] + 4] = tables[0][:4]
    table.flags.writeable = False
    return table, words


def key_table(specs: Sequence[KernelSpec], height: int, width: int, n_images: int, *, spread: bool = False,
              spatial: bool = False, slots: bool = True) -> tuple[np.ndarray, int, int]:
    """constant_table for a batch's build and its slot bits: with `slots`, the keys' fields
    above room for every slot of the batch (each pixel and each image's padding origin) when
    one word holds both, else (or without `slots`) the fields alone and 0 slot bits."""
    slot_bits = (n_images * (height * width + 1) - 1).bit_length() if slots else 0
    table, words = constant_table(specs, height, width, n_images, spread=spread, spatial=spatial, reserve=slot_bits)
    if words > 1 and slot_bits:
        slot_bits = 0
        table, words = constant_table(specs, height, width, n_images, spread=spread, spatial=spatial)
    return table, words, slot_bits


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
        self._constants: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def launch(self, name: str, rows: int, args: Sequence[Any], width: int = 1, block_rows: int = 0) -> None:
        """Run kernel `name` over `rows` rows of `width` lanes each (labels; 32 for a warp per
        row): blocks of (width, rows) threads (`block_rows` rows when given, for kernels that
        size their shared memory by it), the kernels' grid-stride loops cover any grid."""
        if rows <= 0:
            return
        lanes = min(width, _BLOCK)
        per_block = block_rows or max(1, _BLOCK // lanes)
        grid = min((rows + per_block - 1) // per_block, self.max_blocks)
        self.functions[name]((grid,), (lanes, per_block), tuple(self._null if a is None else a for a in args))

    def constant(self, key: Any, host: np.ndarray) -> Any:
        """`host` on the device, uploaded once per `key` while among the last _CONSTANTS_KEPT
        keys used (a folder of photos has a handful of sizes, or a new one per photo)."""
        if key in self._constants:
            self._constants.move_to_end(key)
        else:
            self._constants[key] = self.xp.asarray(host)
            while len(self._constants) > _CONSTANTS_KEPT:
                self._constants.popitem(last=False)
        return self._constants[key]

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
        """Device memory the CRF can still get: free on the device, plus what CuPy's pool and
        (when torch is in use: the dispatcher routes CuPy through torch's caching allocator
        for torch inputs) torch's cache hold unused."""
        import sys

        import cupy

        free = int(cupy.cuda.runtime.memGetInfo()[0]) + int(cupy.get_default_memory_pool().free_bytes())
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            device = cupy.cuda.Device().id
            free += int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        return free


_backends: dict[int, CupyBackend] = {}


def cupy_backend() -> CupyBackend:
    """The backend of the current CUDA device, made once per process and device."""
    import cupy

    device = cupy.cuda.Device().id
    with _modules_lock:
        backend = _backends.get(device)
    if backend is None:
        backend = CupyBackend()
        with _modules_lock:
            backend = _backends.setdefault(device, backend)
    return backend


_i32, _i64, _f32 = np.int32, np.int64, np.float32


@dataclasses.dataclass
class Lattices:
    """A batch's lattices (lattice 0 the Gaussian when present, then the bilateral) in shared
    device arrays: lattice l owns vertices [first[l], first[l+1]) and entries (slot corners)
    [entry_first[l], entry_first[l+1]), which are also its sorted positions."""

    specs: list[KernelSpec]
    first: list[int]  # L+1 vertex bounds; first[L] = M
    entry_first: list[int]  # L+1 entry bounds; entry_first[L] = E
    entry_vertex: Any  # (E,) int32: each slot corner's vertex
    entry_weight: Any  # (E,) float32 barycentric weights
    sorted_pixel: Any  # (E,) int32 pixel of each sorted entry, -1 for padding origins
    sorted_weight: Any  # (E,) float32
    run_bounds: Any  # (R+1,) int32 splat runs over the sorted entries
    n_runs: Any  # (1,) int32 on the device: R
    n_runs_max: int  # host bound on R, for launch sizes
    run_offset: Any  # (M+1,) int32 first run of each vertex
    run_vertex: Any  # (R,) int32 vertex of a run that is all of its vertex, else -1
    multi: Any  # (K,) int32 the vertices of several runs, ascending
    n_multi: Any  # (1,) int32 on the device: K
    n_multi_max: int  # host bound on K, for launch sizes
    neighbours: Any  # (d_max+1, M, 2) int32, -1 = missing (axes past a lattice's d unused)
    norms: list[Any] = dataclasses.field(default_factory=list)  # per lattice (N,) float32
    values: tuple[Any, Any] = (None, None)  # two (M, ld) float32 buffers: the splat/blur double buffer

    @property
    def n_vertices(self) -> int:
        return self.first[-1]

    def corners(self, l: int) -> tuple[Any, Any]:
        """Lattice l's (slots, d+1) vertex ids and weights, flat."""
        lo, hi = self.entry_first[l], self.entry_first[l + 1]
        return self.entry_vertex[lo:hi], self.entry_weight[lo:hi]

    def blur_plan(self) -> list[tuple[int, int, int, list[int]]]:
        """Blur passes, one a launch: (axis, v0, v1, lattices whose d+1 passes end here).
        Lattices are in ascending d, so the vertices having an axis are one range."""
        lattices = range(len(self.specs))
        plan = []
        for axis in range(max((spec.d for spec in self.specs), default=-1) + 1):
            having = [l for l in lattices if self.specs[l].d >= axis]
            done = [l for l in lattices if self.specs[l].d == axis]
            plan.append((axis, self.first[having[0]], self.first[having[-1] + 1], done))
        return plan

    def pair_plan(self) -> list[tuple[tuple[int | None, int | None, int | None], int, int, int, list[int]]]:
        """lattice_blur_pair's launches: ((axis_s, axis_a, axis_b), v0, vb, v1, lattices whose
        passes end here). Launch k takes the Gaussian lattice's (d = 2, dense) axis k alone on
        [v0, vb) and the bilateral lattice's axes 2k and 2k+1 together on [vb, v1): three
        launches for the 3 + 6 passes. None: no such axis in this launch."""
        gauss = [l for l, spec in enumerate(self.specs) if spec.d == 2]
        other = [l for l, spec in enumerate(self.specs) if spec.d != 2]
        assert gauss in ([], [0]) and len(other) <= 1, "the Gaussian lattice, if any, is lattice 0"
        if not gauss and not other:
            return []
        d_s = self.specs[0].d if gauss else -1
        d_p = self.specs[other[0]].d if other else -1
        plan = []
        for k in range(max(d_s + 1, (d_p + 2) // 2)):
            axis_s = k if k <= d_s else None
            axis_a = 2 * k if 2 * k <= d_p else None
            axis_b = 2 * k + 1 if 2 * k + 1 <= d_p else None
            v0 = self.first[0] if axis_s is not None else self.first[other[0]]
            vb = self.first[1] if axis_s is not None else v0
            v1 = self.first[other[0] + 1] if axis_a is not None else vb
            done = [0] * (axis_s == d_s) + other * (d_p in (axis_a, axis_b))
            plan.append(((axis_s, axis_a, axis_b), v0, vb, v1, done))
        return plan


def _bytes_before_lattice(n_pixels: int, row: int, words: int, entries_per_pixel: int) -> int:
    """Device bytes for the per-pixel arrays (rows of `row` floats), the lattices' entry tables
    and the peak of building them (E = entries_per_pixel * N); vertex-sized arrays come later."""
    per_pixel = 2 * n_pixels * row * 4 + 3 * n_pixels * 4  # -U, Q; norms
    e = entries_per_pixel * n_pixels
    entries = 16 * e  # vertex id, weight, sorted pixel, sorted weight
    # keys, order (int64), the sort's copies and scratch, flags, scan, starts, unique keys
    build = e * (2 * 8 * words + 3 * 8 + 4 * 3 + 8 * words)
    return per_pixel + entries + build


def _gauss_grid_bytes(spec: KernelSpec, height: int, width: int, n_images: int) -> int:
    span0, span1 = gauss_cells(spec, height, width)
    return 4 * 3 * span0 * span1 * n_images


def _bytes_after_lattice(lat: Lattices, row: int) -> int:
    m, runs = lat.n_vertices, lat.n_runs_max
    return 4 * (2 * m + runs) * row + 4 * 2 * runs  # value buffers, partial rows; run bounds and vertices


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class CudaCRF:
    """Mean-field inference for one batch on the GPU, in stages (`prepare`, `iterate`,
    `result`) so benchmarks can time the lattice build and the iterations apart."""

    def __init__(self, images: Sequence[Any], probs: Sequence[Any], params: CRFParams = CRFParams(),
                 backend: Any = None, *, spread_keys: bool = False, run_min: int = RUN_MIN,
                 gauss_grid: bool = False, spatial_order: bool = True, pair_blur: bool = True,
                 gauss_stencil: bool = False, stencil_strip: int = 2, pack_lanes: bool = True,
                 slot_keys: bool = True) -> None:
        """`spatial_order`: number the vertices image by image and the bilateral ones by
        spatial tile (pack_layout's `spatial`), so the vertices a splat, blur or slice touches
        at once lie near each other in memory and the pixels they read stay in L2. `pair_blur`:
        two blur passes a launch (lattice_blur_pair, and norm_blur_pair for the norms), one
        write of the values per two passes.
        `gauss_grid`: find the Gaussian lattice's neighbours by indexing its regular grid of
        cells instead of by binary search. Each is bit-identical either way (benchmarks/crf.py
        --ab times them). `gauss_stencil`: fold the Gaussian lattice's whole filter, norms and
        weight into one row of weights per pixel over a window of its neighbours
        (gauss_stencil in permutohedral.cu), worked out once per batch without building that
        lattice, and gather the Gaussian message from the previous Q in the slice kernel; only
        the bilateral lattice is built and filtered. It applies while the window radius (below
        4 sigma) is at most STENCIL_RADIUS_MAX, the box of Gaussian lattice cells is not much
        larger than the batch, and its memory is free, and equals pydensecrf up to float
        rounding (the sums run in another order), not bit for bit. `stencil_strip` (one of
        STENCIL_STRIPS): pixels one above the other that a lane group of the stencil's slice
        takes together, loading the Q rows their windows share once (fewer loads, but more
        weights to read: 2R + S window rows of S each a strip); the same result for each.
        `pack_lanes`: the slice kernel's lane groups (one per pixel or strip, a lane per float4
        chunk of labels) lie side by side in a warp (5 groups of 6 lanes for 21 labels), instead
        of one to each power-of-two slice of the warp (4 of 8, 2 lanes of each idle); the same
        result either way. `slot_keys`: when the keys' fields leave room in one 64-bit word for
        each entry's slot (pixel) below them, put it there and sort the keys themselves in place
        (unique, so the plain sort gives the stable order) instead of argsorting them: half the
        bytes a radix pass moves, and the steps after it read keys in order instead of through
        the permutation; the same result either way. `spread_keys` and `run_min` exist for tests
        and benchmarks."""
        self.bk = backend if backend is not None else cupy_backend()
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
        check_size(self.max_h, self.max_w, params, n_images=len(self.images))
        # Lattice 0 the Gaussian (d = 2), lattice 1 the bilateral (d = 5), when their weights are not 0.
        self.specs = [s for s in kernel_specs(params) if s.weight != 0] if params.iterations > 0 else []
        self.spread_keys = spread_keys
        self.slot_keys = bool(slot_keys)
        # Label rows padded to whole float4s (pad columns 0), moved 16 bytes at a time.
        self.n_vec = -(-self.n_labels // 4)
        self.ld = 4 * self.n_vec
        # The slice/softmax kernel's lanes: a row of `lanes` (a warp, or unpacked the power of two
        # that holds a group) holds lanes // group groups of `group` lanes, one per pixel (or
        # strip): one lane a float4 chunk, at most a warp (meanfield.cu mf_group).
        self.lanes = 32 if pack_lanes else min(32, 1 << max(self.n_vec - 1, 0).bit_length())
        self.group = min(self.n_vec, self.lanes)
        self.run_min = run_min
        self.gauss_grid = bool(gauss_grid)
        self.spatial_order = bool(spatial_order)
        self.pair_blur = bool(pair_blur)
        self.gauss_stencil = bool(gauss_stencil)
        if stencil_strip not in STENCIL_STRIPS:
            raise ValueError(f"stencil_strip must be one of {STENCIL_STRIPS}, got {stencil_strip!r}")
        self.stencil_strip = stencil_strip
        # The lattices built: all kernels', or the bilateral alone when the Gaussian is a stencil.
        self.lattice_specs = self.specs
        self.lattices: Lattices | None = None
        self.q = self.neg_unary = None
        # The launches of an iteration, (backend method, its arguments); with the stencil two
        # plans, for even and odd iterations, as Q alternates between two buffers.
        self._plans: list[list[tuple[Any, tuple]]] = [[]]
        # the Gaussian stencil's weights, when used: float32 (2R + S, 2R + 1, strips, S) for radius R
        # and strips of S = stencil_strip pixels (permutohedral.cu stencil_index)
        self._stencil: Any = None
        self._stencil_info: Any = None  # the build's info: [0] = 1 if a Gaussian corner fell outside its cell box
        self._q_pair: tuple[Any, Any] | None = None  # with the stencil: Q's two buffers
        # with the stencil: each image's first pixel, first strip (of stencil_strip pixels), width
        self._image_start = self._strip_start = self._image_width = None
        self._consts: tuple[Any, int, int] | None = None

    # -- stage 1: unary, Q0, lattices and their norms ------------------------------------------

    def prepare(self) -> None:
        bk, xp = self.bk, self.bk.xp
        n, c, ld = self.n_pixels, self.n_labels, self.ld
        free = bk.free_bytes()
        radius = self._stencil_radius
        if radius is not None:  # the Gaussian as a stencil, the lattice for the bilateral alone
            self.lattice_specs = self.specs[1:]
            if self._bytes_before_lattice() + self._stencil_bytes(radius) > free:
                radius, self.lattice_specs = None, self.specs  # no room: the Gaussian goes through its lattice
        need = self._bytes_before_lattice()
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
        if radius is None:
            self.q = xp.empty((n, ld), dtype=xp.float32)
        else:  # two buffers, with zeroed guard rows for the stencil windows reaching past the batch
            guard = self._q_guard(radius)
            self._q_pair = tuple(xp.zeros((n + 2 * guard, ld), dtype=xp.float32)[guard:guard + n] for _ in range(2))
            self.q = self._q_pair[0]
        bk.launch(*self._slice_softmax(None))
        # What the build tells the host, read at its one wait: INFO_ERROR (a lattice key or a
        # Gaussian corner outside its packed range: a bug), INFO_VERTICES, INFO_FIRST + l.
        info = xp.zeros(2 + len(self.lattice_specs), dtype=xp.int32)
        if radius is not None:
            self._build_stencil(radius, info)
        if self.lattice_specs:
            lat = self.lattices = self._build(info)
            need = _bytes_after_lattice(lat, ld)
            free = bk.free_bytes()
            if need > free:
                raise DeeplabError(
                    f"CRF: the lattices have {lat.n_vertices} vertices; filtering {c} labels needs about "
                    f"{_gib(need)} more GPU memory, {_gib(free)} free; use smaller or fewer images"
                )
            m = lat.n_vertices
            lat.values = (xp.empty((m, ld), dtype=xp.float32), xp.empty((m, ld), dtype=xp.float32))
            self._partial = xp.empty((lat.n_runs_max, ld), dtype=xp.float32)  # (R, ld)
            self._norms()
        elif radius is not None:  # the stencil alone: its own wait
            self._check_stencil(info)
        if self.specs:
            self._plan_iteration()

    def reweight(self, params: CRFParams) -> None:
        """After `prepare` (and any iterations), start over under `params`, which may differ
        from this batch's own only in the kernel weights and the iterations: Q back to Q0,
        the new weights bound into the iteration's launches, the lattices and their norms
        kept (the Gaussian stencil, which holds its weight, is worked out again). `iterate`
        and `result` then give what a new CudaCRF for `params` would, bit for bit."""
        if self.q is None:
            raise RuntimeError("CudaCRF.reweight: call prepare() first")
        if lattice_key(params) != lattice_key(self.params):
            raise ValueError(f"CudaCRF.reweight: {params} needs other lattices than {self.params}")
        self.params = params
        weights = {spec.d: spec.weight for spec in kernel_specs(params)}

        def reweighted(specs: list[KernelSpec]) -> list[KernelSpec]:
            return [dataclasses.replace(spec, weight=weights[spec.d]) for spec in specs]

        self.specs, self.lattice_specs = reweighted(self.specs), reweighted(self.lattice_specs)
        if self.lattices is not None:
            self.lattices.specs = self.lattice_specs
        if self._q_pair is not None:
            self.q = self._q_pair[0]
        self.bk.launch(*self._slice_softmax(None))  # Q0 = softmax(-U)
        if self._stencil is not None:
            info = self.bk.xp.zeros(2, dtype=self.bk.xp.int32)
            self._build_stencil(self._stencil_radius, info)
            self._check_stencil(info)
        if self.specs:
            self._plan_iteration()

    def _check_stencil(self, info: Any) -> None:
        """Wait for the stencil's build and raise if its flag in `info` says a Gaussian corner
        fell outside its cell box (a bug: the weights would be wrong)."""
        if self.bk.to_host(info)[0]:
            raise RuntimeError("CRF stencil: a Gaussian corner fell outside its cell box (a bug)")

    def _bytes_before_lattice(self) -> int:
        """Device bytes prepare needs before the vertex count is known (_bytes_before_lattice
        for this batch's lattices, with the Gaussian cell grid when gauss_grid applies)."""
        specs = self.lattice_specs
        words = (constant_table(specs, self.max_h, self.max_w, len(self.images), spread=self.spread_keys,
                                spatial=self.spatial_order)[1] if specs else 1)
        need = _bytes_before_lattice(self.n_pixels, self.ld, words, sum(s.d + 1 for s in specs))
        if self._gridded:
            need += _gauss_grid_bytes(specs[0], self.max_h, self.max_w, len(self.images))
        return need

    def _constants(self) -> tuple[Any, int, int]:
        """The lattices' constant table on the device (uploaded once per geometry), the key word
        count and the slot bits below the keys' fields (0: the keys are argsorted, see
        slot_keys); worked out once per batch."""
        if self._consts is None:
            specs, n_images = self.lattice_specs, len(self.images)
            table, words, slot_bits = key_table(specs, self.max_h, self.max_w, n_images, spread=self.spread_keys,
                                                spatial=self.spatial_order, slots=self.slot_keys)
            key = (tuple(specs), self.max_h, self.max_w, n_images, self.spread_keys, self.spatial_order, slot_bits)
            self._consts = self._upload(key, table), words, slot_bits
        return self._consts

    def _upload(self, key: Any, host: np.ndarray) -> Any:
        """`host` on the device through the backend's constant cache (one upload per `key`)
        when it has one, else copied now."""
        upload = getattr(self.bk, "constant", None)
        return upload(key, host) if upload else self.bk.xp.asarray(host)

    def _build(self, info: Any) -> Lattices:
        """The lattices (lattice_specs) with one sort and one wait on the device (for the vertex
        count, and `info`'s error flag, which the stencil's build may have set already)."""
        bk, xp = self.bk, self.bk.xp
        n, specs = self.n_pixels, self.lattice_specs
        # Images whose pixel count is not a multiple of 4 add one slot each, past all real
        # pixels: the origin, whose corners pydensecrf's padded build inserts.
        padded = [b for b, (h, w) in enumerate(self.sizes) if (h * w) % 4]
        slots = n + len(padded)
        entry_first = np.cumsum([0] + [(s.d + 1) * slots for s in specs]).tolist()
        e = entry_first[-1]
        consts, words, slot_bits = self._constants()
        start_of = {s.d: entry_first[l] for l, s in enumerate(specs)}
        key_lo = xp.empty(e, dtype=xp.uint64)
        key_hi = xp.empty(e, dtype=xp.uint64) if words == 2 else None
        weight = xp.empty(e, dtype=xp.float32)
        for b, im in enumerate(self.images):
            h, w = self.sizes[b]
            pad_slot = n + padded.index(b) if b in padded else -1
            bk.launch("lattice_elevate", h * w + (pad_slot >= 0),
                      (im, _i32(h), _i32(w), _i64(self.offsets[b]), _i32(b), _i64(pad_slot), consts,
                       _i64(start_of.get(2, -1)), _i64(start_of.get(5, -1)), _i32(slot_bits > 0), key_lo, key_hi,
                       weight, info))
        # Each vertex's entries must stay in slot order, pydensecrf's splat order: slotted keys
        # are unique and sort in that order; else stable sorts keep it.
        if slot_bits:
            key_lo.sort()
            order = None
        else:
            order = xp.argsort(key_lo, kind="stable")  # sorted position -> entry, int64
            if key_hi is not None:
                order = order[xp.argsort(key_hi[order], kind="stable")]
        flags = xp.empty(e, dtype=xp.int32)
        bk.launch("lattice_mark", e, (order, key_lo, key_hi, _i64(e), _i32(slot_bits), flags))
        count = xp.cumsum(flags, dtype=xp.int32)  # vertex id + 1 at each sorted position
        starts = xp.empty(e + 1, dtype=xp.int32)
        unique_lo = xp.empty(e, dtype=xp.uint64)
        unique_hi = xp.empty(e, dtype=xp.uint64) if key_hi is not None else None
        bk.launch("lattice_vertices", e, (flags, count, order, key_lo, key_hi, _i64(e), _i32(slot_bits), consts,
                                          starts, unique_lo, unique_hi, info))
        del flags
        entry_vertex = xp.empty(e, dtype=xp.int32)
        sorted_pixel = xp.empty(e, dtype=xp.int32)
        sorted_weight = xp.empty(e, dtype=xp.float32)
        dp1 = [s.d + 1 for s in specs] + [1]
        bk.launch("lattice_entries", e, (order, key_lo, _i32(slot_bits), consts, count, weight, _i64(e),
                                         _i64(entry_first[1]), _i32(dp1[0]), _i32(dp1[1]), _i64(n), entry_vertex,
                                         sorted_pixel, sorted_weight))
        del order, count, key_lo, key_hi
        # The build's one wait on the device: the vertex count sizes everything after.
        err, m, *first = (int(x) for x in bk.to_host(info))
        if err:
            raise RuntimeError("CRF lattice: a key or a Gaussian corner fell outside its packed range (a bug)")
        first = first + [m]
        neighbours = xp.empty((max(s.d for s in specs) + 1, m, 2), dtype=xp.int32)
        searched = 0
        if self._gridded:  # the Gaussian vertices (lattice 0) by cell, and their neighbours from that
            cells = gauss_cells(specs[0], self.max_h, self.max_w)
            grid = xp.full((len(self.images), cells[1], cells[0], 3), -1, dtype=xp.int32)
            bk.launch("gauss_grid", first[1], (unique_lo, unique_hi, _i64(first[1]), consts, _i32(cells[0]),
                                              _i32(cells[1]), grid))
            bk.launch("gauss_neighbours", first[1], (unique_lo, unique_hi, _i64(first[1]), _i64(m), consts,
                                                    _i32(cells[0]), _i32(cells[1]), grid, neighbours))
            searched = first[1]
            del grid
        bk.launch("lattice_neighbours", m - searched,
                  (unique_lo[:m], None if unique_hi is None else unique_hi[:m], _i64(m), _i64(searched),
                   _i64(first[1]), _i32(specs[0].d == 2), consts, neighbours))
        del unique_lo, unique_hi
        # Each vertex's split depends on its own length only, so a batch sums exactly as its
        # images would alone.
        counts = xp.empty(m + 1, dtype=xp.int32)
        several = xp.empty(m, dtype=xp.int32)
        bk.launch("lattice_run_counts", m, (starts, _i64(m), _i32(self.run_min), counts, several))
        run_offset = xp.cumsum(counts, dtype=xp.int32)  # (M+1,)
        multi_pos = xp.cumsum(several, dtype=xp.int32)  # (M,) vertices of several runs up to each
        del counts, several
        n_runs_max = m + e // self.run_min + 1
        # A vertex of several runs has more than run_min entries.
        n_multi_max = max(1, min(m, e // (self.run_min + 1)))
        run_bounds = xp.empty(n_runs_max + 1, dtype=xp.int32)
        run_vertex = xp.empty(n_runs_max, dtype=xp.int32)
        multi = xp.empty(n_multi_max, dtype=xp.int32)
        n_multi = xp.empty(1, dtype=xp.int32)
        bk.launch("lattice_runs", m, (starts, run_offset, multi_pos, _i64(m), _i32(self.run_min), run_bounds,
                                      run_vertex, multi, n_multi))
        del multi_pos
        return Lattices(specs, first, entry_first, entry_vertex, weight, sorted_pixel, sorted_weight, run_bounds,
                        run_offset[m:], n_runs_max, run_offset, run_vertex, multi, n_multi, n_multi_max,
                        neighbours)

    @property
    def _stencil_radius(self) -> int | None:
        """The Gaussian stencil's window radius when gauss_stencil applies: the largest integer
        below 4 sigma (pixels), at most STENCIL_RADIUS_MAX, and the Gaussian cell box small
        enough; else None."""
        if not (self.gauss_stencil and self.specs and self.specs[0].d == 2 and self._gauss_box_fits):
            return None
        radius = math.ceil(4 * self.specs[0].stds[0]) - 1
        return radius if radius <= STENCIL_RADIUS_MAX else None

    def _q_guard(self, radius: int) -> int:
        """Zeroed rows before and after Q's with the stencil: as far as a strip's union window
        reaches past the batch's first or last pixel."""
        return (radius + self.stencil_strip) * (self.max_w + 1)

    def _strip_starts(self) -> np.ndarray:
        """Each image's first stencil strip (stencil_strip pixels one above the other; an image
        has ceil(H / S) * W, row-major, after the previous image's), then the batch's count."""
        s = self.stencil_strip
        return np.cumsum([0] + [-(-h // s) * w for h, w in self.sizes]).astype(np.int64)

    def _stencil_bytes(self, radius: int) -> int:
        """Device bytes of the stencil weights, the second Q buffer, both buffers' guard rows and
        the build's corners, norms and cells."""
        span0, span1 = gauss_cells(self.specs[0], self.max_h, self.max_w)
        cells = 3 * span0 * span1 * len(self.images)  # one byte each
        # per strip: (2R + S) union rows of 2R + 1 weights, S each
        strip = self.stencil_strip
        weights = int(self._strip_starts()[-1]) * (2 * radius + strip) * (2 * radius + 1) * strip
        guards = 2 * 2 * self._q_guard(radius) * self.ld
        # per pixel: Q's second row, its norm, three corners (int2) and their weights
        return 4 * (weights + self.n_pixels * (self.ld + 1 + 3 * 2 + 3) + guards) + cells

    def _build_stencil(self, radius: int, info: Any) -> None:
        """The Gaussian kernel's filter as per-pixel stencil weights, with the norms, alpha and
        the Potts weight folded in, straight from the pixels' corners (gauss_corners, then
        gauss_stencil and gauss_stencil_scale: no Gaussian lattice is built), laid out in strips
        of stencil_strip pixels for the slice kernel."""
        bk, xp, n, n_images = self.bk, self.bk.xp, self.n_pixels, len(self.images)
        spec = self.specs[0]
        table = constant_table([spec], self.max_h, self.max_w, n_images)[0]
        consts = self._upload(("gauss_cells", spec, self.max_h, self.max_w, n_images), table)
        span0, span1 = gauss_cells(spec, self.max_h, self.max_w)
        (lo0, _), (lo1, _) = q_ranges(spec, self.max_h, self.max_w)
        cells = xp.zeros(n_images * span1 * span0 * 3, dtype=xp.uint8)
        corner = xp.empty((3 * n, 2), dtype=xp.int32)
        weight = xp.empty(3 * n, dtype=xp.float32)
        self._stencil_info = info  # [0]: set if a corner falls outside its cell box
        for b, (im, (h, w)) in enumerate(zip(self.images, self.sizes)):
            bk.launch("gauss_corners", h * w, (im, _i32(h), _i32(w), _i64(self.offsets[b]), _i32(b), consts,
                                               _i32(span0), _i32(span1), corner, weight, cells, self._stencil_info))
        strip, strips = self.stencil_strip, self._strip_starts()
        # zeroed: the union rows a pixel's window lacks, and the pixels past an image's last row
        self._stencil = xp.zeros((2 * radius + strip, 2 * radius + 1, int(strips[-1]), strip), dtype=xp.float32)
        norm = xp.empty(n, dtype=xp.float32)
        symmetric = _i32(self.params.normalization == "symmetric")
        scale = np.float32(alpha(spec.d) * np.float32(spec.weight))
        for b, (h, w) in enumerate(self.sizes):  # the scale reads the norms of the image's other pixels
            layout = (_i32(strip), _i64(strips[b]), _i64(strips[-1]))
            bk.launch(f"gauss_stencil_r{radius}", h * w,
                      (_i32(h), _i32(w), _i64(self.offsets[b]), _i32(b), *layout, corner, weight, cells, _i32(span0),
                       _i32(span1), _i32(lo0), _i32(lo1), alpha(spec.d), symmetric, norm, self._stencil),
                      1, STENCIL_BLOCK_ROWS)
            bk.launch("gauss_stencil_scale", h * w, (_i32(h), _i32(w), _i64(self.offsets[b]), _i32(radius), *layout,
                                                     norm, symmetric, scale, self._stencil))
        # the slice kernel finds each strip's image, its pixels and the row step in these
        widths = np.array([w for _, w in self.sizes], dtype=np.int32)
        self._image_start = self._upload(("image_start", tuple(self.sizes)), np.array(self.offsets, dtype=np.int64))
        self._strip_start = self._upload(("strip_start", strip, tuple(self.sizes)), strips)
        self._image_width = self._upload(("image_width", tuple(self.sizes)), widths)

    @property
    def _gauss_box_fits(self) -> bool:
        """Whether the box of Gaussian lattice cells is not much larger than the batch (a long
        strip of an image lies diagonally across the lattice's cells, so its box grows as the
        square of its length): then the cells may be indexed (gauss_grid, gauss_stencil)."""
        span0, span1 = gauss_cells(self.specs[0], self.max_h, self.max_w)
        slots = 3 * span0 * span1 * len(self.images)
        return slots <= _GAUSS_GRID_SLOTS_PER_PIXEL * self.n_pixels + _GAUSS_GRID_SLOTS_FREE

    @property
    def _gridded(self) -> bool:
        """Whether the Gaussian lattice is built and indexed by its grid of cells (gauss_grid)."""
        specs = self.lattice_specs
        return self.gauss_grid and bool(specs) and specs[0].d == 2 and self._gauss_box_fits

    def _blur(self, kernel: str, a: Any, b: Any, extra: tuple, pairs: bool = False) -> tuple[list[tuple], list[Any]]:
        """The blur passes of the lattices from buffer `a` (Jacobi, swapping a and b): their
        launches and each lattice's result buffer. One pass a launch (lat.blur_plan): kernel args (src, dst, nbr, v0,
        v1, *extra); with `pairs`, lattice_blur_pair's launches (lat.pair_plan): args (src, dst,
        nbr_s, nbr_a, nbr_b, v0, vb, v1, *extra)."""
        lat = self.lattices

        def nbr(axis: int | None) -> Any:
            return None if axis is None else lat.neighbours[axis]

        if pairs:
            plan = [((nbr(s), nbr(x), nbr(y), _i64(v0), _i64(vb), _i64(v1)), v1 - v0, done)
                    for (s, x, y), v0, vb, v1, done in lat.pair_plan()]
        else:
            plan = [((nbr(axis), _i64(v0), _i64(v1)), v1 - v0, done) for axis, v0, v1, done in lat.blur_plan()]
        launches, result = [], [None] * len(lat.specs)
        for args, rows, done in plan:
            launches.append((kernel, rows, (a, b, *args, *extra)))
            a, b = b, a
            for l in done:
                result[l] = a
        return launches, result

    def _norms(self) -> None:
        """Each lattice's norm: 1/sqrt(K 1) (symmetric) or 1/K 1 (after), per pixel."""
        bk, xp, lat, n = self.bk, self.bk.xp, self.lattices, self.n_pixels
        m = lat.n_vertices
        a, b = lat.values[0].reshape(-1)[:m], lat.values[1].reshape(-1)[:m]  # (M,) each
        partial = self._partial.reshape(-1)[: lat.n_runs_max]
        bk.launch("norm_splat", lat.n_runs_max, (lat.run_bounds, lat.n_runs, _i64(lat.n_runs_max), lat.sorted_pixel,
                                                 lat.sorted_weight, lat.run_vertex, a, partial))
        bk.launch("norm_splat_reduce", lat.n_multi_max, (partial, lat.run_offset, lat.multi, lat.n_multi,
                                                         _i64(lat.n_multi_max), a))
        kernel = "norm_blur_pair" if self.pair_blur else "norm_blur"
        launches, blurred = self._blur(kernel, a, b, (), self.pair_blur)
        for launch in launches:
            bk.launch(*launch)
        norms = xp.empty((len(lat.specs), n), dtype=xp.float32)  # (L, N)
        lat.norms = list(norms)
        args = {2: [None, None, None, _f32(0), None], 5: [None, None, None, _f32(0), None]}
        for l, spec in enumerate(lat.specs):
            args[spec.d] = [blurred[l], *lat.corners(l), alpha(spec.d), lat.norms[l]]
        bk.launch("lattice_norms", n, (_i64(n), _i32(self.params.normalization == "symmetric"), *args[2], *args[5]))

    def _plan_iteration(self) -> None:
        """The launches of one mean-field iteration, arguments bound once. With the stencil, Q
        alternates between two buffers (the slice reads the old one around each pixel), so
        there are two plans, for even and odd iterations."""
        if self._stencil is None:
            self._plans = [self._iteration_launches(self.q, self.q)]
        else:
            a, b = self._q_pair
            self._plans = [self._iteration_launches(a, b), self._iteration_launches(b, a)]

    @property
    def _launches(self) -> list[tuple[Any, tuple]]:
        """The first iteration's launches."""
        return self._plans[0]

    def _iteration_launches(self, q_in: Any, q_out: Any) -> list[tuple[Any, tuple]]:
        """One iteration from Q in `q_in` to Q in `q_out`: one splat, its reduction and the
        blur passes for the lattices (none when the Gaussian stencil is the only kernel), then
        the fused slice + softmax."""
        lat, nv, launch = self.lattices, self.n_vec, self.bk.launch
        launches, blurred = [], []
        if lat is not None:
            a, b = lat.values
            scales = (lat.norms + [None])[:2] if self.params.normalization == "symmetric" else [None, None]
            launches += [
                (launch, ("lattice_splat", lat.n_runs_max, (q_in, scales[0], scales[1], _i64(lat.entry_first[1]),
                                                            lat.run_bounds, lat.n_runs, _i64(lat.n_runs_max),
                                                            _i32(nv), lat.sorted_pixel, lat.sorted_weight,
                                                            lat.run_vertex, a, self._partial), nv)),
                (launch, ("lattice_splat_reduce", lat.n_multi_max, (self._partial, lat.run_offset, lat.multi,
                                                                     lat.n_multi, _i64(lat.n_multi_max), _i32(nv),
                                                                     a), nv)),
            ]
            blur_kernel = "lattice_blur_pair" if self.pair_blur else "lattice_blur"
            blur, blurred = self._blur(blur_kernel, a, b, (_i32(nv), _i32(self._seq)), self.pair_blur)
            launches += [(launch, (*call, nv)) for call in blur]
        return launches + [(launch, self._slice_softmax(blurred, q_in, q_out))]

    # -- stage 2: mean-field iterations -----------------------------------------------------------

    def iterate(self, *, graph: bool | str = False) -> None:
        """Run the mean-field iterations (same arithmetic whichever way they are launched).

        `graph`: False or "off" launches each kernel from the host (about 6 per iteration);
        True or "iteration" records one iteration as a CUDA graph (two with the stencil: even
        and odd iterations) and replays it once per iteration (a small graph to instantiate,
        one host call per iteration); "all" records every iteration in one graph and replays
        it once."""
        mode = {False: "off", True: "iteration"}.get(graph, graph)
        if mode not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES} or a bool, got {graph!r}")
        if not self._plans[0] or self.params.iterations <= 0:
            return  # no pairwise term: every iteration gives softmax(-U) again
        n = self.params.iterations
        if mode == "off" or not hasattr(self.bk, "capture"):
            self._iterations(0, n)
        elif mode == "iteration":
            graphs = [self.bk.capture(lambda k=k: self._iterations(k, 1)) for k in range(min(n, len(self._plans)))]
            for i in range(n):
                self.bk.replay(graphs[i % len(graphs)])
        else:
            self.bk.replay(self.bk.capture(lambda: self._iterations(0, n)))
        if self._q_pair is not None:
            self.q = self._q_pair[n % 2]  # iteration i wrote buffer (i + 1) % 2

    def _iterations(self, first: int, count: int) -> None:
        # Q is read by each splat and only rewritten by the slice + softmax that ends the
        # iteration (into the other buffer, with the stencil).
        for i in range(first, first + count):
            for method, args in self._plans[i % len(self._plans)]:
                method(*args)

    @property
    def _seq(self) -> bool:
        return self.n_labels <= 2  # pydensecrf filters 1 or 2 labels with its scalar code, more with SSE

    def _slice_softmax(self, blurred: list[Any] | None, q_in: Any = None,
                       q_out: Any = None) -> tuple[str, int, tuple, int]:
        """The launch Q (into `q_out`, default self.q) = softmax(-U + the Potts messages of the
        lattices' `blurred` values, and the Gaussian's from its stencil over `q_in` when there
        is one: mf_slice_stencil_k<strip>, a lane group a strip); with None, Q0 = softmax(-U)."""
        n, c = self.n_pixels, self.n_labels
        slots = {2: [None, None, None, None, _f32(0), _f32(0)], 5: [None, None, None, None, _f32(0), _f32(0)]}
        lat = self.lattices
        for l, values in enumerate(blurred or []):
            spec = lat.specs[l]
            slots[spec.d] = [values, *lat.corners(l), lat.norms[l], alpha(spec.d), _f32(spec.weight)]
        labels = (_i32(c), _i32(self.n_vec), _i32(self._seq))
        q_out = self.q if q_out is None else q_out
        if blurred is not None and self._stencil is not None:
            _, side, strips, _ = self._stencil.shape  # one lane group a strip
            stencil = (self._stencil, _i32(side // 2), q_in, self._image_start, self._strip_start, self._image_width,
                       _i32(len(self.images)))
            return (f"mf_slice_stencil_k{self.stencil_strip}", self._lane_rows(strips),
                    (self.neg_unary, _i64(strips), *labels, *stencil, *slots[5], q_out), self.lanes)
        return ("mf_slice_softmax_v4", self._lane_rows(n),
                (self.neg_unary, _i64(n), *labels, *slots[2], *slots[5], q_out), self.lanes)

    def _lane_rows(self, groups: int) -> int:
        """Rows of self.lanes lanes that `groups` lane groups fill (the launch's row count)."""
        per = self.lanes // self.group
        return -(-groups // per)

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

    def run(self, *, graph: bool | str = False) -> list[Any]:
        self.prepare()
        self.iterate(graph=graph)
        return self.result()


def dense_crf_cuda_each(image: Any, probs: Any, settings: Sequence[CRFParams], backend: Any = None) -> Iterator[Any]:
    """One image refined under each of `settings` in turn on the current CUDA device and
    CuPy stream, yielding each result (CuPy float32 (C, H, W)); each equals
    `dense_crf_cuda_batch([image], [probs], setting)[0]` bit for bit. Consecutive settings
    with the same `lattice_key` share one prepared CudaCRF (`reweight`): the lattices are
    built once for them."""
    crf = None
    for params in settings:
        if crf is not None and lattice_key(params) == lattice_key(crf.params):
            crf.reweight(params)
        else:
            crf = None  # the last lattices' memory goes before the next are built
            crf = CudaCRF([image], [probs], params, backend)
            crf.prepare()
        crf.iterate()
        yield crf.result()[0]


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
