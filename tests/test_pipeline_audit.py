"""The Segmenter and the model as a library user drives them: odd inputs, odd options,
threads. CPU only, random 5-class DeepLab v2 weights, images of a few pixels."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError
from deeplab_cli.model import build_model, predict_probs, preprocess
from deeplab_cli.pipeline import Segmenter, _cudnn_tf32_off, crf_memory_bytes, format_bytes, network_size

N_CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(N_CLASSES)
    with torch.no_grad():  # a livelier classifier than the init's, so labels vary
        for i in range(4):
            getattr(net.base.aspp, f"c{i}").weight.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def meta():
    return SimpleNamespace(classes=[f"c{i}" for i in range(N_CLASSES)], crf=CRFParams(iterations=2))


@pytest.fixture(scope="module")
def seg(model, meta):
    return Segmenter(model, meta, device="cpu", crf=CRFParams(iterations=2), max_size=32)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


RGB = image(13, 17)


# --- images that are not RGB uint8 ---------------------------------------------------------


@pytest.mark.parametrize("bad, shown", [
    (RGB / 255.0, "float64 (13, 17, 3)"),
    (RGB.astype(np.uint16) * 257, "uint16 (13, 17, 3)"),
    (RGB > 127, "bool (13, 17, 3)"),
    (RGB[..., 0], "uint8 (13, 17)"),
    (np.dstack([RGB, RGB[..., :1]]), "uint8 (13, 17, 4)"),
    (RGB[..., :1], "uint8 (13, 17, 1)"),
    (RGB[None], "uint8 (1, 13, 17, 3)"),
])
def test_a_bad_image_is_a_one_line_value_error_showing_its_own_shape(seg, bad, shown):
    for call in (seg.segment, seg.probs):
        with pytest.raises(ValueError) as info:
            call(bad)
        message = str(info.value)
        assert "\n" not in message and "expected RGB uint8 (H, W, 3)" in message
        assert f"got {shown};" in message  # the caller's shape, not the internal batch's


@pytest.mark.parametrize("empty", [RGB[:0], RGB[:, :0], np.zeros((0, 0, 3), np.uint8)])
def test_an_empty_image_is_a_value_error_not_a_torch_traceback(seg, empty):
    for call in (seg.segment, seg.probs):
        with pytest.raises(ValueError, match=r"^image: empty image \(\d+x\d+\)$"):
            call(empty)


def test_segment_batch_names_the_bad_image_and_takes_views(seg):
    with pytest.raises(ValueError, match="^image 1: expected RGB uint8"):
        seg.segment_batch([RGB, RGB.astype(np.float32)])
    with pytest.raises(ValueError, match="one size"):
        seg.segment_batch([RGB, RGB[:5]])
    assert seg.segment_batch([]) == []
    # Flipped, Fortran-ordered and read-only views give the same labels as a plain copy.
    flipped = RGB[:, ::-1]
    readonly = flipped.copy()
    readonly.flags.writeable = False
    expected = seg.segment(flipped.copy()).labels
    for view in (flipped, np.asfortranarray(flipped), readonly):
        np.testing.assert_array_equal(seg.segment(view).labels, expected)


# --- tiny and elongated images -------------------------------------------------------------


@pytest.mark.parametrize("height, width, max_size", [
    (1, 1, 32), (1, 17, 32), (13, 1, 32), (3, 2000, 32), (13, 17, 1), (2, 3, 0),
])
def test_images_a_few_pixels_across_segment_with_msc(model, meta, height, width, max_size):
    """The 0.5 scale of MSC rounds a 1-pixel side to 0 pixels (and a 3x2000 image seen at
    1x32 has a 1-pixel side); that used to be a torch RuntimeError."""
    rgb = image(height, width)
    seg = Segmenter(model, meta, device="cpu", crf=CRFParams(iterations=1), max_size=max_size)
    result = seg.segment(rgb, keep_probs=True)
    assert result.network_size == network_size(height, width, max_size)
    assert result.labels.shape == (height, width) and result.labels.dtype == np.uint8
    torch.testing.assert_close(result.probs.sum(0), torch.ones(height, width), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(result.labels, result.probs.argmax(0).numpy())
    probs = seg.probs(rgb)
    assert probs.shape == (N_CLASSES, height, width)
    torch.testing.assert_close(probs.sum(0), torch.ones(height, width), atol=1e-5, rtol=0)


def test_msc_on_a_one_pixel_input_is_the_single_scale_network(model):
    """Each scaled copy of a 1x1 input is that pixel, so the max over scales is the base's."""
    x = preprocess(image(1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model(x, msc=True), model(x, msc=False))
        for size in [(1, 17), (3, 1), (1, 250)]:
            x = preprocess(image(*size))
            assert model(x, msc=True).shape == model(x, msc=False).shape
    probs = predict_probs(model, preprocess(image(1, 9)), msc=True)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 1, 9))


