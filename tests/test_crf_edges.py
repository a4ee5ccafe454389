"""The dense CRF at its numerical and geometric edges, on the CPU and through the CUDA kernels
compiled for the CPU (g++ emulation): tiny and thin images, degenerate probabilities and
colours, extreme parameters, the size limits, and batches mixing all of these."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

from deeplab_cli.crf import check_size, cpu, cuda, dense_crf, geometry
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError
from emulation import build_emulated

DEEPLAB = CRFParams()
README = CRFParams(pos_w=3, pos_xy_std=3, bi_w=10, bi_xy_std=80, bi_rgb_std=13)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("edges"))


def reference(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1), dtype=np.float32))
    norm = dcrf.NORMALIZE_SYMMETRIC if params.normalization == "symmetric" else dcrf.NORMALIZE_AFTER
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w, normalization=norm)
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.array(image, np.uint8, order="C"),
                             compat=params.bi_w, normalization=norm)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(c, h, w)


def on_emulated(backend, images, probs, params, **options) -> list[np.ndarray]:
    return cuda.CudaCRF(images, [np.ascontiguousarray(p, np.float32) for p in probs], params, backend=backend,
                        **options).run()


def assert_close(out: np.ndarray, ref: np.ndarray, *, atol: float = 1e-4) -> None:
    """The issue's bar: argmax agreement >= 99.99%, every probability within 1e-4, no NaN."""
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    agree = float((out.argmax(0) == ref.argmax(0)).mean())
    diff = float(np.abs(out - ref).max())
    assert agree >= 0.9999 and diff <= atol, f"argmax agreement {agree:.6f}, max abs diff {diff:.2e}"


def check_all_paths(backend, image, probs, params, *, atol: float = 1e-4) -> np.ndarray:
    """CPU and emulated CUDA against pydensecrf and each other; both deterministic. Returns the CPU result."""
    probs = np.ascontiguousarray(probs, np.float32)
    ours = cpu.dense_crf_cpu(image, probs, params)
    gpu = on_emulated(backend, [image], [probs], params)[0]
    ref = reference(image, probs, params)
    assert_close(ours, ref, atol=atol)
    assert_close(gpu, ref, atol=atol)
    assert_close(gpu, ours, atol=atol)
    assert np.array_equal(ours, cpu.dense_crf_cpu(image, probs, params))
    assert np.array_equal(gpu, on_emulated(backend, [image], [probs], params)[0])
    return ours


def softmax(height: int, width: int, n_labels: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=scale, size=(n_labels, height, width))
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def one_hot(height: int, width: int, n_labels: int, seed: int = 0) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, n_labels, (height, width))
    return (np.arange(n_labels)[:, None, None] == labels).astype(np.float32)


