"""Hostile inputs to `deeplab crf` and the CRF API: each gets a correct result or one line
naming the file/option and the reason, a non-zero exit, no traceback and no output file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from numpy.lib import format as npy
from PIL import Image

from conftest import load_photo
from deeplab_cli.cli import cli
from deeplab_cli.crf import CRFParams, dense_crf, dense_crf_batch
from deeplab_cli.crf.params import MAX_ITERATIONS
from deeplab_cli.errors import DeeplabError
from deeplab_cli.image_io import read_image

H, W = 20, 30
FAST = ("--device", "cpu", "--iters", "1")


def softmax(logits):
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.fixture
def files(tmp_path):
    image = np.ascontiguousarray(load_photo("chelsea.jpg")[60:60 + H, 150:150 + W])
    probs = softmax(np.random.default_rng(0).normal(size=(4, H, W)).astype(np.float32) * 2)
    Image.fromarray(image).save(tmp_path / "img.png")
    np.save(tmp_path / "probs.npy", probs)
    return tmp_path, image, probs


def run(*args):
    # catch_exceptions=False: a traceback fails the test instead of hiding in result.exception.
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def no_temporaries(folder):
    return [p.name for p in folder.rglob(".*")] == []


# -- outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["image", "probs", "image-link"])
def test_output_never_overwrites_an_input(files, which):
    tmp, _, _ = files
    if which == "image-link":
        (tmp / "link.png").symlink_to(tmp / "img.png")
    out, fmt = {"image": ("img.png", "palette"), "probs": ("probs.npy", "probs"),
                "image-link": ("link.png", "palette")}[which]
    before = {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}
    line = one_error(run("crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / out,
                         "--format", fmt, *FAST))
    assert "refusing to overwrite" in line and out in line
    assert {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("out,fmt,suffix", [("x.png", "probs", ".npy"), ("x.npy", "palette", ".png"),
                                            ("x.jpg", "palette", ".png")])
def test_output_suffix_must_match_the_format(files, out, fmt, suffix):
    tmp, _, _ = files
    line = one_error(run("crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / out,
                         "--format", fmt, *FAST))
    assert f"-o {tmp / out}" in line and f"name the output *{suffix}" in line
    assert not (tmp / out).exists()


def test_output_suffix_in_any_case_or_none_is_written(files):
    tmp, image, probs = files
    for name in ("X.PNG", "labels"):
        assert run("crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / name, *FAST).exit_code == 0
        with Image.open(tmp / name) as im:
            assert im.format == "PNG" and im.size == (W, H)


def test_stdout_that_is_a_terminal_is_refused(files, monkeypatch):
    monkeypatch.setattr("deeplab_cli.cli.options.stdout_is_tty", lambda: True)
    tmp, _, _ = files
    result = CliRunner().invoke(cli, ["crf", str(tmp / "img.png"), str(tmp / "probs.npy"),
                                      "-o", "-", *FAST])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: -o -: refusing to write binary data to a terminal; redirect stdout"
    assert b"PNG" not in result.stdout_bytes


@pytest.mark.parametrize("out,reason", [
    ("folder", "names a folder"),
    ("folder/", "names a folder"),
    ("", "empty file name"),
    ("img.png/x.png", "cannot write"),
])
def test_unwritable_output_is_one_line(files, out, reason):
    tmp, _, _ = files
    (tmp / "folder").mkdir()
    target = str(tmp / out) if out else ""
    line = one_error(run("crf", tmp / "img.png", tmp / "probs.npy", "-o", target, *FAST))
    assert reason in line
    assert (tmp / "img.png").is_file() and no_temporaries(tmp)
    assert list((tmp / "folder").iterdir()) == []


def test_missing_output_folder_is_created(files):
    tmp, image, probs = files
    out = tmp / "new" / "deeper" / "labels.png"
    assert run("crf", tmp / "img.png", tmp / "probs.npy", "-o", out, *FAST).exit_code == 0
    with Image.open(out) as im:
        expected = dense_crf(image, probs, CRFParams(iterations=1)).argmax(0)
        np.testing.assert_array_equal(np.asarray(im), expected)


# -- the probabilities file ------------------------------------------------------------------

def _raw_npy(path, shape, descr="<f4", data=b"\0" * 1000):
    """A .npy whose header claims `shape` but holds only `data`."""
    with open(path, "wb") as fh:
        npy.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(data)
    return path


def test_a_header_claiming_a_huge_array_costs_nothing(files):
    tmp, _, _ = files
    # 21 x 1e6 x 1e6 float32 is 84 TB: loading it first would raise MemoryError.
    line = one_error(run("crf", tmp / "img.png", _raw_npy(tmp / "bomb.npy", (21, 10**6, 10**6)),
                         "-o", tmp / "o.png", *FAST))
    assert "bomb.npy" in line and "expected shape (C, 20, 30)" in line
    # The right shape, but the data cut short.
    line = one_error(run("crf", tmp / "img.png", _raw_npy(tmp / "short.npy", (4, H, W)),
                         "-o", tmp / "o.png", *FAST))
    assert "short.npy: truncated" in line and "9600 bytes" in line
    assert not (tmp / "o.png").exists()


@pytest.mark.parametrize("case,message", [
    ("empty", "empty file (0 bytes)"),
    ("garbage", "not a NumPy .npy array"),
    ("object", "not unpickled"),
    ("hwc", "looks like (H, W, C)"),
])
def test_bad_probability_files(files, case, message):
    tmp, _, probs = files
    path = tmp / "bad.npy"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x93NUMPY\x01\x00garbage that is no header")
    elif case == "object":
        # A pickle inside: must be refused from the header, never unpickled.
        np.save(path, np.array([[[{"a": 1}]]], dtype=object), allow_pickle=True)
    else:
        np.save(path, np.ascontiguousarray(probs.transpose(1, 2, 0)))
    line = one_error(run("crf", tmp / "img.png", path, "-o", tmp / "o.png", *FAST))
    assert "bad.npy" in line and message in line
    assert not (tmp / "o.png").exists()


@pytest.mark.parametrize("dtype", ["float64", "float16", ">f4", "longdouble", "fortran"])
def test_any_float_layout_of_probabilities_works(files, dtype):
    tmp, image, probs = files
    array = np.asfortranarray(probs) if dtype == "fortran" else probs.astype(dtype)
    np.save(tmp / "p.npy", array)
    out = tmp / "r.npy"
    assert run("crf", tmp / "img.png", tmp / "p.npy", "-o", out, "--format", "probs", *FAST).exit_code == 0
    expected = dense_crf(image, array.astype(np.float32), CRFParams(iterations=1))
    np.testing.assert_array_equal(np.load(out), expected)


def test_logits_are_named_as_the_likely_mistake(files):
    tmp, _, probs = files
    np.save(tmp / "logits.npy", np.log(probs))  # negative, as logits are
    line = one_error(run("crf", tmp / "img.png", tmp / "logits.npy", "-o", tmp / "o.png", *FAST))
    assert "negative" in line and "not logits" in line


# -- the image -------------------------------------------------------------------------------

def _exif_rotated(tmp, upright):
    """A JPEG stored turned a quarter to the left, with EXIF orientation 6 (turn right)."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp / "turned.jpg"
    stored.save(path, exif=exif, quality=95)
    return path


