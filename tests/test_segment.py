"""`deeplab segment` and the Segmenter: CPU, tiny images, random DeepLab v2 weights.

The weights are `build_model(21)` with its random initialisation, saved once per session;
the images are small odd-sized crops of the shipped photos, and `--max-size 32` keeps the
ResNet-101 forward pass cheap on the CPU.
"""

from __future__ import annotations

import errno
import io
import base64
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import load_photo
from helpers import OTHER_HOST, damaged_tiffs, dead_pid, temp_name
from deeplab_cli.cli import cli
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError
from deeplab_cli.image_io import write_bytes
from deeplab_cli.pipeline import BatchItem, Segmenter, crf_memory_bytes, network_size

N_CLASSES = 21
H, W = 37, 53
FAST = ["--max-size", "32", "--no-msc", "-q"]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A bare state_dict of a randomly initialised 21-class DeepLab v2 (as users save them)."""
    from deeplab_cli.model import build_model

    torch.manual_seed(0)
    model = build_model(N_CLASSES)
    with torch.no_grad():  # a livelier classifier than the init's, so masks hold several classes
        for i in range(4):
            getattr(model.base.aspp, f"c{i}").weight.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("weights") / "random21.pth"
    torch.save(model.state_dict(), path)
    return path


_MODELS: dict = {}


@pytest.fixture
def fast_load(monkeypatch, weights_file):
    """Load the weights file once per session for the in-process CLI runs (the subprocess
    tests load it for real). Each call gets its own copy of the model, as from load_model:
    `Segmenter.from_weights` folds the model it loaded in place."""
    import copy

    import deeplab_cli.weights as weights

    real = weights.load_model

    def cached(name_or_path=None, *, device="cpu", dtype=None):
        key = (str(name_or_path), str(device))
        if key not in _MODELS:
            _MODELS[key] = real(name_or_path, device=device, dtype=dtype)
        model, meta = _MODELS[key]
        return copy.deepcopy(model), meta

    monkeypatch.setattr(weights, "load_model", cached)
    return cached


@pytest.fixture
def model_meta(fast_load, weights_file):
    return fast_load(str(weights_file))


def photo(name: str = "chelsea.jpg", size=(W, H)) -> np.ndarray:
    """A shipped photo shrunk to a tiny odd size (real structure, cheap to segment)."""
    return np.array(Image.fromarray(load_photo(name)).resize(size, Image.BILINEAR))


def save(path: Path, rgb: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **kw)
    return path


def invoke(args, *, input=None, expect=0):
    result = CliRunner().invoke(cli, ["segment", *map(str, args)], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == expect, (result.exit_code, result.stderr)
    return result


def read_mask(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# --- Segmenter -----------------------------------------------------------------------------


def test_network_size():
    assert network_size(37, 53, 32) == (22, 32)
    assert network_size(53, 37, 32) == (32, 22)
    assert network_size(37, 53, 0) == (37, 53)  # native
    assert network_size(37, 53, 513) == (37, 53)  # never upscaled
    assert network_size(4000, 6000, 513) == (342, 513)


def test_probs_are_a_distribution_at_the_original_size(model_meta):
    model, meta = model_meta
    seg = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=False)
    probs = seg.probs(photo())
    assert probs.shape == (N_CLASSES, H, W) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(H, W))
    assert (probs >= 0).all()
    result = seg.segment(photo())
    assert result.labels.shape == (H, W) and result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, probs.argmax(0).numpy())
    assert result.network_size == (22, 32) and result.probs is None
    assert {"network", "crf", "labels"} <= set(result.timings)
    assert len(np.unique(result.labels)) > 1  # random weights still give structure


def test_probs_match_the_model_reference(model_meta):
    """Same numbers as model.predict_probs on the resized input, upsampled to full size."""
    import torch.nn.functional as F

    from deeplab_cli.model import predict_probs, preprocess

    model, meta = model_meta
    seg = Segmenter(model, meta, device="cpu", crf=None, max_size=0, msc=True)
    rgb = photo()
    expected = predict_probs(model, preprocess(rgb), msc=True)[0]
    torch.testing.assert_close(seg.probs(rgb), expected, atol=1e-5, rtol=1e-4)
    seg32 = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=False)
    small = F.interpolate(preprocess(rgb), size=(22, 32), mode="bilinear", align_corners=False,
                          antialias=True)
    expected = predict_probs(model, small, size=(H, W), msc=False)[0]
    torch.testing.assert_close(seg32.probs(rgb), expected, atol=1e-5, rtol=1e-4)


def test_from_weights_takes_the_crf_from_the_metadata(fast_load, weights_file):
    seg = Segmenter.from_weights(weights_file, device="cpu", max_size=32)
    _, meta = fast_load(str(weights_file))
    assert seg.crf == meta.crf and seg.device == torch.device("cpu") and seg.max_size == 32
    assert Segmenter.from_weights(weights_file, device="cpu", crf=None).crf is None


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_from_weights_folds_the_model_it_loaded_without_a_copy(fast_load, weights_file, monkeypatch,
                                                               memory_format):
    """The segmenter runs the very model load_model returned (the weights are never held
    twice) and computes the same numbers as a segmenter built on a caller's model (a copy)."""
    import deeplab_cli.weights as weights

    loaded = []

    def recording(*args, **kw):
        loaded.append(fast_load(*args, **kw))
        return loaded[-1]

    monkeypatch.setattr(weights, "load_model", recording)
    seg = Segmenter.from_weights(weights_file, device="cpu", crf=None, max_size=32, msc=False,
                                 memory_format=memory_format)
    (model, meta), = loaded
    assert seg.model is model, "from_weights ran a copy of the model it loaded"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    callers = fast_load(str(weights_file))[0]
    copied = Segmenter(callers, meta, device="cpu", crf=None, max_size=32, msc=False,
                       memory_format=memory_format)
    assert copied.model is not callers
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in callers.modules())
    ours, theirs = seg.model.state_dict(), copied.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    rgb = photo()
    assert torch.equal(seg.probs(rgb), copied.probs(rgb))


