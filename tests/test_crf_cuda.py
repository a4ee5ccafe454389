"""The GPU CRF: kernels compile (nvcc), run on the CPU through g++ against pydensecrf, and on a
GPU against the CPU oracle (marker `cuda`)."""

from __future__ import annotations

import ctypes
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import PHOTOS, load_photo
from emulation import EmulatedBackend, build_emulated
from deeplab_cli.crf import cuda, geometry
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError

DEEPLAB = CRFParams()  # 3/1/4/67/3, the DeepLab v2 ResNet-101 configs
README = CRFParams(pos_w=3, pos_xy_std=3, bi_w=10, bi_xy_std=80, bi_rgb_std=13)  # pydensecrf README
PARAM_SETS = {"deeplab": DEEPLAB, "readme": README}


def network_like_probs(height: int, width: int, n_labels: int = 21, seed: int = 0) -> np.ndarray:
    """Softmax probabilities (C, H, W) float32 that vary smoothly, like an upsampled network
    output: random logits on a coarse grid, bilinearly upsampled."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.normal(scale=3.0, size=(max(height // 16, 2), max(width // 16, 2), n_labels)).astype(np.float32)
    logits = np.stack([cv2.resize(coarse[..., c], (width, height), interpolation=cv2.INTER_LINEAR)
                       for c in range(n_labels)])  # (C, H, W)
    e = np.exp(logits - logits.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


def pydensecrf_reference(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1)))
    norm = dcrf.NORMALIZE_SYMMETRIC if params.normalization == "symmetric" else dcrf.NORMALIZE_AFTER
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w, normalization=norm)
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.ascontiguousarray(image),
                             compat=params.bi_w, normalization=norm)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(c, h, w)


def assert_close(out: np.ndarray, ref: np.ndarray, *, agreement: float = 0.9999, atol: float = 1e-4) -> None:
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    diff = float(np.abs(out - ref).max())
    agree = float((out.argmax(0) == ref.argmax(0)).mean())
    print(f"[agreement] argmax {agree:.6f}, max abs diff {diff:.2e}")  # shown with pytest -s
    assert agree >= agreement and diff <= atol, f"argmax agreement {agree:.6f}, max abs diff {diff:.2e}"


# ---------------------------------------------------------------------------------------------
# Host-side geometry and errors (no compiler, no GPU)


def test_kernel_sources_are_found():
    for name in cuda.KERNEL_FILES:
        text = cuda.kernel_source(name)
        for fn in cuda.KERNELS[name]:
            stencil = re.fullmatch(r"gauss_stencil_r(\d)", fn)  # one per radius, from a macro
            if stencil:
                assert re.search(rf"^GAUSS_STENCIL_KERNEL\({stencil[1]}\)$", text, re.M), fn
                continue
            strip = re.fullmatch(r"mf_slice_stencil_k(\d)", fn)  # one per strip height, from a macro
            if strip:
                assert re.search(rf"^MF_SLICE_STENCIL_KERNEL\({strip[1]}, \d\)$", text, re.M), fn
                continue
            assert re.search(rf'extern "C" __global__ void (__launch_bounds__\([\w, ]+\)\s+)?{fn}\(', text), fn


def test_keys_pack_in_one_word_for_a_12_mp_photo():
    # Both lattices share one sort: the lattice index tops each key, and 8 images of 12 MP
    # still fit one 64-bit word.
    specs = geometry.kernel_specs(DEEPLAB)
    tables, words = cuda.pack_layouts(specs, 3000, 4000, n_images=8)
    assert words == 1
    for table in tables:
        fields = table.reshape(-1, 4)
        assert tuple(fields[0]) == (0, 63, 1, 0)  # the lattice bit, most significant
        assert fields[:, 2].sum() <= 64
    table, words = cuda.constant_table(specs, 3000, 4000, 8, spread=True)
    assert words == 2 and table.shape == (cuda._CONST_SIZE,)


def test_host_constants_match_the_kernel_sources():
    # cuda.py and permutohedral.cu agree on the constant table's offsets.
    defines = dict(re.findall(r"^#define (\w+) (-?\d+)$", cuda.kernel_source("permutohedral.cu"), re.M))
    for d, name in ((2, "G"), (5, "B")):
        assert int(defines[f"CONST_PACK_{name}"]) == cuda._CONST_PACK[d]
        assert int(defines[f"CONST_STD_{name}"]) == cuda._CONST_STD[d]
        assert int(defines[f"CONST_SCALE_{name}"]) == cuda._CONST_SCALE[d]
    assert int(defines["CONST_TILE_B"]) == cuda._CONST_TILE
    assert cuda._CONST_PACK[5] + 4 * (3 + 5 + 2) == cuda._CONST_TILE  # 10 bilateral fields, then the tiles
    assert int(defines["CONST_SCALE_B"]) + 5 == cuda._CONST_SIZE


def test_gauss_cells_cover_the_packed_gaussian_keys():
    # The Gaussian cell grid's box is the key packing's range of q0 and q1, which holds every vertex.
    spec = geometry.kernel_specs(DEEPLAB)[0]
    for h, w in ((375, 500), (1732, 2309), (13, 17)):
        span0, span1 = cuda.gauss_cells(spec, h, w)
        table, _, _ = cuda.pack_layout(spec, h, w, 1)
        (_, _, bits0, _), (_, _, bits1, _) = table[2], table[3]  # after remainder and image: q0, q1
        assert span0 <= 2**bits0 and span1 <= 2**bits1
        bounds = geometry.key_bounds(spec, h, w)
        assert span0 * 3 >= bounds[0][1] - bounds[0][0] and span1 * 3 >= bounds[1][1] - bounds[1][0]


@pytest.mark.parametrize("size,n_images", [((375, 500), 1), ((1732, 2309), 8), ((13, 17), 2), ((3000, 4000), 8)])
def test_spatial_packing_puts_image_then_tiles_on_top(size, n_images):
    # spatial_order: per lattice, fields from the bottom are remainder, q_0 .. q_{d-1}, the
    # bilateral tiles, the image, the lattice; without it, image sits above the remainder and
    # the tile fields are empty. Fields never overlap and all keys still fit one word.
    specs = geometry.kernel_specs(DEEPLAB)
    for spatial in (False, True):
        tables, words = cuda.pack_layouts(specs, *size, n_images, spatial=spatial)
        assert words == 1
        for spec, table in zip(specs, tables):
            fields = table.reshape(-1, 4)
            used = [(shift, bits, i) for i, (_, shift, bits, _) in enumerate(fields) if bits]
            used.sort()
            for (s0, b0, _), (s1, _, _) in zip(used, used[1:]):
                assert s0 + b0 <= s1
            order = [i for _, _, i in used]
            coords = list(range(3, 3 + spec.d))
            tiles = [i for i in (3 + spec.d, 4 + spec.d) if i < len(fields) and fields[i, 2]]
            image = [2] if n_images > 1 else []
            if spatial:
                assert order == [1, *coords, *tiles, *image, 0]
                counts = [c for _, _, c in cuda.tile_layout(spec, *size)] if spec.d == 5 else []
                assert len(tiles) == sum(c > 1 for c in counts)
            else:
                assert order == [1, *image, *coords, 0] and not tiles


def test_tile_layout_bounds_the_image_positions():
    # Tiles are 4 lattice spacings wide and 8 tall (about 3.5 and 4 sigma_xy pixels), count
    # only the image's positions (not its colours), and stay within 256 a side.
    spec = geometry.kernel_specs(DEEPLAB)[1]
    (x_lo, x_shift, x_count), (y_lo, y_shift, y_count) = cuda.tile_layout(spec, 1732, 2309)
    assert (x_shift, y_shift) == (2, 3) and (x_lo, y_lo) == (-6, -12)
    # in spacings a pixel lies at X = 2 cf_x / 6, Y = 6 cf_y / 6, plus 3 spacings of margin per
    # coordinate on either side
    assert 2309 / 67 * 3.46 * 2 / 6 / 4 < x_count <= (2309 / 67 * 3.47 * 2 / 6 + 12) / 4 + 1
    assert 1732 / 67 * 2.0 / 8 < y_count <= (1732 / 67 * 2.01 + 24) / 8 + 1
    assert [count for _, _, count in cuda.tile_layout(spec, 7, 9)] == [4, 4]  # the margins alone
    tiny = geometry.kernel_specs(DEEPLAB.replace(bi_xy_std=0.01))[1]
    (_, x_shift, x_count), (_, y_shift, y_count) = cuda.tile_layout(tiny, 3000, 4000)
    assert x_count <= cuda.TILE_COUNT_MAX and y_count <= cuda.TILE_COUNT_MAX and x_shift > 2 and y_shift > 3


def test_emulated_tiles_hold_every_corner_of_extreme_pixels(emulated):
    # Pixels at the image's edges with RGB-cube-corner colours: every simplex corner's tiles
    # must fit (the build flags any key outside its packing as a bug), and the result is the
    # default order's.
    h, w = 24, 300
    cube = np.array(list(np.ndindex(2, 2, 2)), dtype=np.uint8) * 255  # (8, 3)
    yy, xx = np.mgrid[:h, :w]
    image = np.ascontiguousarray(cube[(yy + xx) % 8])
    image[1::3] = np.random.default_rng(3).integers(0, 256, size=(len(range(1, h, 3)), w, 3), dtype=np.uint8)
    probs = network_like_probs(h, w, seed=5)
    params = DEEPLAB.replace(bi_xy_std=9, iterations=1)
    tiled = cuda.CudaCRF([image], [probs], params, backend=emulated, spatial_order=True)
    assert cuda.tile_layout(tiled.specs[1], h, w)[0][2] > 4  # several tiles across
    out = tiled.run()[0]
    assert np.array_equal(out, cuda.CudaCRF([image], [probs], params, backend=emulated).run()[0])


def test_torch_stream_wraps_with_from_external_else_external_stream():
    import types

    from deeplab_cli import crf

    calls = []

    class NewStream:  # CuPy 14: from_external(obj) reads obj.__cuda_stream__() -> (version, handle)
        @staticmethod
        def from_external(obj):
            calls.append(("from_external", obj.__cuda_stream__()))
            return "new"

    class OldStream:  # CuPy before Stream.from_external
        pass

    def external(ptr, device_id):
        calls.append(("ExternalStream", ptr, device_id))
        return "old"

    new = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=NewStream, ExternalStream=external))
    old = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=OldStream, ExternalStream=external))
    assert crf._external_stream(new, 1234, 1) == "new"
    assert crf._external_stream(old, 1234, 1) == "old"
    assert calls == [("from_external", (0, 1234)), ("ExternalStream", 1234, 1)]


# ---------------------------------------------------------------------------------------------
# nvcc: every kernel compiles to PTX (what CI can check without a GPU)


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    """Every kernel file's PTX for sm_80 (nvcc, no GPU needed)."""
    if shutil.which("nvcc") is None and not Path("/usr/local/bin/nvcc").exists():
        pytest.skip("nvcc not found")
    return cuda.compile_ptx("sm_80")