def test_exif_rotated_image_takes_upright_probabilities(files):
    tmp, image, probs = files
    path = _exif_rotated(tmp, image)
    rgb = read_image(path)
    assert rgb.shape[:2] == (H, W)  # as `segment` sees it
    out = tmp / "r.npy"
    assert run("crf", path, tmp / "probs.npy", "-o", out, "--format", "probs", *FAST).exit_code == 0
    np.testing.assert_array_equal(np.load(out), dense_crf(rgb, probs, CRFParams(iterations=1)))
    # Probabilities for the image as stored are refused, saying why.
    np.save(tmp / "stored.npy", np.ascontiguousarray(probs.transpose(0, 2, 1)))
    line = one_error(run("crf", path, tmp / "stored.npy", "-o", tmp / "o.png", *FAST))
    assert "expected shape (C, 20, 30)" in line and "EXIF orientation" in line


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK"])
def test_any_image_mode_is_read_as_rgb(files, mode):
    tmp, image, probs = files
    im = Image.fromarray(image)
    if mode == "I;16":
        im = Image.fromarray(image[..., 1].astype(np.uint16) * 257)
    else:
        im = im.convert(mode)
    path = tmp / ("m.jpg" if mode == "CMYK" else "m.png")
    im.save(path)
    out = tmp / "r.npy"
    assert run("crf", path, tmp / "probs.npy", "-o", out, "--format", "probs", *FAST).exit_code == 0
    np.testing.assert_array_equal(np.load(out), dense_crf(read_image(path), probs, CRFParams(iterations=1)))