def test_crf_params_scale_with_the_downscaling(model_meta):
    model, meta = model_meta
    base = CRFParams()
    seg = Segmenter(model, meta, device="cpu", crf=base, max_size=32)
    p = seg.crf_params_for(photo())  # 53 -> 32 on the longer side
    assert p.bi_xy_std == pytest.approx(67 * 53 / 32)
    assert p.pos_xy_std == pytest.approx(53 / 32)
    assert (p.bi_rgb_std, p.bi_w, p.pos_w, p.iterations) == (3, 4, 3, 10)
    assert Segmenter(model, meta, device="cpu", crf=base, max_size=0).crf_params_for(photo()) == base
    assert Segmenter(model, meta, device="cpu", crf=base, max_size=513).crf_params_for(photo()) == base
    assert Segmenter(model, meta, device="cpu", crf=None).crf_params_for(photo()) is None


def test_upsampled_argmax_in_chunks_matches_full_interpolation(model_meta):
    import torch.nn.functional as F

    model, meta = model_meta
    seg = Segmenter(model, meta, device="cpu", crf=None, memory_budget=4 * 4 * H * W * 3)
    scores = torch.randn(N_CLASSES, 5, 7)
    full = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
    torch.testing.assert_close(seg._upsampled_argmax(scores, (H, W)), full)