@pytest.mark.nvcc
def test_every_kernel_compiles_to_ptx_with_nvcc(ptx):
    assert set(ptx) == set(cuda.KERNEL_FILES)
    for name, functions in cuda.KERNELS.items():
        for fn in functions:
            assert f".entry {fn}(" in ptx[name], f"{fn} missing from {name}'s PTX"
    # --fmad=false: no multiply-add was fused in the lattice code (it would change rounding).
    assert "fma.rn.f32" not in ptx["permutohedral.cu"]
    assert sorted(cuda.compile_all(arch="sm_90")) == sorted(f for fs in cuda.KERNELS.values() for f in fs)


# ---------------------------------------------------------------------------------------------
# The CUDA code on the CPU: kernels built with g++ (one thread walks each grid-stride loop)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emulated"))


# PTX parameter types as CuPy fills them: an array (a pointer) or a NumPy scalar of one width.
_PTX_TYPE = {np.dtype(np.int32): "32", np.dtype(np.uint32): "32", np.dtype(np.float32): "f32",
             np.dtype(np.int64): "64", np.dtype(np.uint64): "64"}


def ptx_parameters(ptx: dict[str, str]) -> dict[str, list[str]]:
    """Each kernel's parameters as the GPU's argument buffer lays them out: '64' (a pointer, a
    long long or u64), '32' (int) or 'f32' (float), read from the PTX entries."""
    out = {}
    for text in ptx.values():
        for name, params in re.findall(r"\.entry (\w+)\(([^)]*)\)", text):
            kinds = re.findall(r"\.param \.(\w+) ", params)
            assert len(kinds) == params.count(".param"), f"{name}: a parameter of a kind this test cannot read"
            out[name] = ["f32" if k == "f32" else k[1:] for k in kinds]
    return out


