"""The CPU dense CRF against pydensecrf on real photos, and the lattice's invariants."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_photo
from deeplab_cli.crf import cpu
from deeplab_cli.crf.geometry import scale_factors
from deeplab_cli.crf.params import CRFParams

DEEPLAB = CRFParams(pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3, iterations=10)
README = CRFParams(pos_w=3, pos_xy_std=3, bi_w=10, bi_xy_std=80, bi_rgb_std=13, iterations=10)


def photo_probs(image: np.ndarray, n_labels: int = 21, seed: int = 0) -> np.ndarray:
    """Realistic, deterministic softmax probabilities (C, H, W) for a photo.

    Logits: a smooth random field (coarse noise, bilinearly upsampled), plus a term that
    follows the photo's brightness for a few labels (so the bilateral kernel has edges to
    agree with), plus per-pixel noise that the CRF should clean up.
    """
    h, w, _ = image.shape
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n_labels, h // 24 + 2, w // 24 + 2))
    ys = np.linspace(0, coarse.shape[1] - 1.001, h)
    xs = np.linspace(0, coarse.shape[2] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    field = (coarse[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + coarse[:, y0 + 1][:, :, x0] * fy * (1 - fx)
             + coarse[:, y0][:, :, x0 + 1] * (1 - fy) * fx + coarse[:, y0 + 1][:, :, x0 + 1] * fy * fx)
    brightness = image.mean(axis=2) / 255.0
    logits = 2.0 * field + rng.normal(scale=0.7, size=(n_labels, h, w))
    logits[: n_labels // 3] += 3.0 * (brightness - 0.5)
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def pydensecrf_reference(image, probs, params: CRFParams) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    unary = np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1), dtype=np.float32)
    d.setUnaryEnergy(unary)
    norm = dcrf.NORMALIZE_SYMMETRIC if params.normalization == "symmetric" else dcrf.NORMALIZE_AFTER
    d.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w, normalization=norm)
    d.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std,
                           rgbim=np.array(image, dtype=np.uint8, order="C"), compat=params.bi_w,
                           normalization=norm)
    return np.asarray(d.inference(params.iterations), dtype=np.float32).reshape(c, h, w)


def crop(name: str, h: int, w: int, y: int = 0, x: int = 0) -> np.ndarray:
    return np.ascontiguousarray(load_photo(name)[y:y + h, x:x + w])


def assert_matches_pydensecrf(image, params, *, seed=0):
    probs = photo_probs(image, seed=seed)
    ours = cpu.dense_crf_cpu(image, probs, params)
    ref = pydensecrf_reference(image, probs, params)
    assert ours.shape == probs.shape and ours.dtype == np.float32
    agree = (ours.argmax(0) == ref.argmax(0)).mean()
    assert agree >= 0.9999, f"argmax agreement {agree:.6f}"
    assert np.abs(ours - ref).max() <= 1e-4
    # The CRF must actually do something on these inputs, or the comparison proves little.
    changed = (ref.argmax(0) != probs.argmax(0)).mean()
    assert changed > 0.02, f"CRF changed only {changed:.3%} of the labels"
    return ours


@pytest.mark.parametrize("params", [DEEPLAB, README], ids=["deeplab", "readme"])
def test_matches_pydensecrf_full_photo(params):
    assert_matches_pydensecrf(load_photo("chelsea.jpg"), params)  # 451 x 300, odd width


@pytest.mark.parametrize("name,params", [
    ("astronaut.jpg", DEEPLAB), ("coffee.jpg", README), ("rocket.jpg", DEEPLAB),
])
def test_matches_pydensecrf_crops(name, params):
    assert_matches_pydensecrf(crop(name, 157, 203, 40, 31), params, seed=3)


@pytest.mark.parametrize("params", [DEEPLAB, README], ids=["deeplab", "readme"])
def test_after_normalization_matches_pydensecrf(params):
    image = crop("coffee.jpg", 181, 240, 100, 200)
    ours = assert_matches_pydensecrf(image, params.replace(normalization="after"), seed=1)
    # AFTER really is a different operator from SYMMETRIC.
    symmetric = cpu.dense_crf_cpu(image, photo_probs(image, seed=1), params)
    assert np.abs(ours - symmetric).max() > 1e-3


def test_few_labels_and_one_iteration_match():
    image = crop("rocket.jpg", 64, 91, 200, 300)
    probs = photo_probs(image, n_labels=3, seed=5)
    params = DEEPLAB.replace(iterations=1, pos_w=5.0)
    ours = cpu.dense_crf_cpu(image, probs, params)
    np.testing.assert_allclose(ours, pydensecrf_reference(image, probs, params), atol=1e-5)


def test_zero_iterations_is_softmax_of_minus_unary():
    image = crop("astronaut.jpg", 33, 47)
    probs = photo_probs(image, n_labels=5)
    probs[0, :4, :4] = 0.0  # clipped to 1e-5 by the unary
    out = cpu.dense_crf_cpu(image, probs, DEEPLAB.replace(iterations=0))
    clipped = np.clip(probs, 1e-5, 1.0)
    np.testing.assert_allclose(out, clipped / clipped.sum(axis=0), rtol=1e-5, atol=1e-7)


def test_output_is_a_distribution():
    image = crop("chelsea.jpg", 50, 70)
    out = cpu.dense_crf_cpu(image, photo_probs(image, n_labels=4), README)
    assert np.isfinite(out).all() and out.min() >= 0
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


# -- lattice ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lattices():
    image = crop("coffee.jpg", 71, 97, 150, 250)
    gauss, bilateral = cpu.kernel_features(image, README)
    return [cpu.build_lattice(gauss), cpu.build_lattice(bilateral)]


def test_lattice_invariants(lattices):
    for lat in lattices:
        n, d, m = lat.n_points, lat.dim, lat.n_vertices
        assert lat.offsets.shape == (n, d + 1) and lat.weights.shape == (n, d + 1)
        np.testing.assert_allclose(lat.weights.sum(axis=1), 1.0, atol=1e-5)
        assert lat.weights.min() >= -1e-6 and lat.weights.max() <= 1 + 1e-6
        assert 0 < m <= (d + 1) * (n + 1)
        # Every vertex but the padding corners (see build_lattice) is used, keys are
        # unique, and a pixel's corners are distinct.
        assert lat.offsets.min() == 0 and m - (d + 1) <= np.unique(lat.offsets).size <= m
        assert np.unique(lat.keys, axis=0).shape[0] == m
        assert all(np.unique(row).size == d + 1 for row in lat.offsets[:: max(1, n // 500)])
        # Corners of one simplex: coordinates (with the implied last one) are each
        # congruent to the corner index modulo d+1.
        full = np.concatenate([lat.keys, -lat.keys.sum(axis=1, keepdims=True)], axis=1)
        remainder = full % (d + 1)
        assert (remainder == remainder[:, :1]).all()
        # Neighbours are keys ± the axis step, and n2 undoes n1.
        for axis in range(d + 1):
            n1, n2 = lat.neighbours[axis]
            has = n1 < m
            step = np.full(d, -1)
            if axis < d:
                step[axis] = d
            np.testing.assert_array_equal(lat.keys[n1[has]], lat.keys[has] + step)
            np.testing.assert_array_equal(n2[n1[has]], np.flatnonzero(has))


def test_padding_corners_are_extra_unused_vertices():
    """pydensecrf's SSE build also inserts the origin's corners when N % 4 != 0."""
    image = crop("astronaut.jpg", 30, 41)  # N = 1230, not a multiple of 4
    _, bilateral = cpu.kernel_features(image, DEEPLAB)
    padded, plain = cpu.build_lattice(bilateral), cpu.build_lattice(bilateral, block=1)
    # The same corners (by key) for every point, and the same weights.
    np.testing.assert_array_equal(padded.keys[padded.offsets], plain.keys[plain.offsets])
    np.testing.assert_array_equal(padded.weights, plain.weights)
    plain_keys = {tuple(k) for k in plain.keys}
    extra_ids = [v for v, k in enumerate(padded.keys) if tuple(k) not in plain_keys]
    assert 0 < len(extra_ids) <= 6 and len(extra_ids) == padded.n_vertices - plain.n_vertices
    assert not np.isin(extra_ids, padded.offsets).any()
    origin = cpu.build_lattice(np.zeros((4, 5), np.float32))  # the origin's own simplex
    assert {tuple(k) for k in padded.keys[extra_ids]} <= {tuple(k) for k in origin.keys}
    even = cpu.build_lattice(bilateral[:1228])
    assert even.n_vertices == cpu.build_lattice(bilateral[:1228], block=1).n_vertices


def test_vertex_order_reads_blur_neighbours_in_order(lattices):
    """Vertices are numbered so that each blur neighbour map is increasing (the blur
    streams through memory), and for the image kernels they follow y first."""
    for lat in lattices:
        m = lat.n_vertices
        for axis in range(lat.dim + 1):
            for side in range(2):
                nb = lat.neighbours[axis, side]
                assert (np.diff(nb[nb < m]) > 0).all()
        y_field = lat.keys[:, 0] + lat.keys[:, 1] - (2 * lat.keys[:, 2] if lat.dim > 2 else 0)
        assert (np.diff(y_field) >= 0).all()


def test_wide_codes_build_the_same_lattice(lattices, monkeypatch):
    """Keys too wide for one 62-bit code (tiny standard deviations) take the multi-word
    path, which must build the identical lattice."""
    image = crop("coffee.jpg", 71, 97, 150, 250)
    features = cpu.kernel_features(image, README)
    for feats, packed in zip(features, lattices):
        scale = scale_factors(feats.shape[1])
        monkeypatch.setattr(cpu, "_CODE_BITS", 62)
        _, _, bits = cpu._vertex_coding(feats, scale)
        monkeypatch.setattr(cpu, "_CODE_BITS", bits - 1)
        coding, _, _ = cpu._vertex_coding(feats, scale)
        assert coding.shape[0] > 1
        wide = cpu.build_lattice(feats)
        for name in ("offsets", "weights", "neighbours", "keys"):
            np.testing.assert_array_equal(getattr(wide, name), getattr(packed, name), err_msg=name)


def test_blur_sweeps_equal_blur_passes(lattices):
    """Sweeping several axes at once (with a reach that bounds the neighbour distances)
    gives bit for bit the values of one parallel pass per axis."""
    rng = np.random.default_rng(1)
    for lat in lattices:
        axes = lat.dim + 1
        grid = rng.random((lat.n_vertices + 1, 8), dtype=np.float32)
        grid[-1] = 0
        reach = cpu._axis_reach(lat.neighbours)
        assert reach.shape == (axes,) and 0 < reach.max() < lat.n_vertices
        passes = cpu._blur(lat.neighbours, grid.copy(), np.zeros_like(grid), 0, axes).copy()
        sweep = cpu._blur_sweep(lat.neighbours, grid.copy(), np.zeros_like(grid), 0, axes,
                                reach.max())
        np.testing.assert_array_equal(sweep, passes)
        op = cpu._KernelOperator(lat, 1.0, "symmetric")
        groups = op.blur_groups(8 * 4)
        assert [a for first, stop, _ in groups for a in range(first, stop)] == list(range(axes))
        blurred = op.blur(grid.copy(), np.zeros_like(grid))
        np.testing.assert_array_equal(blurred, passes)


def test_blur_groups_split_far_axes():
    """On a photo's bilateral lattice the spatial axes reach far (passes) and the colour
    axes near (one sweep)."""
    image = crop("rocket.jpg", 200, 260, 100, 150)
    _, bilateral = cpu.kernel_features(image, DEEPLAB)
    op = cpu._KernelOperator(cpu.build_lattice(bilateral), 1.0, "symmetric")
    assert op.reach[:3].min() > 10 * op.reach[3:].max()
    assert op.blur_groups(24 * 4)[-1][:2] == (3, 6)


def test_growing_hash_table_builds_the_same_lattice(lattices, monkeypatch):
    """Starting from the smallest hash table and vertex store (many rehashes) changes nothing."""
    image = crop("coffee.jpg", 71, 97, 150, 250)
    _, bilateral = cpu.kernel_features(image, README)
    monkeypatch.setattr(cpu, "_VERTICES_PER_POINT", 0)
    grown = cpu.build_lattice(bilateral)
    packed = lattices[1]
    for name in ("offsets", "weights", "neighbours", "keys"):
        np.testing.assert_array_equal(getattr(grown, name), getattr(packed, name), err_msg=name)


def test_chunked_build_matches_whole(lattices, monkeypatch):
    image = crop("coffee.jpg", 71, 97, 150, 250)
    gauss, _ = cpu.kernel_features(image, README)
    monkeypatch.setattr(cpu, "_CHUNK_PIXELS", 1000)
    chunked = cpu.build_lattice(gauss)
    for name in ("offsets", "weights", "neighbours", "keys"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(lattices[0], name),
                                      err_msg=name)


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_fast_operator_equals_staged_filter(lattices, normalization):
    """The compiled splat / blur / slice loops compute the staged filter, normalized."""
    rng = np.random.default_rng(0)
    for lat in lattices:
        values = rng.random((lat.n_points, 4), dtype=np.float32)
        norm = lat.filter(np.ones((lat.n_points, 1), np.float32))[:, 0].astype(np.float64)
        if normalization == "symmetric":
            n = (1 / np.sqrt(norm + 1e-20)).astype(np.float32)[:, None]
            expected = n * lat.filter(n * values)
        else:
            n = (1 / (norm + 1e-20)).astype(np.float32)[:, None]
            expected = n * lat.filter(values)
        op = cpu._KernelOperator(lat, 2.5, normalization)
        out = np.zeros((lat.n_points, 4), np.float32)
        op.add_message(out, values)
        np.testing.assert_allclose(out, 2.5 * expected, rtol=1e-5, atol=1e-6)


def test_feature_order_matters():
    """Bilateral features are (x, y, r, g, b): swapping colour channels changes the result."""
    image = crop("astronaut.jpg", 60, 80, 200, 200)
    probs = photo_probs(image, n_labels=4)
    a = cpu.dense_crf_cpu(image, probs, README)
    b = cpu.dense_crf_cpu(np.ascontiguousarray(image[..., ::-1]), probs, README)
    assert np.abs(a - b).max() > 1e-4


def test_result_does_not_depend_on_the_thread_count():
    image = crop("rocket.jpg", 97, 131, 150, 200)
    probs = photo_probs(image, n_labels=6, seed=2)
    one = cpu.dense_crf_cpu(image, probs, DEEPLAB.replace(iterations=3), threads=1)
    two = cpu.dense_crf_cpu(image, probs, DEEPLAB.replace(iterations=3), threads=2)
    np.testing.assert_array_equal(one, two)


def test_vectorized_exp_is_accurate():
    import numba

    @numba.njit
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = cpu._exp(x[i])

    x = np.concatenate([-np.linspace(0, 87, 100_003), np.linspace(0, 80, 1001)]).astype(np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    exact = np.exp(x.astype(np.float64))
    assert out[0] == 1.0
    np.testing.assert_allclose(out, exact, rtol=2.5e-7, atol=0)
    exp_all(np.array([-88.0, -200.0, -np.inf], np.float32), out[:3])
    assert (out[:3] >= 0).all() and (out[:3] < 2e-38).all()



@pytest.mark.parametrize("caller", ["main thread", "worker thread"])
def test_first_crf_keeps_the_callers_torch_thread_count(caller):
    # numba's OpenMP pool starts on a process's first parallel CRF and sets the calling
    # thread's OpenMP thread count, which torch reads from the same libgomp: a fresh process.
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: numba and torch would both pick 1 thread")
    code = (
        "import threading, numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))\n"
        "from deeplab_cli.crf import dense_crf\n"
        "rng = np.random.default_rng(0)\n"
        "image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)\n"
        "p = rng.random((3, 6, 7)).astype(np.float32); p /= p.sum(0)\n"
        "def run():\n"
        "    before = torch.get_num_threads(); dense_crf(image, p)\n"
        "    print('THREADS', before, torch.get_num_threads())\n"
        + ("run()\n" if caller == "main thread" else
           "t = threading.Thread(target=run); t.start(); t.join()\n")
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["NUMBA_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "THREADS 1 1" in out.stdout, out.stdout