def test_batch_equals_single_images(model_meta):
    model, meta = model_meta
    seg = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=False)
    images = [photo(n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    batch = seg.segment_batch(images, keep_probs=True)
    for rgb, res in zip(images, batch):
        single = seg.segment(rgb, keep_probs=True)
        torch.testing.assert_close(res.probs, single.probs, atol=1e-4, rtol=1e-4)


def test_crf_runs_at_full_resolution_with_scaled_params(model_meta, monkeypatch):
    import deeplab_cli.crf as crf_module

    model, meta = model_meta
    calls = []
    real = crf_module.dense_crf

    def spy(image, probs, params):
        calls.append((np.asarray(image).shape, tuple(probs.shape), params))
        return real(image, probs, params)

    monkeypatch.setattr(crf_module, "dense_crf", spy)
    seg = Segmenter(model, meta, device="cpu", crf=CRFParams(iterations=3), max_size=32, msc=False)
    result = seg.segment(photo(), keep_probs=True)
    assert calls == [((H, W, 3), (N_CLASSES, H, W), seg.crf_params_for(photo()))]
    assert result.crf_size == (H, W) and result.labels.shape == (H, W)
    torch.testing.assert_close(result.probs.sum(0), torch.ones(H, W), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(result.labels, result.probs.argmax(0).numpy())
    assert result.timings["crf"] > 0
    # refine() is the same CRF on probs the caller already has.
    probs = seg.probs(photo())
    torch.testing.assert_close(seg.refine(photo(), probs), result.probs, atol=1e-5, rtol=1e-4)


def test_crf_falls_back_to_a_smaller_resolution_when_memory_is_short(model_meta, monkeypatch):
    import deeplab_cli.crf as crf_module

    model, meta = model_meta
    sizes = []
    real = crf_module.dense_crf
    monkeypatch.setattr(crf_module, "dense_crf",
                        lambda image, probs, params: sizes.append((probs.shape[1:], params)) or
                        real(image, probs, params))
    notes = []
    full, net = crf_memory_bytes(H, W, N_CLASSES), crf_memory_bytes(22, 32, N_CLASSES)
    seg = Segmenter(model, meta, device="cpu", crf=CRFParams(iterations=2), max_size=32, msc=False,
                    memory_budget=(full + net) // 2, notify=notes.append)
    for _ in range(2):
        result = seg.segment(photo())
    assert result.labels.shape == (H, W)  # always the original size
    (h, w), params = sizes[0]
    assert (22, 32) <= (h, w) < (H, W) and crf_memory_bytes(h, w, N_CLASSES) <= (full + net) // 2
    assert result.crf_size == (h, w)
    assert params.bi_xy_std == pytest.approx(67 * max(h, w) / 32)
    assert len(notes) == 1 and "the CRF runs at" in notes[0]  # said once, not per image
    tiny = Segmenter(model, meta, device="cpu", crf=CRFParams(), max_size=32,
                     memory_budget=net // 2)
    with pytest.raises(DeeplabError, match="not enough memory for the CRF"):
        tiny.segment(photo())


def test_cpu_precisions(model_meta):
    model, meta = model_meta
    notes = []
    bf16 = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=False, precision="bf16")
    probs = bf16.probs(photo())
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(H, W))
    Segmenter(model, meta, device="cpu", crf=None, precision="fp16", notify=notes.append)
    assert notes and "fp32" in notes[0]
    with pytest.raises(DeeplabError, match="precision"):
        Segmenter(model, meta, device="cpu", precision="int8")


def test_segment_many_keeps_order_and_survives_bad_items(model_meta):
    model, meta = model_meta
    seg = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=False)
    images = {"a": photo("chelsea.jpg"), "b": photo("coffee.jpg"), "c": photo("rocket.jpg", (29, 41)),
              "d": photo("astronaut.jpg")}

    def read(key):
        if key == "bad":
            raise DeeplabError("bad: not an image")
        return images[key]

    written = []

    def on_result(item: BatchItem):
        if item.source == "d":
            raise OSError("disk full")
        written.append(item.source)
        return item.result.labels.sum()

    items = list(seg.segment_many(["a", "bad", "b", "c", "d"], read=read, batch_size=2,
                                  on_result=on_result))
    assert [i.source for i in items] == ["a", "bad", "b", "c", "d"]
    assert isinstance(items[1].error, DeeplabError) and items[1].result is None
    assert isinstance(items[4].error, OSError)
    assert written == ["a", "b", "c"]
    for item in (items[0], items[2], items[3]):
        assert item.error is None
        assert item.output == item.result.labels.sum()
        np.testing.assert_array_equal(item.result.labels, seg.segment(images[item.source]).labels)
        assert "decode" in item.result.timings
    assert items[3].result.labels.shape == (41, 29)


# --- the command: inputs and outputs -------------------------------------------------------


def test_single_file(tmp_path, fast_load, weights_file):
    src = save(tmp_path / "cat.jpg", photo())
    out = tmp_path / "mask.png"
    invoke([src, "-o", out, "--weights", weights_file, "--no-crf", *FAST])
    with Image.open(out) as im:
        assert im.mode == "P" and im.size == (W, H)
        mask = np.asarray(im)
    assert mask.max() < N_CLASSES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.jpg", "mask.png"]


def test_folder_is_mirrored(tmp_path, fast_load, weights_file):
    src = tmp_path / "photos"
    save(src / "b.jpg", photo())
    save(src / "sub" / "deeper" / "a.png", photo("coffee.jpg", (29, 41)))
    save(src / "sub" / "c.webp", photo("rocket.jpg"), lossless=True)
    (src / "notes.txt").write_text("not an image")
    save(src / ".hidden.jpg", photo())
    out = tmp_path / "masks"
    invoke([src, "-o", out, "--weights", weights_file, "--no-crf", *FAST])
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert found == ["b.png", "sub/c.png", "sub/deeper/a.png"]
    assert read_mask(out / "sub" / "deeper" / "a.png").shape == (41, 29)


def test_stdin_to_stdout(fast_load, weights_file):
    data = io.BytesIO()
    Image.fromarray(photo()).save(data, "JPEG")
    for args in (["-", "-o", "-"], ["-"]):  # no -o: stdout when it is not a terminal
        result = invoke([*args, "--weights", weights_file, "--no-crf", *FAST], input=data.getvalue())
        with Image.open(io.BytesIO(result.stdout_bytes)) as im:
            assert im.format == "PNG" and im.size == (W, H) and im.mode == "P"


def test_from_list_nul_separated(tmp_path, fast_load, weights_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = save(tmp_path / "in" / "x" / "one.jpg", photo())
    b = save(tmp_path / "in" / "y" / "two with space.png", photo("coffee.jpg"))
    listing = f"in/x/one.jpg\0{b}\0".encode()
    result = invoke(["--from-list", "-", "-0", "-o", "out", "--json", "--weights", weights_file,
                     "--no-crf", *FAST], input=listing)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in lines] == ["in/x/one.jpg", str(b)]
    # Paths are mirrored relative to the deepest folder holding them all (in/).
    assert (tmp_path / "out" / "x" / "one.png").is_file()
    assert (tmp_path / "out" / "y" / "two with space.png").is_file()
    assert a.is_file()


@pytest.mark.parametrize("output", ["out", "-"])
def test_a_nul_separated_list_without_dash_0_is_one_line(tmp_path, fast_load, weights_file, monkeypatch, output):
    # `find -print0 | deeplab segment --from-list list` without -0: said before any work is done.
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "in" / "one.jpg", photo())
    (tmp_path / "list").write_bytes(b"in/one.jpg\0")
    result = invoke(["--from-list", "list", "-o", output, "--weights", weights_file, "--no-crf", *FAST], expect=1)
    assert result.output == "Error: --from-list list: the list is NUL-separated (find -print0); add -0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "list"]


@pytest.mark.parametrize("fmt", ["palette", "gray", "overlay", "probs"])
def test_every_format(tmp_path, fast_load, weights_file, fmt):
    src = save(tmp_path / "in" / "cat.png", photo())
    out = tmp_path / "out"
    invoke([src.parent, "-o", out, "--format", fmt, "--alpha", "0.25", "--weights", weights_file,
            "--no-crf", *FAST])
    if fmt == "probs":
        probs = np.load(out / "cat.npy")
        assert probs.dtype == np.float32 and probs.shape == (N_CLASSES, H, W)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        return
    with Image.open(out / "cat.png") as im:
        assert im.size == (W, H)
        assert im.mode == {"palette": "P", "gray": "L", "overlay": "RGB"}[fmt]
        pixels = np.asarray(im)
    if fmt == "overlay":
        # 75% of the photo shows through: the overlay stays close to it.
        assert np.abs(pixels.astype(int) - photo()).mean() < 0.25 * 255
    else:
        assert pixels.max() < N_CLASSES


def test_json_lines(tmp_path, fast_load, weights_file):
    for name in ("a.jpg", "b.jpg"):
        save(tmp_path / "in" / name, photo())
    result = invoke([tmp_path / "in", "-o", tmp_path / "out", "--json", "--weights", weights_file,
                     "--no-crf", *FAST])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    for rec in records:
        assert rec["status"] == "ok" and (rec["width"], rec["height"]) == (W, H)
        assert math.isclose(sum(c["fraction"] for c in rec["classes"]), 1.0, abs_tol=1e-9)
        assert sum(c["pixels"] for c in rec["classes"]) == W * H
        mask = read_mask(rec["output"])
        for c in rec["classes"]:
            assert c["name"] == meta_classes()[c["id"]]
            assert c["pixels"] == int((mask == c["id"]).sum())
        assert {"decode", "network", "crf", "encode"} <= set(rec["timings"])


def meta_classes():
    from deeplab_cli.labels import VOC_CLASSES

    return VOC_CLASSES


def test_colliding_names_keep_their_extension(tmp_path, fast_load, weights_file):
    src = tmp_path / "in"
    save(src / "a.jpg", photo())
    save(src / "a.png", photo("coffee.jpg"))
    save(src / "b.jpg", photo("rocket.jpg"))
    out = tmp_path / "out"
    invoke([src, "-o", out, "--weights", weights_file, "--no-crf", *FAST])
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]
    # a.jpg.png is a.jpg's mask, not a.png's (they differ: different photos).
    seg_a = read_mask(out / "a.jpg.png")
    again = tmp_path / "again.png"
    invoke([src / "a.jpg", "-o", again, "--weights", weights_file, "--no-crf", *FAST])
    np.testing.assert_array_equal(seg_a, read_mask(again))