def argument_kind(arg) -> str:
    """How CuPy would pass `arg`: an array or None as a 64-bit pointer, a NumPy scalar by its
    dtype; a Python int or float has no fixed width ('?': never right)."""
    if arg is None or isinstance(arg, np.ndarray):
        return "64"
    if isinstance(arg, np.generic):
        return _PTX_TYPE.get(arg.dtype, str(arg.dtype))
    return "?"


@pytest.mark.nvcc
def test_every_launch_passes_the_types_its_kernel_declares(emulated, ptx):
    # On x86-64 each emulated argument travels in its own 8-byte slot, so an int32 given to a
    # long long parameter (or a Python float to a float) works on the CPU. CuPy packs the
    # arguments by their own widths, so on a GPU every later argument would be read from the
    # wrong bytes. Every launch of every path is checked against the kernels' PTX.
    declared = ptx_parameters(ptx)
    wrong: set[str] = set()
    launched: set[str] = set()

    class Checking(type(emulated)):
        def launch(self, name, n, args, width=1, block_rows=0):
            if self.recording is None:
                launched.add(name)
                passed = [argument_kind(a) for a in args]
                if passed != declared[name]:
                    wrong.add(f"{name}: passed {passed}, declared {declared[name]}")
            return super().launch(name, n, args, width, block_rows)

    checking = Checking.__new__(Checking)
    checking.__dict__.update(emulated.__dict__)
    images, probs = case_inputs([("chelsea.jpg", 60, 120, 7, 9), ("coffee.jpg", 10, 20, 6, 5)], 5, seed=1)
    options = [{}, {"slot_keys": False}, {"spread_keys": True}, {"gauss_grid": True}, {"pair_blur": False},
               {"pack_lanes": False}, {"spatial_order": False}]
    options += [{"gauss_stencil": True, "stencil_strip": s} for s in cuda.STENCIL_STRIPS]
    for option in options:
        for params in (DEEPLAB.replace(iterations=2), DEEPLAB.replace(iterations=2, bi_w=0, normalization="after")):
            cuda.CudaCRF(images, probs, params, backend=checking, **option).run()
            cuda.CudaCRF(images[:1], [p[:2] / p[:2].sum(0) for p in probs[:1]], params, backend=checking,
                         **option).run(graph=True)
    for std in (0.2, 0.4, 0.6, 1.25):  # the other stencil radii
        cuda.CudaCRF(images, probs, DEEPLAB.replace(iterations=1, pos_xy_std=std), backend=checking,
                     gauss_stencil=True).run()
    assert not wrong, "\n".join(sorted(wrong))
    assert launched == {f for fs in cuda.KERNELS.values() for f in fs}  # every kernel was checked


