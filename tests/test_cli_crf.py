"""`deeplab crf` through click's CliRunner: outputs, stdout, and one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import load_photo
from deeplab_cli.cli import cli
from deeplab_cli.crf import CRFParams, dense_crf
from helpers import assert_one_line_error


@pytest.fixture
def files(tmp_path):
    image = np.ascontiguousarray(load_photo("chelsea.jpg")[60:101, 150:207])  # 57 x 41
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 41, 57)).astype(np.float32) * 2
    logits[1] += (image.mean(axis=2) > 100) * 2.0
    probs = np.exp(logits - logits.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    Image.fromarray(image).save(tmp_path / "img.png")
    np.save(tmp_path / "probs.npy", probs)
    return tmp_path, image, probs


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_palette_output(files):
    tmp, image, probs = files
    out = tmp / "labels.png"
    result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--device", "cpu", "--iters", "5")
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.mode == "P" and im.size == (57, 41)
        labels = np.asarray(im)
        assert im.getpalette()[3:6] == [128, 0, 0]  # VOC colour of label 1
    expected = dense_crf(image, probs, CRFParams(iterations=5)).argmax(0)
    np.testing.assert_array_equal(labels, expected)
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def test_probs_output_with_flags(files):
    tmp, image, probs = files
    out = tmp / "refined.npy"
    result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--format", "probs",
                 "--device", "cpu", "--iters", "3", "--bi-rgb-std", "5", "--pos-w", "2",
                 "--crf-norm", "after")
    assert result.exit_code == 0, result.output
    refined = np.load(out)
    params = CRFParams(iterations=3, bi_rgb_std=5, pos_w=2, normalization="after")
    assert refined.dtype == np.float32 and refined.shape == probs.shape
    np.testing.assert_array_equal(refined, dense_crf(image, probs, params))


def test_stdout_output(files):
    tmp, _, _ = files
    result = CliRunner().invoke(cli, ["crf", str(tmp / "img.png"), str(tmp / "probs.npy"),
                                      "-o", "-", "--device", "cpu", "--iters", "1"])
    assert result.exit_code == 0
    with Image.open(io.BytesIO(result.stdout_bytes)) as im:
        assert im.format == "PNG" and im.size == (57, 41)


def _bad(tmp, name, array):
    np.save(tmp / name, array)
    return tmp / name


@pytest.mark.parametrize("case,message", [
    ("shape", "expected shape (C, 41, 57)"),
    ("nan", "NaN"),
    ("negative", "negative"),
    ("logits", "not a probability map"),
    ("ints", "float probabilities"),
    ("2d", "(C, H, W)"),
    ("pickle", "not unpickled"),
    ("missing", "no such file"),
])
def test_bad_probabilities(files, case, message):
    tmp, _, probs = files
    path = {
        "shape": lambda: _bad(tmp, "p.npy", probs[:, :-1]),
        "nan": lambda: _bad(tmp, "p.npy", np.where(probs > 0.9, np.nan, probs).astype(np.float32)),
        "negative": lambda: _bad(tmp, "p.npy", probs - 0.1),
        "logits": lambda: _bad(tmp, "p.npy", np.exp(3 * probs)),
        "ints": lambda: _bad(tmp, "p.npy", (probs * 255).astype(np.uint8)),
        "2d": lambda: _bad(tmp, "p.npy", probs[0]),
        "pickle": lambda: _bad(tmp, "p.npy", np.array([{"a": 1}], dtype=object)),
        "missing": lambda: tmp / "nope.npy",
    }[case]()
    out = tmp / "out.png"
    result = run("crf", tmp / "img.png", path, "-o", out, "--device", "cpu")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0] and str(path.name) in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def test_unreadable_image_and_bad_sigma(files):
    tmp, _, _ = files
    (tmp / "broken.png").write_bytes(b"not an image at all")
    out = tmp / "out.png"
    result = run("crf", tmp / "broken.png", tmp / "probs.npy", "-o", out, "--device", "cpu")
    assert result.exit_code != 0 and "broken.png" in result.output and not out.exists()
    result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--bi-xy-std", "-3",
                 "--device", "cpu")
    assert result.exit_code != 0 and "--bi-xy-std must be a positive number" in result.output
    result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--bi-w", "3e38", "--device", "cpu")
    assert result.exit_code != 0 and "--bi-w 3e+38 is too large" in result.output
    assert not out.exists()


@pytest.mark.parametrize("spec", ["cuda:-1", "cuda:x", "tpu"])
def test_bad_device_is_one_line(files, spec):
    tmp, _, _ = files
    out = tmp / "out.png"
    result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--device", spec)
    assert result.exit_code == 1 and not out.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --device {spec}: expected")


@pytest.fixture
def no_crf_run(monkeypatch):
    """Make reading the probabilities or running the CRF fail loudly: what a test checks must
    happen before either."""
    import deeplab_cli.cli.crf as crf_cli
    import deeplab_cli.crf as crf_lib

    def refuse(*args, **kwargs):
        raise AssertionError("the probabilities were read or refined before the output was checked")

    monkeypatch.setattr(crf_cli, "_load_probs", refuse)
    monkeypatch.setattr(crf_lib, "dense_crf", refuse)


def test_read_only_output_folder_is_refused_before_the_crf(files, no_crf_run):
    tmp, _, _ = files
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:  # root (CAP_DAC_OVERRIDE) creates files whatever the mode says
            (ro / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this process can write in a mode 555 folder (root)")
        for out in (ro / "x.png", ro / "sub" / "x.png"):
            result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--device", "cpu")
            assert result.exit_code == 1
            assert_one_line_error(result, f"-o {out}: cannot write in {ro} (")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)  # so that pytest can clean up


def test_output_under_a_file_is_refused_before_the_crf(files, no_crf_run):
    tmp, _, _ = files
    out = tmp / "img.png" / "x.png"
    result = run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, "--device", "cpu")
    assert result.exit_code == 1
    assert_one_line_error(result, f"-o {out}: cannot write (", "img.png is a file, not a folder")


def test_help_lists_the_flags():
    result = run("crf", "--help")
    assert result.exit_code == 0
    for flag in ("--format", "--iters", "--pos-w", "--bi-rgb-std", "--crf-norm", "--device", "-o"):
        assert flag in result.output


def _interrupted_in_numba(*args, **kw):
    # what numba hands back when Ctrl-C lands inside a compiled loop
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        raise SystemError("CPUDispatcher(<function _blur>) returned a result with an exception set") from interrupt


def test_ctrl_c_inside_the_cpu_crf_is_an_interrupt(files, monkeypatch):
    # The library raises the KeyboardInterrupt itself, so `crf` exits 130 with one line, and
    # a batch (which goes on past a failing image) stops.
    from deeplab_cli.crf import cpu

    tmp, image, probs = files
    monkeypatch.setattr(cpu, "_mean_field", _interrupted_in_numba)
    with pytest.raises(KeyboardInterrupt):
        dense_crf(image, probs, CRFParams(iterations=1))
    out = tmp / "labels.png"
    result = CliRunner().invoke(cli, ["crf", str(tmp / "img.png"), str(tmp / "probs.npy"), "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 130 and result.output.strip() == "deeplab: interrupted"
    assert not out.exists() and [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []

    def other_failure(*args, **kw):
        raise SystemError("a real bug")

    monkeypatch.setattr(cpu, "_mean_field", other_failure)
    with pytest.raises(SystemError, match="a real bug"):
        dense_crf(image, probs, CRFParams(iterations=1))


def test_more_than_256_classes_give_a_16_bit_png_whatever_labels_win(tmp_path):
    # The PNG's type follows the class count, not the labels that happen to win: 300 classes
    # where only low ids win still give 16-bit gray.
    image = np.full((9, 11, 3), 120, dtype=np.uint8)
    probs = np.full((300, 9, 11), 1e-4, dtype=np.float32)
    probs[3] = 1 - 299e-4
    Image.fromarray(image).save(tmp_path / "img.png")
    np.save(tmp_path / "probs.npy", probs)
    out = tmp_path / "labels.png"
    result = run("crf", tmp_path / "img.png", tmp_path / "probs.npy", "-o", out, "--device", "cpu", "--iters", "1")
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() == 3