def test_skip_existing_leaves_outputs_alone(tmp_path, fast_load, weights_file):
    src = tmp_path / "in"
    save(src / "a.jpg", photo())
    out = tmp_path / "out"
    args = [src, "-o", out, "--weights", weights_file, "--no-crf", *FAST]
    invoke(args)
    mask = out / "a.png"
    old = mask.stat().st_mtime_ns
    os.utime(mask, ns=(old - 10**9, old - 10**9))  # older, so a rewrite would show
    save(src / "b.jpg", photo("coffee.jpg"))
    result = invoke([*args, "--skip-existing", "--json"])
    records = {json.loads(l)["input"]: json.loads(l) for l in result.stdout.splitlines()}
    assert records[str(src / "a.jpg")]["status"] == "skipped"
    assert records[str(src / "b.jpg")]["status"] == "ok"
    assert mask.stat().st_mtime_ns == old - 10**9
    assert (out / "b.png").is_file()


def test_bad_files_do_not_stop_the_batch(tmp_path, fast_load, weights_file):
    src = tmp_path / "in"
    save(src / "a.jpg", photo())
    good = io.BytesIO()  # big enough that half of it is past the JPEG header
    Image.fromarray(load_photo("coffee.jpg")).save(good, "JPEG")
    (src / "b_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (src / "c_empty.png").write_bytes(b"")
    save(src / "d.png", photo("coffee.jpg"))
    out = tmp_path / "out"
    result = invoke([src, "-o", out, "--weights", weights_file, "--no-crf", "--max-size", "32",
                     "--no-msc"], expect=1)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "d.png"]
    lines = result.stderr.strip().splitlines()
    assert any("b_truncated.jpg: truncated or corrupt JPEG" in l for l in lines)
    assert any("c_empty.png: empty file" in l for l in lines)
    assert "4 images: 2 segmented, 2 failed" in lines[-1]
    # --fail-fast stops at the first failure.
    result = invoke([src, "-o", tmp_path / "ff", "--weights", weights_file, "--no-crf", *FAST,
                     "--fail-fast"], expect=1)
    assert "not run (--fail-fast)" in result.stderr
    # One bad file alone: "1 image", and no rate when nothing was segmented.
    result = invoke([src / "c_empty.png", "-o", tmp_path / "one.png", "--weights", weights_file, "--no-crf",
                     *FAST], expect=1)
    summary = result.stderr.strip().splitlines()[-1]
    assert "1 image: 0 segmented, 1 failed in" in summary and "images/s" not in summary


def test_a_bad_crf_flag_fails_before_the_weights_load(tmp_path, monkeypatch):
    # The registry weights are not cached here (and there is no network): the flag's error
    # must come first, naming the flag, without a download being tried.
    from deeplab_cli import weights

    def no_download(*args, **kwargs):
        raise AssertionError("the weights were fetched before the CRF flags were checked")

    monkeypatch.setattr(weights, "fetch", no_download)
    src = save(tmp_path / "cat.jpg", photo())
    for flags, named in ((["--bi-xy-std", "-1"], "--bi-xy-std"),
                         (["--crf-params", tmp_path / "missing.json"], "missing.json")):
        result = invoke([src, "-o", tmp_path / "m.png", "--model", "voc12", *flags], expect=1)
        assert named in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "m.png").exists()


def test_no_crf_and_crf_both_run(tmp_path, fast_load, weights_file):
    src = save(tmp_path / "cat.jpg", photo())
    plain, refined = tmp_path / "plain.png", tmp_path / "crf.png"
    invoke([src, "-o", plain, "--weights", weights_file, "--no-crf", *FAST])
    result = invoke([src, "-o", refined, "--weights", weights_file, "--iters", "5", "--bi-w", "10",
                     "--json", *FAST])
    rec = json.loads(result.stdout)
    assert rec["timings"]["crf"] > 0
    a, b = read_mask(plain), read_mask(refined)
    assert a.shape == b.shape == (H, W)
    assert (a != b).any()  # a strong appearance kernel changes some labels


def test_exif_rotated_input_gives_an_upright_mask(tmp_path, fast_load, weights_file):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    src = tmp_path / "rotated.jpg"
    Image.fromarray(photo()).save(src, exif=exif.tobytes())
    out = tmp_path / "m.png"
    invoke([src, "-o", out, "--weights", weights_file, "--no-crf", *FAST])
    assert read_mask(out).shape == (W, H)


def test_outputs_never_escape_or_overwrite(tmp_path, fast_load, weights_file):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    src = tmp_path / "in"
    save(src / "sub" / "a.jpg", photo())
    save(src / "b.jpg", photo("coffee.jpg"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    result = invoke([src, "-o", out, "--weights", weights_file, "--no-crf", *FAST], expect=1)
    assert "outside" in result.stderr and "refused" in result.stderr
    assert list(outside.iterdir()) == []
    assert (out / "b.png").is_file()
    # Segmenting PNGs into their own folder would overwrite them: refused.
    pngs = tmp_path / "pngs"
    save(pngs / "p.png", photo())
    before = (pngs / "p.png").read_bytes()
    result = invoke([pngs, "-o", pngs, "--weights", weights_file, "--no-crf", *FAST], expect=1)
    assert "would overwrite an input" in result.stderr
    assert (pngs / "p.png").read_bytes() == before


def test_usage_errors(tmp_path, fast_load, weights_file, monkeypatch):
    a = save(tmp_path / "a.jpg", photo())
    b = save(tmp_path / "b.jpg", photo())
    result = invoke([a, b, "-o", tmp_path / "x.png", "--weights", weights_file], expect=1)
    assert "looks like a file name" in result.stderr
    result = invoke([a, b, "-o", "-", "--weights", weights_file], expect=1)
    assert "stdout holds one image" in result.stderr
    result = invoke([a, "-o", tmp_path / "m.jpg", "--weights", weights_file], expect=1)
    assert "writes .png files" in result.stderr
    result = invoke([a, "--model", "voc12", "--weights", weights_file], expect=1)
    assert "not both" in result.stderr
    result = invoke([a, "-o", "-", "--json", "--weights", weights_file], expect=1)
    assert "--json" in result.stderr
    monkeypatch.setattr("deeplab_cli.cli.options.stdout_is_tty", lambda: True)
    result = invoke([a, "--weights", weights_file], expect=1)
    assert "stdout is a terminal" in result.stderr
    result = invoke([tmp_path / "empty_dir_missing", "-o", tmp_path / "o", "--weights", weights_file,
                     *FAST], expect=1)
    assert "no such file" in result.stderr


# --- through a real process ----------------------------------------------------------------


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "deeplab_cli", "segment", *map(str, args)],
                          capture_output=True, timeout=300, **kw)


