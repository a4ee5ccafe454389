"""The Gaussian kernel as a per-pixel stencil (CudaCRF(gauss_stencil=True)): the stencil rows
equal the Gaussian lattice's filter, and the CRF through them matches pydensecrf, on the CPU
through g++ and on a GPU (marker `cuda`)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from emulation import EmulatedBackend, build_emulated
from conftest import PHOTOS, load_photo
from test_crf_cuda import (DEEPLAB, README, _cupy, assert_close, case_inputs, crop, network_like_probs,
                           pydensecrf_reference)
from deeplab_cli.crf import cpu, cuda


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emulated"))


def test_host_stencil_limits_match_the_kernel_source():
    # gauss_stencil's shared memory holds STENCIL_BLOCK_ROWS rows: the host launches blocks of
    # that many rows, and there is a kernel for every radius it may ask for.
    source = cuda.kernel_source("permutohedral.cu")
    defines = dict(re.findall(r"^#define (\w+) (\d+)$", source, re.M))
    assert int(defines["STENCIL_BLOCK_ROWS"]) == cuda.STENCIL_BLOCK_ROWS
    radii = sorted(int(r) for r in re.findall(r"^GAUSS_STENCIL_KERNEL\((\d)\)$", source, re.M))
    assert radii == list(range(cuda.STENCIL_RADIUS_MAX + 1))
    assert [f for f in cuda.KERNELS["permutohedral.cu"] if re.fullmatch(r"gauss_stencil_r\d", f)] == [
        f"gauss_stencil_r{r}" for r in radii]
    # and a slice kernel for every strip height CudaCRF takes
    strips = sorted(int(s) for s in re.findall(r"^MF_SLICE_STENCIL_KERNEL\((\d), \d\)$",
                                                cuda.kernel_source("meanfield.cu"), re.M))
    assert strips == sorted(cuda.STENCIL_STRIPS)
    assert [f for f in cuda.KERNELS["meanfield.cu"] if f.startswith("mf_slice_stencil")] == [
        f"mf_slice_stencil_k{s}" for s in cuda.STENCIL_STRIPS]


def stencil_rows(crf: cuda.CudaCRF, image_index: int = 0) -> np.ndarray:
    """One image's stencil weights as rows (N, (2R+1)^2), slot (dy + R) * (2R+1) + dx + R, from the
    strip layout (union rows of strips of S pixels, permutohedral.cu stencil_index); checks that
    every union row a pixel's window lacks, and every pixel past the image, holds 0."""
    h, w = crf.sizes[image_index]
    strip, radius = crf.stencil_strip, crf._stencil.shape[1] // 2
    side = 2 * radius + 1
    weights = np.asarray(crf._stencil)  # (2R + S, 2R + 1, strips, S)
    first = sum(-(-hh // strip) * ww for hh, ww in crf.sizes[:image_index])
    mine = weights[:, :, first:first + -(-h // strip) * w].reshape(2 * radius + strip, side, -(-h // strip), w, strip)
    rows = np.zeros((h, w, side, side), np.float32)
    for k in range(strip):
        ys = np.arange(k, h, strip)
        rows[ys] = mine[k:k + side, :, : len(ys), :, k].transpose(2, 3, 0, 1)
        unused = np.ones(2 * radius + strip, bool)
        unused[k:k + side] = False
        assert not mine[unused, :, :, :, k].any(), "a weight in a union row outside the pixel's window"
        assert not mine[:, :, len(ys):, :, k].any(), "a weight for a pixel past the image"
    return rows.reshape(h * w, side * side)


def dense_stencil(crf: cuda.CudaCRF, image_index: int = 0) -> np.ndarray:
    """One image's stencil rows as a dense (N, N) matrix A, message_g = A @ Q."""
    h, w = crf.sizes[image_index]
    n = h * w
    rows = stencil_rows(crf, image_index)
    side = int(round(rows.shape[1] ** 0.5))
    radius = side // 2
    dense = np.zeros((n, n), np.float64)
    ys, xs = np.divmod(np.arange(n), w)
    for s in range(side * side):
        dy, dx = divmod(s, side)
        dy, dx = dy - radius, dx - radius
        qy, qx = ys + dy, xs + dx
        inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        assert not rows[~inside, s].any(), "a weight for a pixel off the image"
        dense[np.arange(n)[inside], (qy * w + qx)[inside]] = rows[inside, s]
    return dense


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("std,radius", [(1.0, 3), (0.6, 2), (1.25, 4)])
def test_stencil_rows_are_the_gaussian_lattice_filter(emulated, normalization, std, radius):
    # Row p of the stencil, laid out over the image, is the Gaussian lattice's filter of the
    # unit vectors (splat, blur along axes 0-2, slice with alpha) with the norms and the Potts
    # weight folded in: the whole operator, nothing cut off by the window, though no Gaussian
    # lattice was built. 37 x 29 = 1073 pixels: a padded image (pydensecrf's origin corners are
    # vertices the blur goes through).
    image = crop("coffee.jpg", 50, 70, 37, 29)
    probs = network_like_probs(37, 29, seed=2)
    params = DEEPLAB.replace(pos_xy_std=std, pos_w=2.5, normalization=normalization)
    crf = cuda.CudaCRF([image], [probs], params, backend=emulated, gauss_stencil=True)
    crf.prepare()
    assert crf._stencil.shape == (2 * radius + 2, 2 * radius + 1, 19 * 29, 2)  # strips of 2: 19 a column
    assert crf._stencil_info[0] == 0
    gauss, _ = cpu.kernel_features(image, params)
    lattice = cpu.build_lattice(gauss)
    n = 37 * 29
    k = lattice.filter(np.eye(n, dtype=np.float32)).astype(np.float64)  # (N, N): alpha * K, row p = pixel p
    raw = k.sum(axis=1) + 1e-20  # alpha * K 1, pydensecrf's norm before its power
    norm = 1 / np.sqrt(raw) if normalization == "symmetric" else 1 / raw
    want = params.pos_w * norm[:, None] * k
    if normalization == "symmetric":
        want = want * norm[None, :]
    got = dense_stencil(crf)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    # a real check: rows reach as far as the window allows, and not everywhere
    reach = np.abs(np.subtract.outer(np.arange(n) % 29, np.arange(n) % 29))[want > 0]
    assert reach.max() == radius
    assert 0.2 < (stencil_rows(crf) != 0).mean() < 0.95


STENCIL_CASES = {  # crops (photo, top, left, height, width), parameters, labels
    "deeplab": ([("chelsea.jpg", 60, 120, 41, 57)], DEEPLAB, 21),
    "after": ([("chelsea.jpg", 60, 120, 41, 57)], DEEPLAB.replace(normalization="after"), 21),
    # images of different widths, two of them padded; the last iteration writes the second buffer
    "batch": ([("astronaut.jpg", 0, 0, 21, 19), ("rocket.jpg", 100, 200, 30, 44), ("coffee.jpg", 0, 0, 13, 17)],
              DEEPLAB.replace(iterations=5), 21),
    # the Gaussian alone: an iteration is one launch; pydensecrf's scalar path for 2 labels
    "gaussian only": ([("rocket.jpg", 100, 200, 30, 44)], DEEPLAB.replace(bi_w=0), 2),
    # a narrower window (sigma 0.6: radius 2), 5 labels
    "narrow": ([("coffee.jpg", 40, 40, 26, 29)], DEEPLAB.replace(pos_xy_std=0.6, pos_w=5), 5),
}


@pytest.mark.parametrize("case", sorted(STENCIL_CASES))
def test_emulated_stencil_matches_pydensecrf_and_the_lattice_path(emulated, case):
    crops, params, n_labels = STENCIL_CASES[case]
    images, probs = case_inputs(crops, n_labels, seed=5)
    crf = cuda.CudaCRF(images, probs, params, backend=emulated, gauss_stencil=True)
    out = crf.run()
    assert crf._stencil is not None and crf._stencil_info[0] == 0
    lattice_path = cuda.CudaCRF(images, probs, params, backend=emulated).run()
    names = [args[0] for _, args in crf._launches]
    assert names[-1] == "mf_slice_stencil_k2"
    if params.bi_w:
        # only the bilateral lattice is built, splatted and blurred
        assert [s.d for s in crf.lattices.specs] == [5]
        assert names[:2] == ["lattice_splat", "lattice_splat_reduce"] and names.count("lattice_blur_pair") == 3
    else:
        assert crf.lattices is None and names == ["mf_slice_stencil_k2"]
    for image, p, ours, theirs in zip(images, probs, out, lattice_path):
        assert_close(ours, theirs, agreement=1.0, atol=1e-5)
        assert_close(ours, pydensecrf_reference(image, p, params), agreement=1.0, atol=1e-5)
        assert not np.allclose(ours, p, atol=1e-3)  # the CRF moved the probabilities: a real check


def test_emulated_stencil_batch_equals_singles_and_graphs_equal_direct(emulated):
    # A pixel's stencil row depends on its own image only, so a batch gives each image's result
    # bit for bit; an odd number of iterations ends in the second Q buffer, whichever way the
    # iterations are launched (two graphs replayed in turn, or one of all iterations).
    images, probs = case_inputs([("astronaut.jpg", 0, 0, 21, 19), ("chelsea.jpg", 40, 80, 30, 35)], 21, seed=1)
    params = DEEPLAB.replace(iterations=3)
    direct = cuda.CudaCRF(images, probs, params, backend=emulated, gauss_stencil=True).run()
    for image, p, out in zip(images, probs, direct):
        alone = cuda.CudaCRF([image], [p], params, backend=emulated, gauss_stencil=True).run()[0]
        assert np.array_equal(out, alone)
    for mode, captures, replays in (("iteration", [6, 6], 3), ("all", [18], 1)):
        backend = EmulatedBackend(emulated.library)
        graphed = cuda.CudaCRF(images, probs, params, backend=backend, gauss_stencil=True).run(graph=mode)
        assert backend.captures == captures and backend.replays == replays, mode
        for a, b in zip(direct, graphed):
            assert np.array_equal(a, b), mode


def test_emulated_stencil_blocks_of_several_rows(emulated):
    # gauss_stencil's threads sum into shared memory and then copy the block's rows out slot by
    # slot together, between barriers: blocks of 5 host threads (221 pixels: the last block
    # part-full) write exactly the weights one thread at a time does.
    image = crop("astronaut.jpg", 0, 0, 13, 17)
    probs = network_like_probs(13, 17, seed=2)
    weights = []
    for backend in (emulated, EmulatedBackend(emulated.library, rows=5)):
        crf = cuda.CudaCRF([image], [probs], DEEPLAB, backend=backend, gauss_stencil=True)
        crf.prepare()
        weights.append(crf._stencil)
    assert np.array_equal(weights[0], weights[1])
    assert (weights[0] != 0).mean() > 0.3


@pytest.mark.parametrize("n_labels,lanes", [(21, False), (21, True), (182, True), (2, False)])
def test_emulated_stencil_strips_equal_single_pixels(emulated, n_labels, lanes):
    # A lane group takes a strip of 2 or 4 pixels one above the other and loads each neighbour's
    # Q chunk once for all of them: each pixel still adds its terms in its window's row order, so
    # the result is that of one pixel a group, bit for bit. Heights 1, 2, 3, 5, 6 and 9 leave the
    # last strip of an image part-full; widths 1 and 2 make the windows reach past the image on
    # both sides, and the first and last images' past the batch (into Q's guard rows). 182
    # labels take the path with more chunks than lanes.
    crops = [("astronaut.jpg", 0, 0, 9, 13), ("rocket.jpg", 100, 200, 1, 17), ("coffee.jpg", 0, 0, 6, 2),
             ("chelsea.jpg", 40, 80, 5, 1), ("chelsea.jpg", 10, 10, 2, 11), ("coffee.jpg", 30, 30, 3, 7)]
    images, probs = case_inputs(crops, n_labels, seed=4)
    params = DEEPLAB.replace(iterations=3, bi_w=0 if n_labels == 2 else DEEPLAB.bi_w)
    backend = EmulatedBackend(emulated.library, lanes=True) if lanes else emulated
    runs, rows = [], []
    for strip in cuda.STENCIL_STRIPS:
        crf = cuda.CudaCRF(images, probs, params, backend=backend, gauss_stencil=True, stencil_strip=strip)
        runs.append(crf.run())
        assert crf._launches[-1][1][0] == f"mf_slice_stencil_k{strip}"
        assert crf._stencil.shape[2] == sum(-(-h // strip) * w for _, _, _, h, w in crops)
        rows.append([stencil_rows(crf, b) for b in range(len(crops))])
    for other, other_rows in zip(runs[1:], rows[1:]):
        for single, strips in zip(runs[0], other):
            assert np.array_equal(single, strips)
        for a, b in zip(rows[0], other_rows):  # the same weights, laid out for each strip height
            assert np.array_equal(a, b)
    for image, p, out in zip(images, probs, runs[-1]):  # (a crop one pixel across is a read-only view)
        assert_close(out, pydensecrf_reference(image.copy(), p, params), agreement=1.0, atol=1e-5)


@pytest.mark.parametrize("std,radius", [(0.2, 0), (0.4, 1), (0.6, 2), (1.25, 4)])
def test_emulated_stencil_every_radius(emulated, std, radius):
    # The gather is built for each window radius (R = 0 .. 4); every one, with strips of each
    # height, matches pydensecrf, and the strips agree bit for bit.
    images, probs = case_inputs([("coffee.jpg", 20, 30, 11, 9), ("rocket.jpg", 100, 200, 7, 12)], 21, seed=6)
    params = DEEPLAB.replace(iterations=3, pos_xy_std=std, pos_w=4)
    runs = []
    for strip in cuda.STENCIL_STRIPS:
        crf = cuda.CudaCRF(images, probs, params, backend=emulated, gauss_stencil=True, stencil_strip=strip)
        runs.append(crf.run())
        assert crf._stencil.shape[:2] == (2 * radius + strip, 2 * radius + 1)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert np.array_equal(a, b)
    for image, p, out in zip(images, probs, runs[0]):
        assert_close(out, pydensecrf_reference(image, p, params), agreement=1.0, atol=1e-5)
        assert not np.allclose(out, p, atol=1e-3)


def test_stencil_strip_is_checked(emulated):
    image = crop("coffee.jpg", 0, 0, 8, 8)
    with pytest.raises(ValueError, match="stencil_strip must be one of"):
        cuda.CudaCRF([image], [network_like_probs(8, 8, seed=1)], DEEPLAB, backend=emulated, stencil_strip=3)


@pytest.mark.parametrize("n_labels,group", [(21, 6), (182, 32)])
def test_emulated_stencil_lane_groups(emulated, n_labels, group):
    # Lanes as host threads: each lane gathers its own float4 chunk of the neighbours' rows.
    image = crop("astronaut.jpg", 0, 0, 13, 17)
    probs = network_like_probs(13, 17, n_labels=n_labels, seed=10)
    params = DEEPLAB.replace(iterations=3)
    threaded = EmulatedBackend(emulated.library, lanes=True)
    crf = cuda.CudaCRF([image], [probs], params, backend=threaded, gauss_stencil=True)
    out = crf.run()[0]
    assert crf.group == group and crf._stencil is not None
    assert_close(out, pydensecrf_reference(image, probs, params), agreement=1.0, atol=1e-5)


def test_emulated_stencil_falls_back_to_the_lattice(emulated, monkeypatch):
    # A wide Gaussian (the README's sigma 3: radius 11), a long strip (its box of lattice cells,
    # which the stencil build indexes, would be 4 million cells for 2000 pixels) or no memory
    # for the rows: the Gaussian goes through its lattice, and the result is the default
    # path's, bit for bit.
    image = crop("chelsea.jpg", 60, 120, 25, 31)
    probs = network_like_probs(25, 31, seed=8)
    strip = np.ascontiguousarray(np.tile(crop("chelsea.jpg", 60, 0, 1, 400), (1, 5, 1)))
    cases = [(image, probs, README), (image, probs, DEEPLAB.replace(pos_xy_std=1.3)),
             (strip, network_like_probs(1, 2000, seed=8), DEEPLAB.replace(iterations=2))]
    for im, p, params in cases:
        crf = cuda.CudaCRF([im], [p], params, backend=emulated, gauss_stencil=True)
        out = crf.run()[0]
        assert crf._stencil is None and [s.d for s in crf.lattices.specs] == [2, 5]
        assert np.array_equal(out, cuda.CudaCRF([im], [p], params, backend=emulated).run()[0])
    monkeypatch.setattr(cuda.CudaCRF, "_stencil_bytes", lambda self, radius: 1 << 60)
    crf = cuda.CudaCRF([image], [probs], DEEPLAB, backend=emulated, gauss_stencil=True)
    out = crf.run()[0]
    assert crf._stencil is None
    assert np.array_equal(out, cuda.CudaCRF([image], [probs], DEEPLAB, backend=emulated).run()[0])
    bilateral_only = cuda.CudaCRF([image], [probs], DEEPLAB.replace(pos_w=0), backend=emulated, gauss_stencil=True)
    bilateral_only.run()
    assert bilateral_only._stencil is None


@pytest.mark.parametrize("params", [DEEPLAB, DEEPLAB.replace(bi_w=0)], ids=["with-lattice", "stencil-alone"])
def test_a_corner_outside_its_cell_box_stops_the_build(emulated, params):
    # gauss_corners flags a corner its cell box cannot hold (a bug: the box is sized from the
    # image's extent). The host reads that flag at the build's wait, with the lattice's own
    # flag, or at a wait of its own when the stencil is the only kernel: the run stops rather
    # than filter with wrong weights. The kernel's flag is forced here after its launch.
    image = crop("chelsea.jpg", 60, 120, 9, 11)
    probs = network_like_probs(9, 11, seed=4)

    class Flagging(type(emulated)):
        def launch(self, name, n, args, width=1, block_rows=0):
            super().launch(name, n, args, width, block_rows)
            if name == "gauss_corners":
                args[-1][0] = 1

    flagging = Flagging.__new__(Flagging)
    flagging.__dict__.update(emulated.__dict__)
    crf = cuda.CudaCRF([image], [probs], params, backend=flagging, gauss_stencil=True)
    with pytest.raises(RuntimeError, match="Gaussian corner fell outside"):
        crf.prepare()
    assert crf._stencil is not None and crf.lattices is None


# ---------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_gpu_stencil_matches_the_lattice_path_and_cpu_oracle(normalization):
    # The shipped photos in one batch: the stencil's result is the lattice path's up to float
    # rounding, and deterministic, however the iterations are launched.
    cp = _cupy()
    photos = [load_photo(p.name) for p in PHOTOS]
    images = [cp.asarray(im) for im in photos]
    probs = [cp.asarray(network_like_probs(*im.shape[:2], seed=i)) for i, im in enumerate(photos)]
    params = DEEPLAB.replace(normalization=normalization)
    crf = cuda.CudaCRF(images, probs, params, gauss_stencil=True)
    out = [o.get() for o in crf.run()]
    assert crf._stencil is not None and int(crf._stencil_info[0]) == 0
    lattice_path = [o.get() for o in cuda.CudaCRF(images, probs, params).run()]
    for image, p, ours, theirs in zip(images, probs, out, lattice_path):
        assert_close(ours, theirs, atol=1e-5)
        assert_close(ours, cpu.dense_crf_cpu(cp.asnumpy(image), cp.asnumpy(p), params))
    for mode in ("iteration", "all"):
        again = [o.get() for o in cuda.CudaCRF(images, probs, params, gauss_stencil=True).run(graph=mode)]
        for a, b in zip(out, again):
            assert np.array_equal(a, b), mode