def test_max_pixels(files):
    tmp, _, _ = files
    line = one_error(run("crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / "o.png",
                         "--max-pixels", 599, *FAST))
    assert "img.png" in line and "--max-pixels" in line
    assert run("crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / "o.png",
               "--max-pixels", 600, *FAST).exit_code == 0


def test_help_matches_behaviour():
    text = run("crf", "--help").output
    for flag in ("--max-pixels", "--crf-params", "-o, --output", "--format"):
        assert flag in text
    assert "any float" in text  # float64/float16 .npy files are accepted


# -- CRF presets and parameters --------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe{", "not UTF-8"),
    (b'{"iterations": 1e999}', "iterations must be a whole number"),
    (b'{"iterations": 2.7}', "iterations must be a whole number"),
    (b'{"iterations": true}', "iterations: could not convert True"),
    (b'{"pos_w": null}', "pos_w: could not convert None"),
    (b'{"bi_w": "heavy"}', "bi_w: could not convert 'heavy'"),
    (b'{"crf": {"normalization": 3}}', "normalization must be"),
    (b'{"bi_rgb_std": 0}', "bi_rgb_std must be a positive number"),
    (b"[" * 100000, "not a JSON CRF preset"),
])
def test_bad_presets_are_one_line_naming_the_file(files, content, message):
    tmp, _, _ = files
    preset = tmp / "preset.json"
    preset.write_bytes(content)
    line = one_error(run("crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / "o.png",
                         "--crf-params", preset, *FAST))
    assert str(preset) in line and message in line
    assert not (tmp / "o.png").exists()


def test_preset_numbers_are_exact():
    assert CRFParams.from_dict({"iterations": 3.0, "bi_w": "5"}) == CRFParams(iterations=3, bi_w=5)
    assert CRFParams.from_dict({"iterations": MAX_ITERATIONS}).iterations == MAX_ITERATIONS
    # No float round trip: 2**62 + 1 as a float is 2**62, which would pass as "whole".
    with pytest.raises(DeeplabError, match=rf"at most {MAX_ITERATIONS} .*, got {2**62 + 1}$"):
        CRFParams.from_dict({"iterations": 2**62 + 1})
    with pytest.raises(DeeplabError, match="expected a mapping"):
        CRFParams.from_dict([("bi_w", 5)])


@pytest.mark.parametrize("count", [MAX_ITERATIONS + 1, 10**20, np.int64(2**40)])
def test_iterations_beyond_the_bound_are_refused(count):
    # 10**20 iterations used to be accepted and ran for ever.
    with pytest.raises(DeeplabError) as info:
        CRFParams(iterations=count)
    message = str(info.value)
    assert message == (f"CRF iterations must be at most {MAX_ITERATIONS} (5-10 is usual), "
                       f"got {int(count)}")
    assert CRFParams(iterations=MAX_ITERATIONS).iterations == MAX_ITERATIONS