def images(height: int, width: int) -> dict[str, np.ndarray]:
    """Colour patterns the bilateral lattice finds hard: noise, one colour (every pixel on a
    few vertices, long splat runs), two colours, a black-and-white checkerboard."""
    halves = np.where(np.arange(width) < width // 2, 20, 200).astype(np.uint8)
    checker = (np.indices((height, width)).sum(0) % 2 * 255).astype(np.uint8)
    return {
        "noise": noise(height, width, 5),
        "constant": np.full((height, width, 3), 77, np.uint8),
        "two colours": np.ascontiguousarray(np.broadcast_to(halves[None, :, None], (height, width, 3))),
        "checkerboard": np.ascontiguousarray(np.repeat(checker[..., None], 3, axis=2)),
    }


# ---------------------------------------------------------------------------------------------
# Tiny and thin images (H*W not a multiple of 4: pydensecrf's padding corners)


@pytest.mark.parametrize("height,width", [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (1, 2)])
@pytest.mark.parametrize("n_labels", [2, 3, 21])
def test_tiny_and_thin_images(emulated, height, width, n_labels):
    image = noise(height, width, height * 10 + width)
    for params in (DEEPLAB, README.replace(normalization="after")):
        check_all_paths(emulated, image, softmax(height, width, n_labels, seed=n_labels), params, atol=1e-5)


def test_one_label_is_refused_by_the_api_and_certain_inside(emulated):
    image, probs = noise(3, 5), np.ones((1, 3, 5), np.float32)
    with pytest.raises(DeeplabError, match="at least 2 labels"):
        dense_crf(image, probs)
    assert (cpu.dense_crf_cpu(image, probs, DEEPLAB) == 1).all()
    assert (on_emulated(emulated, [image], [probs], DEEPLAB)[0] == 1).all()


# ---------------------------------------------------------------------------------------------
# Degenerate probabilities and colours


def _probabilities(kind: str, height: int, width: int) -> np.ndarray:
    if kind == "uniform":
        return np.full((5, height, width), 0.2, np.float32)
    if kind == "uniform, 2 labels":
        return np.full((2, height, width), 0.5, np.float32)
    if kind == "one-hot":  # 0 and 1 exactly: the clip at 1e-5
        return one_hot(height, width, 5)
    if kind == "one-hot, 2 labels":
        return one_hot(height, width, 2, seed=1)
    if kind == "denormals":
        p = one_hot(height, width, 5, seed=2)
        p[p == 0] = 1e-42
        return p
    assert kind == "float16"
    return softmax(height, width, 21, seed=4).astype(np.float16).astype(np.float32)


PROBABILITIES = ["uniform", "uniform, 2 labels", "one-hot", "one-hot, 2 labels", "denormals", "float16"]


@pytest.mark.parametrize("kind", PROBABILITIES)
@pytest.mark.parametrize("colours", sorted(images(1, 2)))
def test_degenerate_probabilities_and_colours(emulated, kind, colours):
    height, width = 9, 13  # 117 pixels: padding corners too
    image, probs = images(height, width)[colours], _probabilities(kind, height, width)
    for params in (DEEPLAB, DEEPLAB.replace(normalization="after"), README):
        out = check_all_paths(emulated, image, probs, params)
        if kind.startswith("uniform"):
            # Every label sees the same messages: the ties stay exact ties.
            assert (out == out[:1]).all()


# ---------------------------------------------------------------------------------------------
# Extreme parameters

EXTREMES = {
    "tiny pos_xy_std": DEEPLAB.replace(pos_xy_std=1e-3),  # fits int16 on an image this small
    "tiny bi_rgb_std": DEEPLAB.replace(bi_rgb_std=0.05),
    "huge stds": DEEPLAB.replace(pos_xy_std=1e6, bi_xy_std=1e6, bi_rgb_std=1e6),  # one simplex
    "huge bi_rgb_std": DEEPLAB.replace(bi_rgb_std=1e30),
    "Gaussian off": DEEPLAB.replace(pos_w=0),
    "bilateral off": DEEPLAB.replace(bi_w=0),
    "both off": DEEPLAB.replace(pos_w=0, bi_w=0, iterations=3),
    "negative weights": DEEPLAB.replace(pos_w=-3, bi_w=-4),
    "large negative weights": DEEPLAB.replace(pos_w=-300, bi_w=-400),
    "largest weights": DEEPLAB.replace(pos_w=1e30, bi_w=1e30),
    "largest negative weights": DEEPLAB.replace(pos_w=-1e30, bi_w=-1e30),
    "largest, after": DEEPLAB.replace(pos_w=1e30, bi_w=-1e30, normalization="after"),
    "0 iterations": DEEPLAB.replace(iterations=0),
    "1 iteration": DEEPLAB.replace(iterations=1),
    "after": DEEPLAB.replace(normalization="after"),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_extreme_parameters(emulated, case):
    for colours in ("noise", "constant"):
        image = images(7, 11)[colours]
        check_all_paths(emulated, image, softmax(7, 11, 4, seed=2), EXTREMES[case])


def test_stds_beyond_float32_are_inf_quietly(emulated):
    # pydensecrf takes the stds as float32: 1e300 becomes inf, every feature 0. Same here,
    # without an overflow warning on the way.
    image, probs = noise(5, 7), softmax(5, 7, 3)
    params = DEEPLAB.replace(pos_xy_std=1e300, bi_xy_std=1e300, bi_rgb_std=1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_size(5, 7, 3, params)
        ours = cpu.dense_crf_cpu(image, probs, params)
        gpu = on_emulated(emulated, [image], [probs], params)[0]
    assert_close(gpu, ours, atol=1e-6)
    assert_close(ours, reference(image, probs, params))


@pytest.mark.parametrize("field,value,message", [
    ("pos_xy_std", 1e-46, "CRF parameter pos_xy_std 1e-46 rounds to 0 in float32"),
    ("bi_xy_std", 1e-300, "CRF parameter bi_xy_std 1e-300 rounds to 0 in float32"),
    ("bi_rgb_std", 1e-46, "CRF parameter bi_rgb_std 1e-46 rounds to 0 in float32"),
    ("pos_w", 3e38, "CRF parameter pos_w 3e+38 is too large"),
    ("bi_w", -1e300, "CRF parameter bi_w -1e+300 is too large"),
    ("bi_w", 1.0000001e30, "CRF parameter bi_w 1.0000001e+30 is too large"),
])
def test_parameters_float32_cannot_carry_are_refused(field, value, message):
    # A σ that is 0 in float32 made features x/σ inf or NaN (a ZeroDivisionError in
    # check_size, a crash in the CPU lattice), and a weight near float32's range made the
    # energies inf and every probability NaN. CRFParams refuses them (so the CLI can name the
    # flag), and check_size again for any object with those fields.
    with pytest.raises(DeeplabError) as info:
        DEEPLAB.replace(**{field: value})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    unchecked = types.SimpleNamespace(**{**DEEPLAB.to_dict(), field: value})
    with pytest.raises(DeeplabError) as info:
        check_size(7, 11, None, unchecked)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------------------------------------
# Size limits


def _smallest_std(field: str, height: int, width: int) -> tuple[float, float]:
    """(smallest σ `check_size` takes for `field` at this size, a σ just below it)."""
    inside, outside = 1e3, 1e-6
    for _ in range(80):
        middle = (inside + outside) / 2
        try:
            check_size(height, width, None, DEEPLAB.replace(**{field: middle}))
            inside = middle
        except DeeplabError:
            outside = middle
    return inside, outside


@pytest.mark.parametrize("field", ["pos_xy_std", "bi_xy_std", "bi_rgb_std"])
def test_int16_limit_just_inside_runs_and_just_outside_is_refused(emulated, field):
    height, width = 2, 3
    image = noise(height, width, 1)
    image[0, 0], image[1, 2] = 255, 0  # the colour extremes
    probs = softmax(height, width, 3, seed=1)
    inside, outside = _smallest_std(field, height, width)
    out = check_all_paths(emulated, image, probs, DEEPLAB.replace(**{field: inside}), atol=1e-5)
    spec = geometry.kernel_specs(DEEPLAB.replace(**{field: inside}))[0 if field == "pos_xy_std" else 1]
    features = cpu.kernel_features(image, DEEPLAB.replace(**{field: inside}))[0 if spec.d == 2 else 1]
    keys = cpu.build_lattice(features).keys
    assert np.abs(keys).max() > 25000  # the lattice really reaches towards int16's end
    assert np.isfinite(out).all()
    params = DEEPLAB.replace(**{field: outside})
    messages = []
    for run in (lambda: dense_crf(image, probs, params),
                lambda: cpu.dense_crf_cpu(image, probs, params),
                lambda: cuda.CudaCRF([image], [probs], params, backend=types.SimpleNamespace(xp=np))):
        with pytest.raises(DeeplabError, match=f"beyond int16 with these .*{field}") as info:
            run()
        messages.append(str(info.value))
    assert len(set(messages)) == 1 and "\n" not in messages[0]


def test_index_limit_counts_both_lattices_corners():
    # The CUDA build keeps both lattices' corners (3 + 6 per pixel, and per padded image its
    # origin's) in arrays indexed by int32, so the limit is 9 corners a slot, not 6: 239 MP.
    params = DEEPLAB.replace(pos_xy_std=1e5, bi_xy_std=1e5)  # keys fit int16 on a 1-pixel-high strip
    per_slot = sum(spec.d + 1 for spec in geometry.kernel_specs(params))
    assert per_slot == 9
    width = geometry.INDEX_LIMIT // per_slot - 1  # plus the padding origin: just fits
    check_size(1, width, 2, params)
    with pytest.raises(DeeplabError, match=r"^CRF: a 238609294x1 image is 239 MP, over the lattice's 239 MP limit"):
        check_size(1, width + 1, 2, params)
    geometry.check_size(1, width // 2 - 1, params, n_images=2)
    with pytest.raises(DeeplabError, match="2 images of"):
        geometry.check_size(1, width // 2 + 1, params, n_images=2)
    # 300 MP fitted under the old 6-a-slot count: 2.7e9 entries, past int32, on the GPU.
    with pytest.raises(DeeplabError, match="int32"):
        check_size(1, 300_000_000, 2, params)


# ---------------------------------------------------------------------------------------------
# Long splat runs, batches, threads


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_constant_image_collapses_to_long_splat_runs(emulated, normalization):
    height, width = 24, 41  # 984 pixels on a handful of bilateral vertices
    image = np.full((height, width, 3), 128, np.uint8)
    probs = softmax(height, width, 5, seed=6)
    params = DEEPLAB.replace(normalization=normalization)
    crf = cuda.CudaCRF([image], [probs], params, backend=emulated)
    gpu = crf.run()[0]
    assert crf.lattices.n_runs[0] > crf.lattices.n_vertices  # some vertex cut into several runs
    ours = cpu.dense_crf_cpu(image, probs, params)
    ref = reference(image, probs, params)
    assert_close(ours, ref)
    assert_close(gpu, ref)


BATCH_PARAMS = {
    "deeplab": DEEPLAB, "after": DEEPLAB.replace(normalization="after"), "Gaussian off": DEEPLAB.replace(pos_w=0),
    "bilateral off": DEEPLAB.replace(bi_w=0), "negative": DEEPLAB.replace(pos_w=-2, bi_w=-5),
    "1 iteration": DEEPLAB.replace(iterations=1), "0 iterations": DEEPLAB.replace(iterations=0),
    "huge stds": DEEPLAB.replace(pos_xy_std=1e6, bi_xy_std=1e6, bi_rgb_std=1e6),
    "small stds": DEEPLAB.replace(pos_xy_std=0.01, bi_rgb_std=0.5),
}


@pytest.mark.parametrize("which", sorted(BATCH_PARAMS))
def test_batch_of_edge_cases_equals_each_alone(emulated, which):
    params = BATCH_PARAMS[which]
    batch = [noise(1, 1, 1), noise(1, 7, 2), noise(7, 1, 3), np.full((3, 5, 3), 40, np.uint8),
             images(4, 6)["checkerboard"], noise(2, 2, 4), np.zeros((5, 3, 3), np.uint8)]
    probs = [softmax(*im.shape[:2], 3, seed=i) for i, im in enumerate(batch)]
    probs[3][:] = 1 / 3
    probs[4] = one_hot(4, 6, 3)
    for gauss_grid in (False, True):
        together = on_emulated(emulated, batch, probs, params, gauss_grid=gauss_grid)
        for image, p, out in zip(batch, probs, together):
            alone = on_emulated(emulated, [image], [p], params, gauss_grid=gauss_grid)[0]
            assert np.array_equal(out, alone)
            if not gauss_grid:
                assert_close(out, reference(image, p, params), atol=1e-5)
                assert_close(cpu.dense_crf_cpu(image, p, params), out, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (3, 5)])
def test_edge_cases_do_not_depend_on_the_thread_count(shape):
    # One thread sweeps runs of blur axes together (_blur_sweep); here with no neighbours at
    # all (1x1) or along one line only.
    probs = softmax(*shape, 5, seed=3)
    for image in (noise(*shape, 2), np.full((*shape, 3), 7, np.uint8)):
        for params in (DEEPLAB, EXTREMES["huge stds"], EXTREMES["after"]):
            one = cpu.dense_crf_cpu(image, probs, params, threads=1)
            assert np.array_equal(one, cpu.dense_crf_cpu(image, probs, params, threads=2))