def crop(name: str, top: int, left: int, height: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(load_photo(name)[top:top + height, left:left + width])


def case_inputs(crops, n_labels: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The crops (photo, top, left, height, width) of a test case and probabilities for each
    (image i with seed + i)."""
    images = [crop(*c) for c in crops]
    return images, [network_like_probs(*im.shape[:2], n_labels=n_labels, seed=seed + i) for i, im in enumerate(images)]


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("which", sorted(PARAM_SETS))
def test_emulated_kernels_match_pydensecrf(emulated, which, normalization):
    image = crop("chelsea.jpg", 60, 120, 41, 57)
    probs = network_like_probs(41, 57, seed=3)
    params = PARAM_SETS[which].replace(normalization=normalization)
    out = cuda.CudaCRF([image], [probs], params, backend=emulated).run()[0]
    assert_close(out, pydensecrf_reference(image, probs, params), agreement=1.0, atol=1e-5)
    assert not np.allclose(out, probs, atol=1e-3)  # the CRF did change the probabilities


def test_emulated_two_level_splat_two_word_keys_and_two_labels(emulated):
    image = np.ascontiguousarray(load_photo("coffee.jpg")[::5, ::5])  # 80 x 120: long vertices
    h, w, _ = image.shape
    probs = network_like_probs(h, w, seed=5)
    crf = cuda.CudaCRF([image], [probs], DEEPLAB, backend=emulated, spread_keys=True)
    out = crf.run()[0]
    assert crf._consts[1] == 2, "expected keys of two words"
    assert crf.lattices.n_runs[0] > crf.lattices.n_vertices, "expected vertices split into several runs"
    assert_close(out, pydensecrf_reference(image, probs, DEEPLAB), atol=1e-5)
    two = probs[:2] / probs[:2].sum(0)
    out2 = cuda.CudaCRF([image], [two], README, backend=emulated).run()[0]  # pydensecrf's scalar path
    assert_close(out2, pydensecrf_reference(image, two, README), atol=1e-5)


GRID_CASES = {  # crops (photo, top, left, height, width), parameters, labels
    "deeplab": ([("chelsea.jpg", 60, 120, 41, 57)], DEEPLAB, 21),
    # the pydensecrf README's Gaussian (sxy 3), a coarser cell grid
    "readme": ([("chelsea.jpg", 60, 120, 41, 57)], README, 21),
    # a batch of different sizes (one box of cells per image, sized by the largest), one padded
    "batch": ([("astronaut.jpg", 0, 0, 21, 19), ("rocket.jpg", 100, 200, 30, 44), ("coffee.jpg", 0, 0, 8, 10)],
              DEEPLAB.replace(normalization="after"), 21),
    # the Gaussian kernel alone
    "gaussian only": ([("rocket.jpg", 100, 200, 30, 44)], DEEPLAB.replace(bi_w=0), 2),
}


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_emulated_gaussian_grid_is_bit_identical(emulated, case):
    # gauss_grid: the Gaussian lattice's neighbours come from its cell grid instead of binary
    # search; the neighbour table and every output bit stay the same.
    crops, params, n_labels = GRID_CASES[case]
    images, probs = case_inputs(crops, n_labels, seed=4)
    sparse = cuda.CudaCRF(images, probs, params, backend=emulated)
    passes = sparse.run()
    crf = cuda.CudaCRF(images, probs, params, backend=emulated, gauss_grid=True)
    gridded = crf.run()
    assert crf._gridded
    g = sparse.lattices.first[1]  # Gaussian vertices: axes 0..2 used
    ours, theirs = crf.lattices.neighbours, sparse.lattices.neighbours
    assert np.array_equal(ours[:3, :g], theirs[:3, :g]) and np.array_equal(ours[:, g:], theirs[:, g:])
    assert (ours[:3, :g] >= 0).mean() > 0.5  # most Gaussian vertices have neighbours: a real check
    for a, b in zip(passes, gridded):
        assert np.array_equal(a, b)
    assert not np.allclose(gridded[0], probs[0], atol=1e-3)


PAIR_CASES = {
    # both lattices: launch k takes Gaussian axis k alone and bilateral axes 2k, 2k+1 together
    "deeplab": ([("chelsea.jpg", 60, 120, 33, 47)], DEEPLAB.replace(iterations=3), 21),
    # the Gaussian alone: its three axes one a launch (no nbr_a, nbr_b)
    "gaussian only": ([("rocket.jpg", 100, 200, 30, 44)], DEEPLAB.replace(bi_w=0, iterations=3), 21),
    "bilateral only": ([("coffee.jpg", 40, 40, 26, 29)], DEEPLAB.replace(pos_w=0, iterations=3), 21),
    # pydensecrf's scalar blur for two labels; a batch of two sizes; the README parameters
    "two labels": ([("coffee.jpg", 40, 40, 24, 31)], DEEPLAB.replace(iterations=3), 2),
    "batch": ([("astronaut.jpg", 0, 0, 21, 19), ("chelsea.jpg", 40, 80, 30, 35)],
              README.replace(iterations=3), 5),
}


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_emulated_pair_blur_is_bit_identical(emulated, case, monkeypatch):
    # Two blur passes a launch work out the first pass at the vertex and at its two neighbours
    # along the second axis from the same rows: every output bit equals one pass a launch, for
    # the labels' values every iteration and for the norms the build blurs once.
    crops, params, n_labels = PAIR_CASES[case]
    images, probs = case_inputs(crops, n_labels, seed=7)
    launched, launch = [], emulated.launch

    def recording(name, *rest, **options):
        launched.append(name)
        launch(name, *rest, **options)

    monkeypatch.setattr(emulated, "launch", recording)
    single = cuda.CudaCRF(images, probs, params, backend=emulated, pair_blur=False)
    passes = single.run()
    single_launched, launched[:] = launched[:], []
    paired = cuda.CudaCRF(images, probs, params, backend=emulated, pair_blur=True)
    out = paired.run()
    planned = [args[0] for _, args in paired._launches]
    assert planned.count("lattice_blur_pair") == 3 and "lattice_blur" not in planned
    # one pass a launch: the Gaussian's axes 0-2 with the bilateral's, then its 3-5 alone
    passes_a_launch = 6 if params.bi_w else 3
    assert [args[0] for _, args in single._launches].count("lattice_blur") == passes_a_launch
    assert launched.count("norm_blur_pair") == 3 and "norm_blur" not in launched
    assert single_launched.count("norm_blur") == passes_a_launch and "norm_blur_pair" not in single_launched
    for a, b in zip(single.lattices.norms, paired.lattices.norms):
        assert np.array_equal(a, b) and np.all(b > 0)
    for a, b, p in zip(passes, out, probs):
        assert np.array_equal(a, b)
        assert not np.allclose(b, p, atol=1e-3)  # the CRF moved the probabilities: a real check


SLOT_CASES = {
    # both lattices, an image whose pixel count is not a multiple of 4 (a padding origin's slot)
    "deeplab": ([("chelsea.jpg", 60, 120, 33, 47)], DEEPLAB.replace(iterations=3), 21),
    # one lattice each: lattice 0 is then the bilateral (a 3-bit remainder)
    "gaussian only": ([("rocket.jpg", 100, 200, 30, 44)], DEEPLAB.replace(bi_w=0, iterations=3), 21),
    "bilateral only": ([("coffee.jpg", 40, 40, 26, 29)], DEEPLAB.replace(pos_w=0, iterations=3), 21),
    # a batch of three sizes (two padded): slots run on across images
    "batch": ([("astronaut.jpg", 0, 0, 21, 19), ("coffee.jpg", 0, 0, 8, 10), ("chelsea.jpg", 40, 80, 30, 35)],
              README.replace(iterations=3, normalization="after"), 5),
}


@pytest.mark.parametrize("case", sorted(SLOT_CASES))
def test_emulated_slotted_keys_are_bit_identical(emulated, case):
    # With each entry's slot in its key's low bits the keys are unique and sort in place into
    # the argsort's stable order: the same vertices, ids, runs and neighbours, every output bit.
    crops, params, n_labels = SLOT_CASES[case]
    images, probs = case_inputs(crops, n_labels, seed=11)
    argsorted = cuda.CudaCRF(images, probs, params, backend=emulated, slot_keys=False)
    plain = argsorted.run()
    slotted = cuda.CudaCRF(images, probs, params, backend=emulated)
    out = slotted.run()
    n_slots = slotted.n_pixels + sum((h * w) % 4 > 0 for h, w in slotted.sizes)
    assert argsorted._consts[2] == 0 and 2**slotted._consts[2] >= n_slots and slotted._consts[1] == 1
    a, b = argsorted.lattices, slotted.lattices
    assert a.first == b.first and a.entry_first == b.entry_first
    for name in ("entry_vertex", "sorted_pixel", "sorted_weight", "run_offset"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    runs = int(a.n_runs[0]) + 1  # the rest of run_bounds is never written
    assert np.array_equal(a.run_bounds[:runs], b.run_bounds[:runs])
    g = a.first[1] if a.specs[0].d == 2 else 0  # Gaussian vertices have axes 0..2 only
    assert np.array_equal(a.neighbours[:3, :g], b.neighbours[:3, :g])
    assert np.array_equal(a.neighbours[:, g:], b.neighbours[:, g:])
    assert (b.sorted_pixel < 0).sum() == (n_slots - slotted.n_pixels) * sum(s.d + 1 for s in slotted.specs)
    for x, y, p in zip(plain, out, probs):
        assert np.array_equal(x, y)
        assert not np.allclose(y, p, atol=1e-3)  # the CRF moved the probabilities: a real check


def test_slotted_keys_fall_back_to_argsort_when_a_word_is_full(emulated):
    # Two-word keys (spread_keys forces them) leave no room for the slot: argsort, same result.
    images, probs = case_inputs([("chelsea.jpg", 60, 120, 17, 23)], 21, seed=2)
    params = DEEPLAB.replace(iterations=2)
    spread = cuda.CudaCRF(images, probs, params, backend=emulated, spread_keys=True)
    out = spread.run()[0]
    assert spread._consts[1:] == (2, 0)
    assert np.array_equal(out, cuda.CudaCRF(images, probs, params, backend=emulated).run()[0])


@pytest.mark.parametrize("size,n_images", [((375, 500), 1), ((375, 500), 8), ((866, 1155), 1), ((1732, 2309), 1),
                                           ((3000, 4000), 1)])
def test_deeplab_keys_hold_their_slots_up_to_12_mp(size, n_images):
    # The benchmark's sizes (0.19, 1, 4 MP, a batch of 8 small photos) and 12 MP with the DeepLab
    # parameters sort slotted keys: the bilateral key stores its position once (X, Y split into
    # fine and tile fields), which leaves room in the word for the slots.
    specs = geometry.kernel_specs(DEEPLAB)
    _, words, slot_bits = cuda.key_table(specs, *size, n_images, spatial=True)
    assert words == 1 and 2**slot_bits >= n_images * (size[0] * size[1] + 1)
    # the tiles cost at most a bit over key order's fields (remainder, image, q_0 .. q_4)
    key_order = cuda.pack_layout(specs[1], *size, n_images)[2]
    assert cuda.pack_layout(specs[1], *size, n_images, spatial=True)[2] <= key_order + 1
    assert cuda.key_table(specs, *size, n_images, spatial=True, slots=False)[2] == 0


def test_reserved_slot_bits_sit_below_every_field():
    specs = geometry.kernel_specs(DEEPLAB)
    longest = max(cuda.pack_layout(spec, 375, 500, 1, spatial=True)[2] for spec in specs)
    room = 64 - 1 - longest  # below the fields and the lattice bit
    assert room >= 20  # the 0.19 MP photo's 187,500 slots
    for reserve in (0, 18, room):
        tables, words = cuda.pack_layouts(specs, 375, 500, 1, spatial=True, reserve=reserve)
        assert words == 1
        for table in tables:
            fields = table.reshape(-1, 4)
            used = fields[fields[:, 2] > 0]
            assert used[:, 1].min() == reserve and (used[:, 1] + used[:, 2]).max() <= 64
    assert cuda.pack_layouts(specs, 375, 500, 1, spatial=True, reserve=room + 1)[1] == 2


SPATIAL_CASES = {
    # small spatial stds: many tiles on a small crop
    "tiles": ([("rocket.jpg", 100, 200, 48, 61)], DEEPLAB.replace(bi_xy_std=2, iterations=3), 21),
    "batch": ([("astronaut.jpg", 0, 0, 21, 19), ("coffee.jpg", 0, 0, 8, 10), ("chelsea.jpg", 40, 80, 30, 35)],
              DEEPLAB.replace(bi_xy_std=3, iterations=3), 21),
    "readme": ([("chelsea.jpg", 60, 120, 41, 57)], README.replace(bi_xy_std=2, iterations=3), 5),
}


@pytest.mark.parametrize("gauss_grid", [False, True])
@pytest.mark.parametrize("case", sorted(SPATIAL_CASES))
def test_emulated_spatial_order_is_bit_identical_and_local(emulated, case, gauss_grid):
    # spatial_order only renumbers vertices (image by image, bilateral ones by spatial tile):
    # every output bit stays, the vertex count too, and bilateral vertices with nearby ids
    # gather nearby pixels, which the key order (colour coordinates on top) does not give.
    crops, params, n_labels = SPATIAL_CASES[case]
    images, probs = case_inputs(crops, n_labels, seed=9)
    runs = {}
    for spatial in (False, True):
        crf = cuda.CudaCRF(images, probs, params, backend=emulated, gauss_grid=gauss_grid, spatial_order=spatial)
        runs[spatial] = crf, crf.run()
    (key, out_key), (tiled, out_tiled) = runs[False], runs[True]
    for a, b in zip(out_key, out_tiled):
        assert np.array_equal(a, b)
    assert key.lattices.first == tiled.lattices.first
    assert not np.array_equal(key.lattices.entry_vertex, tiled.lattices.entry_vertex)  # renumbered

    def spread(crf, window=32):
        # mean bounding-box area (pixels) of the mean positions of `window` consecutive
        # bilateral vertices: what one wave of splat threads reads
        lat = crf.lattices
        lo, hi = lat.entry_first[1], lat.entry_first[2]
        starts = lat.run_bounds[lat.run_offset]  # (M+1,) each vertex's first sorted entry
        pixel, vertex = lat.sorted_pixel[lo:hi], np.repeat(np.arange(lat.n_vertices), np.diff(starts))[lo:hi]
        keep = pixel >= 0
        pixel, vertex = pixel[keep], vertex[keep] - lat.first[1]
        offsets = np.array(crf.offsets)
        image = np.searchsorted(offsets, pixel, side="right") - 1
        local = pixel - offsets[image]
        widths = np.array([w for _, w in crf.sizes])[image]
        pos = np.stack([image * 1e4 + local // widths, local % widths], 1).astype(np.float64)  # (y, x)
        count = np.bincount(vertex)
        mean = np.stack([np.bincount(vertex, pos[:, k]) for k in range(2)], 1)[count > 0] / count[count > 0, None]
        n = len(mean) // window * window
        boxes = mean[:n].reshape(-1, window, 2)
        return float((boxes.max(1) - boxes.min(1) + 1).prod(1).mean())

    assert spread(tiled) < 0.4 * spread(key)


@pytest.mark.parametrize("n_labels,group", [(3, 1), (21, 6), (182, 32)])
def test_emulated_lane_groups_match_pydensecrf(emulated, n_labels, group):
    # Each launch's lanes as host threads, so the slice/softmax kernel's lane groups stride over
    # the float4 chunks and meet in shuffle trees as on the GPU (a warp of 32 groups of one lane
    # for 3 labels, 5 groups of 6 for 21, one chunk per lane; the path through memory for 182).
    # Only the softmax's summation order differs from one lane.
    image = crop("astronaut.jpg", 0, 0, 13, 17)  # 221 pixels: padding corners too
    probs = network_like_probs(13, 17, n_labels=n_labels, seed=10)
    params = DEEPLAB.replace(iterations=3)
    threaded = EmulatedBackend(emulated.library, lanes=True)
    crf = cuda.CudaCRF([image], [probs], params, backend=threaded)
    assert crf.group == group and crf.lanes == 32 and crf.ld == 4 * -(-n_labels // 4)
    out = crf.run()[0]
    one_lane = cuda.CudaCRF([image], [probs], params, backend=emulated).run()[0]
    assert_close(out, one_lane, agreement=1.0, atol=1e-5)
    assert_close(out, pydensecrf_reference(image, probs, params), agreement=1.0, atol=1e-5)


@pytest.mark.parametrize("n_labels", [3, 10, 19, 21, 27, 37, 131])
@pytest.mark.parametrize("stencil", [False, True])
def test_emulated_packed_lane_groups_equal_unpacked(emulated, n_labels, stencil):
    # Lane groups side by side in the warp (pack_lanes, the default: 10 groups of 3 lanes for 10
    # labels, 6 of 5 for 19, 5 of 6 for 21, 4 of 7 for 27, 3 of 10 for 37, lanes left over idle)
    # or one to each power-of-two slice of it: the shuffle trees pair lanes so that every lane
    # ends with the sum the power-of-two tree gives, so the result is the same bit for bit, on
    # both slice kernels. Unpacked, a whole warp runs (32 / lanes rows of lanes), so the groups
    # must find their lanes past the warp's first row. 131 labels (33 chunks) take the path
    # with more chunks than lanes.
    images, probs = case_inputs([("astronaut.jpg", 0, 0, 7, 9), ("coffee.jpg", 30, 30, 4, 5)], n_labels, seed=3)
    params = DEEPLAB.replace(iterations=2)
    n_vec = -(-n_labels // 4)
    runs = []
    for pack in (True, False):
        threaded = EmulatedBackend(emulated.library, lanes=True, warp=not pack)
        crf = cuda.CudaCRF(images, probs, params, backend=threaded, gauss_stencil=stencil, pack_lanes=pack)
        runs.append(crf.run())
        assert crf.group == min(n_vec, 32)
        assert crf.lanes == (32 if pack else min(32, 1 << (n_vec - 1).bit_length()))
        assert (crf._stencil is not None) == stencil
    for packed, unpacked in zip(*runs):
        assert np.array_equal(packed, unpacked)
    assert_close(runs[0][0], pydensecrf_reference(images[0], probs[0], params), agreement=1.0, atol=1e-5)


@pytest.mark.parametrize("n_labels,per_warp,steps", [(21, 5, 3), (37, 3, 4), (10, 10, 2), (3, 32, 0)])
@pytest.mark.parametrize("pack", [True, False])
def test_emulated_packed_warp_takes_several_pixels(emulated, n_labels, per_warp, steps, pack):
    # A warp of lanes as host threads, counting the times they meet at a shuffle: the softmax
    # launch passes over ceil(N / groups a warp) warps' worth of pixels, each with a max and a
    # sum tree of `steps` shuffles (log2 of the group's size rounded up to a power of two).
    # Unpacked, a row of lanes holds one group.
    image = crop("astronaut.jpg", 0, 0, 7, 9)
    threaded = EmulatedBackend(emulated.library, lanes=True)
    crf = cuda.CudaCRF([image], [network_like_probs(7, 9, n_labels=n_labels, seed=2)], DEEPLAB.replace(iterations=0),
                       backend=threaded, pack_lanes=pack)
    crf.prepare()
    threaded.library.emu_meetings.restype = ctypes.c_ulong
    before = threaded.library.emu_meetings()
    threaded.launch(*crf._slice_softmax(None))
    assert threaded.library.emu_meetings() - before == 2 * steps * -(-63 // (per_warp if pack else 1))


@pytest.mark.parametrize("gauss_grid", [False, True])
def test_emulated_graph_replays_equal_direct_launches(emulated, gauss_grid):
    # A graph of one iteration replayed once per iteration, or of all of them replayed once,
    # gives exactly the direct launches' result (the emulated capture records, replay runs).
    image = crop("coffee.jpg", 100, 150, 37, 45)
    probs = network_like_probs(37, 45, seed=4)
    params = DEEPLAB.replace(iterations=4)
    direct = cuda.CudaCRF([image], [probs], params, backend=emulated, gauss_grid=gauss_grid).run()[0]
    launches = []
    for mode, replays in (("iteration", 4), (True, 4), ("all", 1)):
        backend = EmulatedBackend(emulated.library)
        out = cuda.CudaCRF([image], [probs], params, backend=backend, gauss_grid=gauss_grid).run(graph=mode)[0]
        assert np.array_equal(out, direct), mode
        assert backend.replays == replays and len(backend.captures) == 1
        launches.append(backend.captures[0] * replays)
    # splat, reduce, 3 blur launches (Gaussian axis k, bilateral axes 2k and 2k+1), slice
    per_iteration = 6
    assert launches == [4 * per_iteration] * 3
    with pytest.raises(ValueError, match="graph must be one of"):
        cuda.CudaCRF([image], [probs], params, backend=emulated).run(graph="sometimes")


@pytest.mark.parametrize("run_min,small", [(cuda.RUN_MIN, (2, 3)), (64, (9, 7))])
def test_emulated_batch_equals_singles(emulated, run_min, small):
    # b alone has vertices long enough for a two-level splat, a has none: the batch must still
    # sum each vertex exactly as the single image does.
    a, b = crop("rocket.jpg", 100, 200, *small), np.ascontiguousarray(load_photo("coffee.jpg")[::5, ::5])
    pa, pb = network_like_probs(*small, seed=1), network_like_probs(*b.shape[:2], seed=2)

    def run(images, probs):
        crf = cuda.CudaCRF(images, probs, DEEPLAB, backend=emulated, run_min=run_min)
        return crf, crf.run()

    alone, (out_a,) = run([a], [pa])
    assert alone.lattices.n_runs[0] == alone.lattices.n_vertices
    batch, both = run([a, b], [pa, pb])
    assert batch.lattices.n_runs[0] > batch.lattices.n_vertices
    assert np.array_equal(both[0], out_a)
    assert np.array_equal(both[1], run([b], [pb])[1][0])


def test_emulated_matches_cpu_oracle(emulated):
    cpu = pytest.importorskip("deeplab_cli.crf.cpu")
    image = crop("astronaut.jpg", 100, 150, 39, 47)
    probs = network_like_probs(39, 47, seed=7)
    out = cuda.CudaCRF([image], [probs], DEEPLAB, backend=emulated).run()[0]
    assert_close(out, cpu.dense_crf_cpu(image, probs, DEEPLAB))


# Dark top-left crops whose pixel count is not a multiple of 4: pydensecrf's 4-wide build adds the
# origin's simplex corners as vertices, which moves these results by about 7e-4 if left out.
PADDED_CROPS = [(21, 19, "deeplab"), (13, 17, "readme")]


@pytest.mark.parametrize("height,width,which", PADDED_CROPS)
def test_emulated_padding_corners_match_pydensecrf_and_cpu_oracle(emulated, height, width, which):
    cpu = pytest.importorskip("deeplab_cli.crf.cpu")
    assert (height * width) % 4 != 0
    image = crop("astronaut.jpg", 0, 0, height, width)
    probs = network_like_probs(height, width, seed=3)
    params = PARAM_SETS[which]
    out = cuda.CudaCRF([image], [probs], params, backend=emulated).run()[0]
    assert_close(out, pydensecrf_reference(image, probs, params), agreement=1.0, atol=1e-5)
    assert_close(out, cpu.dense_crf_cpu(image, probs, params), atol=1e-5)


def test_emulated_padding_corners_are_per_image_in_a_batch(emulated):
    # Each padded image needs its own origin corners (keys carry the image index): a batch of
    # two padded crops and an unpadded one must equal the images run alone.
    images = [crop("astronaut.jpg", 0, 0, 21, 19), crop("astronaut.jpg", 0, 0, 13, 17),
              crop("chelsea.jpg", 0, 0, 8, 10)]
    probs = [network_like_probs(*im.shape[:2], seed=3) for im in images]
    both = cuda.CudaCRF(images, probs, DEEPLAB, backend=emulated).run()
    for image, p, out in zip(images, probs, both):
        assert np.array_equal(out, cuda.CudaCRF([image], [p], DEEPLAB, backend=emulated).run()[0])
    assert_close(both[0], pydensecrf_reference(images[0], probs[0], DEEPLAB), agreement=1.0, atol=1e-5)


def test_zero_iterations_return_softmax_of_the_clipped_unary(emulated):
    image = crop("chelsea.jpg", 0, 0, 9, 11)
    probs = network_like_probs(9, 11, seed=4)
    probs[0, 0, 0], probs[1, 0, 0] = 0.0, probs[1, 0, 0] + probs[0, 0, 0]
    out = cuda.CudaCRF([image], [probs], DEEPLAB.replace(iterations=0), backend=emulated).run()[0]
    clipped = np.clip(probs, 1e-5, 1.0)
    np.testing.assert_allclose(out, clipped / clipped.sum(0), rtol=1e-5, atol=1e-7)


def test_bad_inputs_and_memory_shortage_are_one_line_errors(emulated):
    image = crop("chelsea.jpg", 0, 0, 9, 11)
    probs = network_like_probs(9, 11)
    with pytest.raises(DeeplabError, match=r"\(C, 9, 11\)"):
        cuda.CudaCRF([image], [probs[:, :8]], DEEPLAB, backend=emulated)
    with pytest.raises(DeeplabError, match="uint8"):
        cuda.CudaCRF([image.astype(np.float32)], [probs], DEEPLAB, backend=emulated)
    with pytest.raises(DeeplabError, match="GPU memory"):
        cuda.CudaCRF([image], [probs], DEEPLAB, backend=EmulatedBackend(emulated.library, free=1000)).run()


# ---------------------------------------------------------------------------------------------
# On a GPU


def _cupy():
    from deeplab_cli.device import cupy_available

    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy

    return cupy


@pytest.fixture(scope="module")
def photos_and_probs():
    return {p.name: (load_photo(p.name), network_like_probs(*load_photo(p.name).shape[:2], seed=i))
            for i, p in enumerate(PHOTOS)}


@pytest.fixture
def photos_on_gpu(photos_and_probs):
    """Every shipped photo and its probabilities as CuPy arrays: (images, probs)."""
    cp = _cupy()
    names = [p.name for p in PHOTOS]
    return ([cp.asarray(photos_and_probs[n][0]) for n in names],
            [cp.asarray(photos_and_probs[n][1]) for n in names])


@pytest.mark.cuda
def test_nvrtc_compiles_every_kernel():
    _cupy()
    assert sorted(cuda.compile_all()) == sorted(f for fs in cuda.KERNELS.values() for f in fs)


@pytest.mark.cuda
@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("which", sorted(PARAM_SETS))
@pytest.mark.parametrize("photo", [p.name for p in PHOTOS])
def test_gpu_matches_cpu_oracle_on_photos(photos_and_probs, photo, which, normalization):
    cp = _cupy()
    from deeplab_cli.crf.cpu import dense_crf_cpu

    image, probs = photos_and_probs[photo]
    params = PARAM_SETS[which].replace(normalization=normalization)
    out = cuda.dense_crf_cuda_batch([cp.asarray(image)], [cp.asarray(probs)], params)[0]
    assert isinstance(out, cp.ndarray) and out.shape == probs.shape
    assert_close(out.get(), dense_crf_cpu(image, probs, params))


@pytest.mark.cuda
@pytest.mark.parametrize("height,width,which", PADDED_CROPS + [(203, 157, "deeplab")])
def test_gpu_padding_corners_match_cpu_oracle_and_pydensecrf(height, width, which):
    cp = _cupy()
    from deeplab_cli.crf.cpu import dense_crf_cpu

    image = crop("astronaut.jpg", 0, 0, height, width)
    probs = network_like_probs(height, width, seed=3)
    params = PARAM_SETS[which]
    out = cuda.dense_crf_cuda_batch([cp.asarray(image)], [cp.asarray(probs)], params)[0].get()
    assert_close(out, dense_crf_cpu(image, probs, params))
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return
    assert_close(out, pydensecrf_reference(image, probs, params))


@pytest.mark.cuda
def test_gpu_is_deterministic_and_batch_equals_singles(photos_on_gpu):
    images, probs = photos_on_gpu
    first = [o.get() for o in cuda.dense_crf_cuda_batch(images, probs, DEEPLAB)]
    again = [o.get() for o in cuda.dense_crf_cuda_batch(images, probs, DEEPLAB)]
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    for i in range(len(images)):
        single = cuda.dense_crf_cuda_batch([images[i]], [probs[i]], DEEPLAB)[0].get()
        assert np.array_equal(first[i], single)
    for mode in ("iteration", "all"):
        graphed = [o.get() for o in cuda.CudaCRF(images, probs, DEEPLAB).run(graph=mode)]
        for a, b in zip(first, graphed):
            assert np.array_equal(a, b), mode


@pytest.mark.cuda
def test_gpu_options_equal_each_other(photos_on_gpu):
    # Each option is bit-identical on the device too: the default (spatial order, two blur
    # passes a launch, slotted keys sorted in place, lane groups side by side), key order, one
    # pass a launch, the Gaussian cell grid, argsorted keys and power-of-two lane groups.
    images, probs = photos_on_gpu
    for params in (DEEPLAB, README.replace(normalization="after"), DEEPLAB.replace(bi_w=0)):
        default = [o.get() for o in cuda.CudaCRF(images, probs, params).run()]
        for options in ({"spatial_order": False}, {"pair_blur": False}, {"gauss_grid": True},
                        {"spatial_order": False, "pair_blur": False}, {"slot_keys": False},
                        {"slot_keys": False, "spatial_order": False}, {"pack_lanes": False}):
            other = [o.get() for o in cuda.CudaCRF(images, probs, params, **options).run(graph=True)]
            for a, b in zip(default, other):
                assert np.array_equal(a, b), options


@pytest.mark.cuda
def test_gpu_182_labels(photos_and_probs):
    cp = _cupy()
    from deeplab_cli.crf.cpu import dense_crf_cpu

    image = np.ascontiguousarray(photos_and_probs["coffee.jpg"][0][:200, :300])
    probs = network_like_probs(200, 300, n_labels=182, seed=9)
    out = cuda.dense_crf_cuda_batch([cp.asarray(image)], [cp.asarray(probs)], DEEPLAB)[0].get()
    assert_close(out, dense_crf_cpu(image, probs, DEEPLAB))


@pytest.mark.cuda
def test_torch_cuda_tensors_through_dense_crf(photos_and_probs):
    cp = _cupy()
    torch = pytest.importorskip("torch")
    crf = pytest.importorskip("deeplab_cli.crf")
    if not hasattr(crf, "dense_crf"):
        pytest.skip("deeplab_cli.crf.dense_crf not there yet")
    image, probs = photos_and_probs["chelsea.jpg"]
    out = crf.dense_crf(torch.from_numpy(image.copy()).cuda(), torch.from_numpy(probs.copy()).cuda(), DEEPLAB)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float32
    direct = cuda.dense_crf_cuda_batch([cp.asarray(image)], [cp.asarray(probs)], DEEPLAB)[0].get()
    assert np.array_equal(out.cpu().numpy(), direct)


@pytest.mark.cuda
def test_batch_of_mixed_label_counts_and_array_types(photos_and_probs):
    """dense_crf_batch splits CUDA inputs into GPU batches of one label count, device and
    array type; every result equals that image run alone, in the caller's order."""
    cp = _cupy()
    torch = pytest.importorskip("torch")
    from deeplab_cli.crf import dense_crf, dense_crf_batch

    image, probs = photos_and_probs["coffee.jpg"]
    small = np.ascontiguousarray(image[:61, :83])
    p21 = np.ascontiguousarray(probs[:, :61, :83])
    p5 = network_like_probs(61, 83, n_labels=5, seed=3)
    images = [torch.from_numpy(small).cuda(), cp.asarray(small), torch.from_numpy(small).cuda(), small]
    probs_list = [torch.from_numpy(p21).cuda(), cp.asarray(p5), torch.from_numpy(p5).cuda(), p21]
    outs = dense_crf_batch(images, probs_list, DEEPLAB)
    assert [type(o).__module__.split(".")[0] for o in outs] == ["torch", "cupy", "torch", "numpy"]
    assert [o.shape[0] for o in outs] == [21, 5, 5, 21]
    for image_i, probs_i, out in zip(images, probs_list, outs):
        alone = dense_crf(image_i, probs_i, DEEPLAB)
        got, want = (x.cpu().numpy() if hasattr(x, "cpu") else cp.asnumpy(x) for x in (out, alone))
        assert np.array_equal(got, want)


@pytest.mark.cuda
@pytest.mark.slow
def test_12_mp_fits_in_80_gb(photos_and_probs):
    cp = _cupy()
    import cv2

    image = cv2.resize(photos_and_probs["rocket.jpg"][0], (4000, 3000), interpolation=cv2.INTER_LINEAR)
    probs = network_like_probs(3000, 4000, seed=11)
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    out = cuda.dense_crf_cuda_batch([cp.asarray(image)], [cp.asarray(probs)], DEEPLAB.replace(iterations=2))[0]
    cp.cuda.Device().synchronize()
    assert pool.total_bytes() < 80 * 2**30
    assert bool(cp.isfinite(out).all())


def test_emulated_gaussian_grid_is_skipped_for_strips(emulated):
    # A long strip lies diagonally across the Gaussian lattice's cells: its box of cells would
    # grow as the square of its length (1x18913: 1.4 GB of table for 19k pixels), so the
    # grid is not used there, and the result is the sparse path's.
    image = np.ascontiguousarray(np.tile(crop("rocket.jpg", 100, 0, 3, 400), (1, 5, 1)))  # 3 x 2000
    probs = network_like_probs(3, 2000, seed=6)
    params = DEEPLAB.replace(iterations=2)
    crf = cuda.CudaCRF([image], [probs], params, backend=emulated, gauss_grid=True)
    out = crf.run()[0]
    assert not crf._gridded
    assert np.array_equal(out, cuda.CudaCRF([image], [probs], params, backend=emulated).run()[0])
    photo = cuda.CudaCRF([crop("chelsea.jpg", 0, 0, 150, 200)], [network_like_probs(150, 200)], params,
                         backend=emulated, gauss_grid=True)
    assert photo._gridded  # a photo's box: about 3 slots per pixel