def test_predict_probs_refuses_empty_inputs_and_sizes(model):
    with pytest.raises(ValueError, match="predict_probs"):
        predict_probs(model, preprocess(image(1, 1)), size=(0, 4))
    with pytest.raises(ValueError, match="predict_probs"):
        predict_probs(model, preprocess(np.zeros((0, 4, 3), np.uint8)))


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_size", ["32", 2.5, True, None])
def test_a_max_size_that_is_not_a_whole_number_is_refused(model, meta, max_size):
    with pytest.raises(DeeplabError, match="--max-size .*whole number"):
        Segmenter(model, meta, device="cpu", crf=None, max_size=max_size)


def test_numpy_integer_max_size_is_accepted(model, meta):
    seg = Segmenter(model, meta, device="cpu", crf=None, max_size=np.int64(9))
    assert seg.network_size(13, 17) == (7, 9)


@pytest.mark.parametrize("budget", [-1, 0, "1e9", float("nan")])
def test_a_memory_budget_that_is_not_positive_is_refused(model, meta, budget):
    with pytest.raises(DeeplabError, match="memory budget"):
        Segmenter(model, meta, device="cpu", crf=CRFParams(), memory_budget=budget)


def test_device_strings_give_one_line_errors(model, meta):
    with pytest.raises(DeeplabError, match="--device cudax: expected auto, cpu, cuda or cuda:N"):
        Segmenter(model, meta, device="cudax", crf=None)
    if not torch.cuda.is_available():
        # Refused at once, not at the first image with "Torch not compiled with CUDA".
        with pytest.raises(DeeplabError, match="CUDA is not available"):
            Segmenter(model, meta, device="cuda", crf=None)
    assert Segmenter(model, meta, device=" CPU", crf=None).device == torch.device("cpu")


BAD_DEVICES = [
    ("mps", "--device mps: expected auto, cpu, cuda or cuda:N (the CRF runs only on the CPU or CUDA)"),
    (torch.device("xpu"), "--device xpu: expected auto, cpu, cuda or cuda:N (the CRF runs only on "
                          "the CPU or CUDA)"),
    ("meta", "--device meta: expected auto, cpu, cuda or cuda:N"),
    ("gpu 0\n", "--device 'gpu 0': expected auto, cpu, cuda or cuda:N"),
    (0, "--device 0: expected auto, cpu, cuda or cuda:N or a torch.device"),
    ("cuda:-1", "--device cuda:-1: expected cuda:N with N a number from 0"),
    ("CUDA:1", "--device cuda:1: no such GPU; found 1: cuda:0 Fake GPU"),
    (torch.device("cuda", 2), "--device cuda:2: no such GPU; found 1: cuda:0 Fake GPU"),
]


@pytest.mark.parametrize("spec,message", BAD_DEVICES, ids=[str(s) for s, _ in BAD_DEVICES])
def test_every_entry_point_refuses_a_device_alike(model, meta, tmp_path, monkeypatch, spec, message):
    """weights.load_model used to hand 'mps', 'xpu' and any torch device string to torch, and
    Segmenter any torch.device: the CRF has no path for those. Now load_model, Segmenter and
    Segmenter.from_weights take devices through resolve_device, with the same messages."""
    from deeplab_cli.device import resolve_device
    from deeplab_cli.weights import load_model

    # One GPU, as torch would report it (the checks come before any CUDA call is made).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    never_read = tmp_path / "never-read.pth"  # the device is checked before any file is read
    calls = [lambda: resolve_device(spec), lambda: load_model(never_read, device=spec),
             lambda: Segmenter(model, meta, device=spec, crf=None),
             lambda: Segmenter.from_weights(never_read, device=spec)]
    for call in calls:
        with pytest.raises(DeeplabError) as info:
            call()
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_segmenter_takes_cpu_devices_and_refuses_cuda_without_a_gpu(model, meta, tmp_path):
    from deeplab_cli.weights import load_model

    for spec in ("cpu", " CPU", torch.device("cpu")):  # (load_model: test_weights_audit)
        assert Segmenter(model, meta, device=spec, crf=None).device == torch.device("cpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", torch.device("cuda"), "cuda:0"):
            for call in (lambda: Segmenter(model, meta, device=spec, crf=None),
                         lambda: load_model(tmp_path / "never-read.pth", device=spec)):
                with pytest.raises(DeeplabError, match=r"^--device cuda(:0)?: CUDA is not available"):
                    call()