def test_huge_iters_flag_and_preset_are_one_line_naming_them(files):
    tmp, _, _ = files
    base = ["crf", tmp / "img.png", tmp / "probs.npy", "-o", tmp / "o.png", "--device", "cpu"]
    line = one_error(run(*base, "--iters", 10**20))
    assert line == f"Error: --iters must be at most {MAX_ITERATIONS} (5-10 is usual), got {10**20}"
    preset = tmp / "preset.json"
    preset.write_text('{"iterations": 1e20}')
    line = one_error(run(*base, "--crf-params", preset))
    assert line.startswith(f"Error: {preset}: CRF iterations must be at most {MAX_ITERATIONS}")
    # The flag overrides the preset's count, and the bound is inclusive.
    preset.write_text(json.dumps({"iterations": MAX_ITERATIONS + 1}))
    assert one_error(run(*base, "--crf-params", preset, "--iters", 1)).startswith(f"Error: {preset}")
    assert run(*base, "--iters", 0).exit_code == 0
    assert not (tmp / ".o.png.part").exists() and no_temporaries(tmp)


def test_tune_crf_names_the_iters_flag(tmp_path):
    from helpers import write_voc

    voc = write_voc(tmp_path / "voc", {"a": np.zeros((5, 7), np.uint8)})
    weights = tmp_path / "never-read.pth"  # the check comes before the weights load
    weights.write_bytes(b"")
    result = CliRunner().invoke(cli, ["tune-crf", "--root", str(voc), "--weights", str(weights),
                                      "--iters", str(MAX_ITERATIONS + 1)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: --iters must be at most {MAX_ITERATIONS} (5-10 is usual), got {MAX_ITERATIONS + 1}")


def test_params_take_numpy_scalars_and_refuse_the_rest():
    params = CRFParams(pos_w=np.float32(2.5), bi_xy_std=np.int64(60), iterations=np.int64(4))
    assert params == CRFParams(pos_w=2.5, bi_xy_std=60, iterations=4)
    assert type(params.iterations) is int and type(params.pos_w) is float
    json.dumps(params.to_dict())  # plain Python numbers: presets can be written
    for bad in (dict(pos_w="3"), dict(bi_rgb_std=None), dict(iterations=True), dict(iterations=3.0)):
        with pytest.raises(DeeplabError) as info:
            CRFParams(**bad)
        assert next(iter(bad)) in str(info.value)


# -- the API ---------------------------------------------------------------------------------

def _inputs():
    image = np.ascontiguousarray(load_photo("coffee.jpg")[100:100 + 17, 150:150 + 23])
    probs = softmax(np.random.default_rng(1).normal(size=(3, 17, 23)).astype(np.float32) * 2)
    return image, probs


def test_params_as_dict_or_none():
    image, probs = _inputs()
    np.testing.assert_array_equal(dense_crf(image, probs, {"iterations": 2, "bi_w": 5}),
                                  dense_crf(image, probs, CRFParams(iterations=2, bi_w=5)))
    np.testing.assert_array_equal(dense_crf(image, probs, None), dense_crf(image, probs))
    with pytest.raises(DeeplabError, match="unknown CRF parameter"):
        dense_crf(image, probs, {"iters": 2})
    with pytest.raises(DeeplabError, match="params must be a CRFParams"):
        dense_crf(image, probs, [2])


def test_numpy_long_double_probabilities():
    image, probs = _inputs()
    params = CRFParams(iterations=2)
    np.testing.assert_array_equal(dense_crf(image, probs.astype(np.longdouble), params),
                                  dense_crf(image, probs, params))


def test_torch_inputs_odd_layouts():
    image, probs = _inputs()
    params = CRFParams(iterations=2)
    expected = dense_crf(image, probs, params)
    # Non-contiguous views and a tensor that requires grad.
    p = torch.from_numpy(np.ascontiguousarray(probs.transpose(1, 2, 0))).permute(2, 0, 1).requires_grad_()
    im = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).permute(1, 2, 0)
    out = dense_crf(im, p, params)
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), expected)


def test_batch_takes_iterables():
    image, probs = _inputs()
    params = CRFParams(iterations=2)
    outs = dense_crf_batch((im for im in [image, image]), iter([probs, torch.from_numpy(probs)]), params)
    assert isinstance(outs[0], np.ndarray) and isinstance(outs[1], torch.Tensor)
    np.testing.assert_array_equal(outs[1].numpy(), outs[0])
    assert dense_crf_batch([], [], params) == []