def test_subprocess_pipe_round_trip(tmp_path, weights_file):
    data = io.BytesIO()
    Image.fromarray(photo()).save(data, "PNG")
    proc = run_cli(["-", "--weights", weights_file, "--no-crf", *FAST], input=data.getvalue())
    assert proc.returncode == 0, proc.stderr.decode()
    with Image.open(io.BytesIO(proc.stdout)) as im:
        assert im.size == (W, H) and im.mode == "P"


def test_damaged_files_cost_one_line_each_and_no_decoder_chatter(tmp_path, weights_file):
    # libtiff (from C) and PIL (its logger, its warnings) would each add lines of their own.
    src = tmp_path / "in"
    save(src / "good.png", photo())
    for name, data in damaged_tiffs().items():
        (src / name).write_bytes(data)
    proc = run_cli([src, "-o", tmp_path / "out", "--weights", weights_file, "--no-crf", "--device", "cpu", *FAST])
    assert proc.returncode == 1
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 3, lines  # each bad file, then the summary (shown even with -q when something failed)
    assert "lzw.tif: truncated or corrupt TIFF" in lines[0] and "samples.tif: truncated or corrupt TIFF" in lines[1]
    assert "1 segmented, 2 failed" in lines[2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


@pytest.mark.slow
def test_killed_run_leaves_only_complete_outputs_and_resumes(tmp_path, weights_file):
    src = tmp_path / "in"
    names = [f"img{i:02d}.jpg" for i in range(12)]
    for i, name in enumerate(names):
        save(src / name, photo(("chelsea.jpg", "coffee.jpg", "rocket.jpg")[i % 3]))
    out = tmp_path / "out"
    args = [src, "-o", out, "--weights", weights_file, "--no-crf", "--max-size", "48", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "deeplab_cli", "segment", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(p.suffix == ".png" and not p.name.startswith(".")
                                        for p in out.iterdir())):
            assert proc.poll() is None, "finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    finished = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert 0 < len(finished) < len(names)
    for path in finished:  # every visible output is a whole PNG
        assert path.suffix == ".png"
        assert read_mask(path).shape == (H, W)
    mtimes = {p.name: p.stat().st_mtime_ns for p in finished}
    resumed = run_cli([*args, "--skip-existing", "--json"])
    assert resumed.returncode == 0, resumed.stderr.decode()
    statuses = [json.loads(l)["status"] for l in resumed.stdout.decode().splitlines()]
    assert statuses.count("skipped") == len(finished)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        [n.replace(".jpg", ".png") for n in names]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in mtimes.items())