def test_the_segmenters_copy_of_the_model_goes_to_its_device(model, meta, monkeypatch):
    """A model on another device than `device` is moved with the copy (the meta device
    stands in for a GPU here, past the device check, which refuses it); the caller's model
    stays where it was."""
    monkeypatch.setattr("deeplab_cli.device.resolve_device", lambda spec, **kw: torch.device("meta"))
    seg = Segmenter(model, meta, device="cuda", crf=None)
    assert {p.device.type for p in seg.model.parameters()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_crf_may_be_a_dict_of_its_fields(model, meta):
    seg = Segmenter(model, meta, device="cpu", crf={"iterations": 1, "bi_w": 5}, max_size=9)
    assert seg.crf == CRFParams(iterations=1, bi_w=5)
    assert seg.segment(RGB).crf_size == (13, 17)
    with pytest.raises(DeeplabError, match="crf: unknown CRF parameter"):
        Segmenter(model, meta, device="cpu", crf={"iters": 1})
    with pytest.raises(DeeplabError, match="crf: expected CRFParams"):
        Segmenter(model, meta, device="cpu", crf=5)


# --- refine, CRF parameters and the CRF's resolution -----------------------------------------


def test_refine_takes_numpy_probabilities(seg):
    """NumPy 2 arrays have a `.device` attribute (the string 'cpu'); refine used to take
    it for a torch device and fail with AttributeError."""
    probs = seg.probs(RGB)
    refined = seg.refine(RGB, probs.numpy())
    assert isinstance(refined, np.ndarray) and refined.dtype == np.float32
    np.testing.assert_allclose(refined, seg.refine(RGB, probs).numpy(), atol=1e-6)
    np.testing.assert_allclose(refined.sum(0), 1, atol=1e-4)


def test_crf_params_scale_by_the_longer_side_of_a_long_image(model, meta):
    seg = Segmenter(model, meta, device="cpu", crf=CRFParams(), max_size=9)
    rgb = np.zeros((3, 2000, 3), np.uint8)
    assert seg.network_size(3, 2000) == (1, 9)
    params = seg.crf_params_for(rgb)
    # The network saw the image scaled by 9 / 2000 (the 3-pixel side only rounds to 1).
    assert params.bi_xy_std == pytest.approx(67 * 2000 / 9)
    assert params.pos_xy_std == pytest.approx(2000 / 9)
    assert params.bi_rgb_std == 3
    # Small images are never upscaled, so their parameters stay as tuned.
    assert seg.crf_params_for(image(2, 3)) == CRFParams()


def test_a_crf_the_lattice_cannot_index_says_so_not_out_of_memory(model, meta):
    """At native size (max_size 0) a 1x30000 image's Gaussian lattice coordinates overflow
    int16 with pos_xy_std 1; shrinking cannot help (the stds shrink with it), and the error
    used to blame memory ('0.0 GB needed, 14 GB available')."""
    seg = Segmenter(model, meta, device="cpu", crf=CRFParams(), max_size=0)
    with pytest.raises(DeeplabError, match="int16") as info:
        seg.crf_size(1, 30000)
    assert "memory" not in str(info.value)
    # With the network at 513 the stds grow with the image, and it fits at full size.
    assert Segmenter(model, meta, device="cpu", crf=CRFParams()).crf_size(1, 30000) == (1, 30000)


@pytest.mark.parametrize("height, width", [(37, 53), (3, 2000), (2000, 3), (400, 400)])
def test_the_crf_fallback_size_fits_and_never_goes_below_the_network(seg, height, width):
    net = network_size(height, width, 32)
    full = crf_memory_bytes(height, width, N_CLASSES)
    floor = crf_memory_bytes(*net, N_CLASSES)
    for budget in sorted({1, floor - 1, floor, (floor + full) // 2, full - 1, full, 10 * full}):
        if budget < floor:
            with pytest.raises(DeeplabError, match="not enough memory for the CRF"):
                seg.crf_size(height, width, budget=budget)
            continue
        h, w = seg.crf_size(height, width, budget=budget)
        assert net[0] <= h <= height and net[1] <= w <= width
        assert crf_memory_bytes(h, w, N_CLASSES) <= budget
        if budget >= full:
            assert (h, w) == (height, width)


# --- threads, determinism, the caller's model ------------------------------------------------


def test_tf32_switch_survives_overlapping_blocks_from_two_threads():
    """The fp32 network on CUDA turns cuDNN's TF32 off for its block. Two threads whose
    blocks overlap used to leave TF32 on under the one still running, then off for good."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with _cudnn_tf32_off():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with _cudnn_tf32_off():
            b_in.set()
            a_out.wait(5)
            seen["inside after the first left"] = torch.backends.cudnn.allow_tf32

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == {"inside after the first left": False}
        assert torch.backends.cudnn.allow_tf32 is True  # the caller's setting is back
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_one_segmenter_from_two_threads_is_deterministic(seg):
    rgbs = [image(13, 17, seed) for seed in range(2)]
    expected = [seg.segment(rgb, keep_probs=True) for rgb in rgbs]
    again = seg.segment(rgbs[0], keep_probs=True)
    assert torch.equal(again.probs, expected[0].probs)
    results: dict = {}

    def work(k):
        results[k] = [seg.segment(rgbs[k], keep_probs=True) for _ in range(2)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(2):
        for res in results[k]:
            np.testing.assert_array_equal(res.labels, expected[k].labels)
            assert torch.equal(res.probs, expected[k].probs)


def test_the_callers_model_is_left_as_it_was(meta):
    torch.manual_seed(1)
    net = build_model(3).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seg = Segmenter(net, meta, device="cpu", crf=None, max_size=9, precision="bf16",
                    memory_format="channels_last")
    seg.segment(RGB)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(p.requires_grad for n, p in net.named_parameters() if ".bn." not in n)


def test_more_than_256_classes_give_uint16_labels(meta):
    torch.manual_seed(2)
    net = build_model(257, aspp="S")
    with torch.no_grad():
        for i in range(4):
            getattr(net.base.aspp, f"c{i}").weight.normal_(0, 0.05)
            getattr(net.base.aspp, f"c{i}").bias[256] = 50.0  # class 256 wins everywhere
    seg = Segmenter(net, meta, device="cpu", crf=None, max_size=9, msc=False)
    labels = seg.segment(RGB).labels
    assert labels.dtype == np.uint16 and (labels == 256).all()


def test_keep_probs_with_the_crf_at_a_smaller_size_gives_a_distribution_at_the_original(model, meta):
    height, width = 37, 53
    net = network_size(height, width, 32)
    budget = (crf_memory_bytes(height, width, N_CLASSES) + crf_memory_bytes(*net, N_CLASSES)) // 2
    notes = []
    seg = Segmenter(model, meta, device="cpu", crf=CRFParams(iterations=2), max_size=32,
                    msc=False, memory_budget=budget, notify=notes.append)
    for _ in range(2):
        result = seg.segment(image(height, width), keep_probs=True)
    assert net <= result.crf_size < (height, width)
    assert result.probs.shape == (N_CLASSES, height, width)
    torch.testing.assert_close(result.probs.sum(0), torch.ones(height, width), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(result.labels, result.probs.argmax(0).numpy())
    assert len(notes) == 1 and "the CRF runs at" in notes[0]


# --- segment_many: stopping at the first failure, closing early -----------------------------


@pytest.fixture(scope="module")
def plain(model, meta):
    """No CRF, one scale: the cheapest segmenter, for streams of several images."""
    return Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=False)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("stage", ["read", "network", "write"])
def test_stop_on_error_writes_and_yields_nothing_after_the_first_failure(plain, stage, batch_size):
    """--fail-fast used to let the image after the failing one be written (the stream
    works ahead): the written set must be exactly the items yielded as successes."""
    def read(source):
        if stage == "read" and source == "c":
            raise DeeplabError("c: truncated or corrupt JPEG")
        if stage == "network" and source == "c":  # same shape, so in a's batch: the batch fails
            return image(13, 17).astype(np.float32)
        return image(13, 17, seed=ord(source))

    written = []

    def on_result(item):
        if stage == "write" and item.source == "c":
            raise OSError(28, "No space left on device")
        written.append(item.source)
        return item.source

    items = list(plain.segment_many(list("abcdef"), read=read, batch_size=batch_size,
                                    on_result=on_result, stop_on_error=True))
    assert [item.source for item in items] == ["a", "b", "c"]
    assert [item.error is None for item in items] == [True, True, False]
    assert [item.output for item in items[:2]] == ["a", "b"]
    assert written == ["a", "b"]
    if batch_size == 1:  # without stop_on_error the same stream goes on past the failure
        written.clear()
        items = list(plain.segment_many(list("abcdef"), read=read, on_result=on_result))
        assert [item.error is None for item in items] == [True, True, False, True, True, True]
        assert written == list("abdef")


def test_stop_on_error_without_a_writer_ends_at_the_failure(plain):
    def read(source):
        if source == 1:
            raise DeeplabError("1: empty file (0 bytes)")
        return image(9, 11, seed=source)

    items = list(plain.segment_many(range(5), read=read, stop_on_error=True))
    assert [item.source for item in items] == [0, 1]
    assert items[0].result.labels.shape == (9, 11) and isinstance(items[1].error, DeeplabError)


def test_closing_the_stream_early_drops_the_writes_not_started(plain):
    """Leaving the loop (a broken pipe, a failed stdout) used to let every queued write
    finish, so files appeared for items never reported; now only the one under way does."""
    gate = threading.Event()
    written = []

    def on_result(item):
        if item.source == 0:
            time.sleep(0.5)  # meanwhile the network hands on the next images
        else:
            gate.wait(10)
        written.append(item.source)

    stream = plain.segment_many(range(12), read=lambda s: image(9, 11, seed=s), on_result=on_result,
                                pending_writes=4)
    first = next(stream)
    assert first.source == 0 and first.error is None
    threading.Timer(0.3, gate.set).start()  # lets the write under way finish during close()
    stream.close()
    assert written[0] == 0 and written[1:] in ([], [1])


# --- the weights' mean pixel, refine's checks, from_weights' keywords, size messages ---------


@pytest.fixture(scope="module")
def quick(seg):
    """Segmenters sharing `seg`'s network, already in inference form: `_owns_model` folds
    nothing more and copies nothing, so each costs nothing to build."""
    def make(meta, **kw):
        return Segmenter(seg.model, meta, device="cpu", _owns_model=True, **kw)
    return make


def manual_probs(model, rgb: np.ndarray, mean_bgr) -> torch.Tensor:
    """Probabilities (C, H, W) written out by hand: BGR floats minus `mean_bgr`, the
    multi-scale network, bilinear upsampling, softmax."""
    x = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    x = x - torch.tensor(mean_bgr, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x, msc=True)  # (1, C, h, w)
        logits = torch.nn.functional.interpolate(logits, size=rgb.shape[:2], mode="bilinear",
                                                 align_corners=False)
    return torch.softmax(logits, dim=1)[0]


def test_the_segmenter_centres_the_input_with_the_weights_mean_pixel(model, quick):
    """WeightsMeta.mean_bgr used to be ignored: the network always subtracted the
    published mean, so weights trained with another mean gave the default's probabilities."""
    classes = [f"c{i}" for i in range(N_CLASSES)]
    rgb = image(11, 14, seed=4)
    probs = {}
    for mean in [(104.008, 116.669, 122.675), (0.0, 0.0, 0.0), (60.0, 200.0, 10.0)]:
        meta = SimpleNamespace(classes=classes, crf=None, mean_bgr=mean)
        seg = quick(meta, crf=None, max_size=0)
        assert seg.mean_bgr == mean
        probs[mean] = seg.probs(rgb)
        torch.testing.assert_close(probs[mean], manual_probs(model, rgb, mean), atol=2e-5, rtol=1e-4)
        # The labels (segment, with its own upsampled argmax) follow the same input.
        np.testing.assert_array_equal(seg.segment(rgb).labels, probs[mean].argmax(0).numpy())
    means = list(probs)
    for other in means[1:]:
        assert (probs[means[0]] - probs[other]).abs().max() > 1e-3
    # A meta without a mean pixel (as the fixtures' namespaces) gets the published one.
    no_mean = quick(SimpleNamespace(classes=classes, crf=None), crf=None, max_size=0)
    torch.testing.assert_close(no_mean.probs(rgb), probs[means[0]])


def test_the_weights_mean_pixel_is_used_when_the_network_sees_a_smaller_copy(quick):
    classes = [f"c{i}" for i in range(N_CLASSES)]
    rgb = image(23, 31, seed=6)
    out = [quick(SimpleNamespace(classes=classes, mean_bgr=mean), crf=None, max_size=12, msc=False).probs(rgb)
           for mean in [(104.008, 116.669, 122.675), (0, 0, 0)]]
    assert out[0].shape == out[1].shape == (N_CLASSES, 23, 31)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_a_meta_mean_that_is_not_three_numbers_is_refused(quick):
    meta = SimpleNamespace(classes=[f"c{i}" for i in range(N_CLASSES)], mean_bgr=(1.0, 2.0))
    with pytest.raises(ValueError, match="mean_bgr: expected three finite numbers"):
        quick(meta, crf=None)


@pytest.mark.parametrize("bad, shown", [
    (RGB[..., 0], "uint8 (13, 17)"),
    (RGB / 255.0, "float64 (13, 17, 3)"),
    (np.dstack([RGB, RGB[..., :1]]), "uint8 (13, 17, 4)"),
    (torch.from_numpy(RGB[..., 0].copy()), "torch.uint8 (13, 17)"),
    (torch.from_numpy(RGB).float(), "torch.float32 (13, 17, 3)"),
])
def test_refine_refuses_a_bad_image_as_probs_and_segment_do(seg, plain, bad, shown):
    """refine used to hand a grayscale image to the CRF on the CPU, which raised a
    DeeplabError, where probs and segment raise the documented ValueError."""
    probs = torch.full((N_CLASSES, 13, 17), 1 / N_CLASSES)
    for segmenter in (seg, plain):  # with a CRF and without (refine is the identity there)
        with pytest.raises(ValueError, match=r"^image: expected RGB uint8 \(H, W, 3\), got ") as info:
            segmenter.refine(bad, probs)
        assert shown in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="empty image"):
        seg.refine(RGB[:0], probs)


def test_refine_takes_a_torch_image(seg):
    probs = seg.probs(RGB)
    np.testing.assert_allclose(seg.refine(torch.from_numpy(RGB), probs).numpy(),
                               seg.refine(RGB, probs).numpy(), atol=1e-6)


def test_from_weights_checks_its_keywords_before_reading_the_weights(tmp_path, monkeypatch):
    """Segmenter.from_weights(..., foo=1) used to load the whole checkpoint, then fail in
    Segmenter's constructor; a missing file proves nothing is read first."""
    import deeplab_cli.weights as weights

    def never(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(weights, "load_model", never)
    missing = tmp_path / "missing.pth"
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        Segmenter.from_weights(missing, device="cpu", foo=1)
    with pytest.raises(TypeError, match="unexpected keyword argument '_owns_model'"):
        Segmenter.from_weights(missing, device="cpu", _owns_model=False)
    for kw, message in [({"precision": "fp64"}, "--precision fp64"), ({"max_size": -1}, "--max-size -1"),
                        ({"memory_format": "nhwc"}, "memory format 'nhwc'"),
                        ({"memory_budget": 0}, "memory budget 0"), ({"crf": {"iters": 1}}, "crf: unknown")]:
        with pytest.raises(DeeplabError, match=message):
            Segmenter.from_weights(missing, device="cpu", **kw)


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (999, "999 bytes"), (1000, "1.0 kB"),
                                     (714_220, "714.2 kB"), (3_500_000, "3.5 MB"),
                                     (2_000_000_000, "2.0 GB")])
def test_format_bytes_keeps_a_non_zero_figure(n, text):
    assert format_bytes(n) == text


def test_memory_messages_for_small_budgets_do_not_read_zero_gb(quick, meta):
    """'0.0 GB needed, 0.0 GB available' / 'limit 0.0 GB' told a user nothing."""
    height, width = 37, 53
    net = network_size(height, width, 32)
    floor = crf_memory_bytes(*net, N_CLASSES)
    seg = quick(meta, crf=CRFParams(iterations=1), max_size=32, msc=False)
    with pytest.raises(DeeplabError) as info:
        seg.crf_size(height, width, budget=floor // 2)
    assert f"({format_bytes(floor)} needed, {format_bytes(floor // 2)} available)" in str(info.value)
    assert "kB needed" in str(info.value) and "0.0 GB" not in str(info.value)

    notes = []
    budget = (crf_memory_bytes(height, width, N_CLASSES) + floor) // 2
    quick(meta, crf=CRFParams(iterations=1), max_size=32, msc=False, memory_budget=budget,
          notify=notes.append).segment(image(height, width))
    assert len(notes) == 1 and f"(limit {format_bytes(budget)})" in notes[0] and "kB" in notes[0]

    plain = quick(meta, crf=None, max_size=32, msc=False, memory_budget=1000)
    with pytest.raises(DeeplabError, match=r"probabilities need 8\.8 kB, more than the 1\.0 kB available"):
        plain.segment(RGB, keep_probs=True)