def test_both_memory_formats_agree_and_leave_the_model_alone(model_meta):
    model, meta = model_meta
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nhwc = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=True, memory_format="channels_last")
    nchw = Segmenter(model, meta, device="cpu", crf=None, max_size=32, msc=True)
    assert (nhwc.memory_format, nchw.memory_format) == ("channels_last", "contiguous")
    assert nhwc.model is not model and nhwc.n_classes == N_CLASSES
    rgb = photo()
    probs = nhwc.probs(rgb)
    assert probs.is_contiguous()
    torch.testing.assert_close(probs, nchw.probs(rgb), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(DeeplabError, match="memory format 'nhwc'"):
        Segmenter(model, meta, device="cpu", memory_format="nhwc")


def test_segment_sweeps_a_killed_runs_leftovers(tmp_path, fast_load, weights_file):
    src, out = tmp_path / "photos", tmp_path / "masks"
    save(src / "a.jpg", photo())
    save(src / "b.jpg", photo("coffee.jpg", (29, 41)))
    out.mkdir()
    dead = dead_pid()
    stale = out / temp_name("a.png", dead)
    stale.write_bytes(b"half a png")
    elsewhere = out / temp_name("b.png", dead, OTHER_HOST)
    elsewhere.write_bytes(b"another machine's write in progress")

    invoke([src, "-o", out, "--weights", weights_file, "--no-crf", *FAST])

    assert {p.name for p in out.iterdir()} == {"a.png", "b.png", elsewhere.name}
    assert read_mask(out / "b.png").shape == (41, 29)


# --- as a demanding shell user drives it: odd names, closed or failing standard streams,
# unbuffered stdout, unset variables, unreadable folders ------------------------------------


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_shell(args, *, shell_redirect: str = "", env: dict | None = None, **kw):
    """`python -m deeplab_cli segment ARGS` in a real process; `shell_redirect` (e.g. '>&-')
    is applied by sh just before it execs Python, to close or point its descriptors."""
    argv = [sys.executable, "-m", "deeplab_cli", "segment", *map(str, args)]
    script = f'exec "$@" {shell_redirect}'
    return subprocess.run(["sh", "-c", script, "sh", *argv], timeout=300, env=env, **kw)


def _env(**changes) -> dict:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# --- stdout: partial writes, failures ----------------------------------------------------


class _Trickle(io.RawIOBase):
    """A raw stream that takes at most `step` bytes per write and, every third call, none
    (as a full non-blocking pipe does); its descriptor is a real, writable pipe."""

    def __init__(self, step: int, fd: int) -> None:
        self.step, self.fd, self.calls, self.got = step, fd, 0, bytearray()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int | None:
        self.calls += 1
        if self.calls % 3 == 0:
            return None
        taken = bytes(data[: self.step])
        self.got += taken
        return len(taken)


def test_write_bytes_delivers_everything_to_a_stream_that_takes_little_at_a_time():
    data = bytes(range(256)) * 40
    read_end, write_end = os.pipe()
    try:
        stream = _Trickle(1000, write_end)
        write_bytes(stream, data)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert bytes(stream.got) == data

    class Leaving(_Trickle):  # the reader goes away after the first part
        def write(self, data):
            if self.got:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            return super().write(data)

    with pytest.raises(BrokenPipeError):
        write_bytes(Leaving(100, 1), data)

    class Plain:  # a plain writer object that reports no count
        def __init__(self):
            self.got = b""

        def write(self, data):
            self.got += bytes(data)

        def flush(self):
            pass

    plain = Plain()
    write_bytes(plain, data)
    assert plain.got == data


def test_unbuffered_stdout_whose_reader_leaves_is_not_a_success(tmp_path, weights_file):
    """Under PYTHONUNBUFFERED=1 stdout is a raw FileIO; a pipe closed mid-write used to
    take part of the mask silently, and the run reported success."""
    src = save(tmp_path / "cat.png", photo(size=(160, 120)))  # 1.6 MB of probabilities
    argv = [sys.executable, "-m", "deeplab_cli", "segment", src, "--format", "probs",
            "--weights", weights_file, "--no-crf", *FAST]
    proc = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout.read(6) == b"\x93NUMPY"
        proc.stdout.close()  # as `| head -c 6` does
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 1, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in err and b"segmented" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_stdout_gives_one_line_and_status_1(tmp_path, weights_file):
    src = save(tmp_path / "cat.jpg", photo())
    with open("/dev/full", "wb") as full:
        # The mask itself to a full stdout (buffered, the default).
        proc = run_shell([src, "--weights", weights_file, "--no-crf", *FAST], stdout=full,
                       stderr=subprocess.PIPE, env=_env(PYTHONUNBUFFERED=None))
        err = proc.stderr.decode()
        assert proc.returncode == 1, err
        assert "cat.jpg: cannot write the result to stdout (No space left on device)" in err
        assert "Traceback" not in err and "Exception ignored" not in err
        # The JSON lines to a full stdout: the masks are written, the run stops with one line.
        proc = run_shell([src, "-o", tmp_path / "out", "--json", "--weights", weights_file, "--no-crf",
                        *FAST], stdout=full, stderr=subprocess.PIPE, env=_env(PYTHONUNBUFFERED=None))
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "deeplab: stdout: cannot write (No space left on device)" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert (tmp_path / "out" / "cat.png").is_file()


# --- closed standard streams ---------------------------------------------------------------


def test_closed_stdout_or_stdin_is_a_one_line_error(tmp_path, weights_file):
    src = save(tmp_path / "cat.jpg", photo())
    for args, redirect, message in [
        ([src], ">&-", "no -o given and stdout is closed"),
        ([src, "-o", "-"], ">&-", "-o -: stdout is closed"),
        ([src, "-o", tmp_path / "out", "--json"], ">&-", "--json: stdout is closed"),
        (["-", "-o", tmp_path / "m.png"], "<&-", "- (stdin): stdin is closed"),
        (["--from-list", "-", "-o", tmp_path / "out"], "<&-", "--from-list -: stdin is closed"),
    ]:
        proc = run_shell([*args, "--weights", weights_file, "--no-crf", *FAST], shell_redirect=redirect,
                       capture_output=False, stderr=subprocess.PIPE)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and message in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.jpg"]


def test_closed_stderr_neither_fails_the_run_nor_leaks_into_stdout(tmp_path, weights_file):
    src = tmp_path / "in"
    save(src / "a.jpg", photo())
    save(src / "b.jpg", photo("coffee.jpg"))
    # Several images: the progress-bar check used to fail on the missing stderr.
    proc = run_shell([src, "-o", tmp_path / "out", "--weights", weights_file, "--no-crf", "--max-size", "32",
                    "--no-msc", "--device", "cpu"], shell_redirect="2>&-", stdout=subprocess.PIPE)
    assert proc.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    # A note meant for stderr ('running on the CPU', said by --device auto without a GPU)
    # used to go to stdout, in front of the mask.
    proc = run_shell([src / "a.jpg", "--weights", weights_file, "--no-crf", "--max-size", "32", "--no-msc",
                    "--device", "auto"], shell_redirect="2>&-", stdout=subprocess.PIPE)
    assert proc.returncode == 0
    assert proc.stdout.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(proc.stdout)) as im:
        assert im.size == (W, H)


def test_stdin_that_is_a_terminal_is_refused(tmp_path, fast_load, weights_file, monkeypatch):
    monkeypatch.setattr("deeplab_cli.cli.segment._stdin_is_tty", lambda: True)
    result = invoke(["-", "-o", tmp_path / "m.png", "--weights", weights_file, *FAST], expect=1)
    assert "- (stdin) is a terminal" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- names and paths -----------------------------------------------------------------------


def test_odd_names_fail_on_one_line_and_round_trip_in_json(tmp_path, fast_load, weights_file):
    src = tmp_path / "in"
    save(src / "ok.jpg", photo())
    names = ["new\nline.jpg", "tab\there.jpg", "esc\x1b[2J.jpg"]
    try:
        (src / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"")
        names.append(os.fsdecode(b"bad\xff.jpg"))
    except (OSError, UnicodeError):  # a file system that holds only UTF-8 names
        pass
    for name in names[:3]:
        (src / name).write_bytes(b"")
    result = invoke([src, "-o", tmp_path / "out", "--json", "--weights", weights_file, "--no-crf", *FAST],
                    expect=1)
    lines = result.stderr.splitlines()
    assert all(line.startswith("deeplab: ") for line in lines), lines
    assert f"deeplab: {src}/new\\nline.jpg: empty file (0 bytes)" in lines
    assert f"deeplab: {src}/tab\\there.jpg: empty file (0 bytes)" in lines
    assert f"deeplab: {src}/esc\\x1b[2J.jpg: empty file (0 bytes)" in lines
    if len(names) == 4:
        assert f"deeplab: {src}/bad\\xff.jpg: empty file (0 bytes)" in lines
    # Every line is strict JSON (valid UTF-8, no lone-surrogate escapes that strict parsers
    # refuse); a name that is not UTF-8 shows with U+FFFD and its exact bytes in input_bytes.
    assert "\\ud" not in result.stdout
    records = [json.loads(line.encode("utf-8").decode("utf-8", "strict")) for line in result.stdout.splitlines()]
    failed = {Path(r["input"]).name for r in records if r["status"] == "error"}
    shown = {name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for name in names}
    assert failed == shown
    exact = {os.fsdecode(base64.b64decode(r["input_bytes"])) if "input_bytes" in r else r["input"]
             for r in records if r["status"] == "error"}
    assert {Path(p).name for p in exact} == set(names)  # the exact names come back
    assert sum("input_bytes" in r for r in records) == (len(names) == 4)
    assert all(_strictly_valid(r) for r in records)
    assert [r["status"] for r in records].count("ok") == 1


def _strictly_valid(value) -> bool:
    """No string inside holds a lone surrogate."""
    if isinstance(value, dict):
        return all(_strictly_valid(k) and _strictly_valid(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_strictly_valid(v) for v in value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def test_empty_strings_from_unset_variables_are_refused(tmp_path, fast_load, weights_file, monkeypatch):
    """`deeplab segment "$IMG" -o "$OUT"` with a variable unset: Path('') is the current
    folder, which used to be segmented (or written into) whole."""
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "a.jpg", photo())
    before = sorted(os.listdir(tmp_path))
    result = invoke(["", "-o", "out", "--weights", weights_file, "--no-crf", *FAST], expect=1)
    assert "an input is an empty string" in result.stderr
    result = invoke(["a.jpg", "-o", "", "--weights", weights_file, "--no-crf", *FAST], expect=1)
    assert "-o: an empty path" in result.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_a_dash_in_a_list_is_a_file_named_dash(tmp_path, fast_load, weights_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "-", photo(), format="PNG")
    save(tmp_path / "b.jpg", photo("coffee.jpg"))
    (tmp_path / "list.txt").write_text("-\nb.jpg\n")
    result = invoke(["--from-list", "list.txt", "-o", "out", "--json", "--weights", weights_file,
                     "--no-crf", *FAST], input=b"not an image on stdin")
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == ["-", "b.jpg"]
    assert sorted(os.listdir(tmp_path / "out")) == ["-.png", "b.png"]


@pytest.mark.parametrize("where", ["file", "stdin"])
def test_a_list_saved_by_windows_notepad(tmp_path, fast_load, weights_file, monkeypatch, where):
    # Notepad writes a byte-order mark and CRLF line ends; the first path used to be read
    # as "\ufeffa.jpg" (no such file).
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "a.jpg", photo())
    save(tmp_path / "b c.jpg", photo("coffee.jpg"))
    listing = "\ufeffa.jpg\r\n\r\nb c.jpg\r\n".encode("utf-8")
    if where == "file":
        (tmp_path / "list.txt").write_bytes(listing)
        args, stdin = ["--from-list", "list.txt"], None
    else:
        args, stdin = ["--from-list", "-"], listing
    result = invoke([*args, "-o", "out", "--json", "--weights", weights_file, "--no-crf", *FAST],
                    input=stdin)
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == ["a.jpg", "b c.jpg"]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b c.png"]


def test_a_folder_that_cannot_be_listed_is_a_failure(tmp_path, fast_load, weights_file, monkeypatch):
    """A subfolder without read permission used to be skipped in silence (exit 0)."""
    src = tmp_path / "in"
    save(src / "a.jpg", photo())
    (src / "c_empty.jpg").write_bytes(b"")
    save(src / "locked" / "b.jpg", photo("coffee.jpg"))
    save(src / "shut" / "e.jpg", photo("coffee.jpg"))
    locked, shut = str(src / "locked"), str(src / "shut")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) in (locked, shut):  # as for a folder of mode 000 (tests may run as root)
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    result = invoke([src, "-o", out, "--json", "--weights", weights_file, "--no-crf", *FAST], expect=1)
    lines = result.stderr.splitlines()
    assert f"deeplab: {locked}: cannot list this folder (Permission denied); its images were not read" in lines
    # Folders are not images: counted apart, after the images' counts.
    assert lines[-1].startswith("deeplab: 2 images: 1 segmented, 1 failed in ")
    assert lines[-1].endswith("; 2 folders could not be read")
    records = {json.loads(line)["input"]: json.loads(line) for line in result.stdout.splitlines()}
    assert records[locked]["status"] == "error" and records[str(src / "a.jpg")]["status"] == "ok"
    assert records[str(src / "c_empty.jpg")]["status"] == "error"
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    # The input folder itself unreadable: a failure too (status 1, the summary even with -q),
    # not "no images found".
    result = invoke([locked, "-o", out, "--weights", weights_file, "--no-crf", *FAST], expect=1)
    assert "cannot list this folder" in result.stderr and "no images found" not in result.stderr
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("deeplab: 0 images: 0 segmented in ")
    assert summary.endswith("; 1 folder could not be read")
    # One image and one folder: singular both.
    result = invoke([src / "a.jpg", locked, "-o", out, "--weights", weights_file, "--no-crf", *FAST],
                    expect=1)
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("deeplab: 1 image: 1 segmented in ") and summary.endswith("; 1 folder could not be read")


# --- --fail-fast, unwritable outputs, checks made before the model loads --------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """For runs that must end before the weights are loaded: loading fails the test."""
    import deeplab_cli.weights as weights

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(weights, "load_model", load_model)


def truncated_jpeg() -> bytes:
    good = io.BytesIO()  # big enough that half of it is past the JPEG header
    Image.fromarray(load_photo("coffee.jpg")).save(good, "JPEG")
    return good.getvalue()[: len(good.getvalue()) // 2]


def test_fail_fast_writes_nothing_after_the_failing_image(tmp_path, fast_load, weights_file):
    """The image after the failing one used to be written though reported as not run."""
    src = tmp_path / "in"
    for name in ("a.jpg", "c.jpg", "d.jpg"):
        save(src / name, photo())
    (src / "b.jpg").write_bytes(truncated_jpeg())
    out = tmp_path / "out"
    result = invoke([src, "-o", out, "--fail-fast", "--json", "--weights", weights_file, "--no-crf",
                     *FAST], expect=1)
    assert [(r["input"], r["status"]) for r in map(json.loads, result.stdout.splitlines())] == \
        [(str(src / "a.jpg"), "ok"), (str(src / "b.jpg"), "error")]
    assert "4 images: 1 segmented, 1 failed, 2 not run (--fail-fast)" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_fail_fast_after_a_failed_write_writes_nothing_more(tmp_path, fast_load, weights_file):
    # b's output is a folder: its write fails after c and d have been handed to the writer.
    src = tmp_path / "in"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        save(src / name, photo())
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)
    result = invoke([src, "-o", out, "--fail-fast", "--weights", weights_file, "--no-crf", *FAST],
                    expect=1)
    assert f"deeplab: {out / 'b.png'}: cannot write (Is a directory)" in result.stderr.splitlines()
    assert "4 images: 1 segmented, 1 failed, 2 not run (--fail-fast)" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # no temporaries either
    assert (out / "b.png").is_dir() and list((out / "b.png").iterdir()) == []


def _root_can_write_anyway(folder: Path) -> bool:
    """Whether this process writes into a mode-555 folder regardless (root's DAC override:
    os.access would say yes or no without trying, so try)."""
    try:
        (folder / "probe").touch()
    except PermissionError:
        return False
    (folder / "probe").unlink()
    return True


def test_a_read_only_output_folder_fails_before_the_model_loads(tmp_path, no_model_load, weights_file):
    src = save(tmp_path / "in" / "a.jpg", photo())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if _root_can_write_anyway(ro):
            pytest.skip("this user writes into read-only folders (root)")
        for output, shown in ((f"{ro}/", ro), (f"{ro}/new/masks/", ro), (f"{ro}/m.png", ro)):
            result = invoke([src, "-o", output, "--weights", weights_file, "--no-crf", *FAST], expect=1)
            assert result.output == f"Error: -o {output}: cannot write in {shown} (Permission denied)\n"
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_an_unwritable_output_fails_before_the_model_loads_even_for_root(tmp_path, no_model_load,
                                                                         weights_file, monkeypatch):
    """The same check where root's DAC override hides a mode-555 folder: a folder where the
    file system refuses new files (as a read-only mount does), and a file where a folder
    should be. Each used to load the model, then fail every image alike."""
    import tempfile

    src = save(tmp_path / "in" / "a.jpg", photo())
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    for output in (f"{ro}/", f"{ro}/new/masks/", f"{ro}/m.png"):
        result = invoke([src, "-o", output, "--weights", weights_file, "--no-crf", *FAST], expect=1)
        assert result.output == f"Error: -o {output}: cannot write in {ro} (Read-only file system)\n"
    assert list(ro.iterdir()) == []
    (tmp_path / "f.txt").write_text("")
    for output in (f"{tmp_path}/f.txt/masks/", f"{tmp_path}/f.txt/m.png"):
        result = invoke([src, "-o", output, "--weights", weights_file, "--no-crf", *FAST], expect=1)
        assert result.output == f"Error: -o {output}: cannot write ({tmp_path}/f.txt is a file, not a folder)\n"


def test_nothing_to_write_needs_no_writable_output(tmp_path, no_model_load, weights_file, monkeypatch):
    """--skip-existing with every mask there writes nothing: a read-only folder is fine."""
    import tempfile

    src = save(tmp_path / "in" / "a.jpg", photo())
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"done before")
    def mkstemp(*args, **kwargs):  # no file can be created anywhere
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    result = invoke([src.parent, "-o", out, "--skip-existing", "--weights", weights_file, "--no-crf",
                     "--max-size", "32"])
    assert "1 image: 0 segmented, 1 skipped (existing)" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--bi-rgb-std", "-1"], "--bi-rgb-std"),
    (["--iters", "5000"], "--iters"),
    (["--crf-params", "missing.json"], "missing.json"),
])
def test_bad_crf_flags_are_refused_with_no_crf_too(tmp_path, no_model_load, weights_file, monkeypatch,
                                                   flags, message):
    monkeypatch.chdir(tmp_path)
    src = save(tmp_path / "a.jpg", photo())
    results = [invoke([src, "-o", "m.png", "--weights", weights_file, *FAST, *flags, *no_crf], expect=1)
               for no_crf in ([], ["--no-crf"])]
    assert results[0].output == results[1].output  # the same one line with or without --no-crf
    assert results[1].output.startswith("Error: ") and message in results[1].output
    assert results[1].output.count("\n") == 1
    assert not (tmp_path / "m.png").exists()


def test_empty_stdin_fails_before_the_model_loads(tmp_path, no_model_load, weights_file):
    for args in (["-", "-o", tmp_path / "m.png"], ["-"], ["-", "-o", tmp_path / "dir/"]):
        result = invoke([*args, "--weights", weights_file, *FAST], input=b"", expect=1)
        lines = result.stderr.splitlines()
        assert lines[0] == "deeplab: <stdin>: empty input (0 bytes); pipe an image into it"
        assert lines[-1].startswith("deeplab: 1 image: 0 segmented, 1 failed in ")
        assert result.stdout_bytes == b""
    assert list(tmp_path.iterdir()) == []


def test_empty_stdin_beside_other_inputs_is_one_failure(tmp_path, fast_load, weights_file):
    src = save(tmp_path / "in" / "a.jpg", photo())
    out = tmp_path / "out"
    result = invoke(["-", src, "-o", out, "--weights", weights_file, "--no-crf", *FAST], input=b"",
                    expect=1)
    assert "deeplab: <stdin>: empty input (0 bytes); pipe an image into it" in result.stderr.splitlines()
    assert "2 images: 1 segmented, 1 failed" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
