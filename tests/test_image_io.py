"""Image reading (formats, modes, EXIF, damage, pixel cap) and mask writing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab_cli.errors import DeeplabError
from deeplab_cli.image_io import (
    colorize,
    encode_output,
    overlay,
    read_image,
    sniff_format,
    write_bytes,
    write_labels,
)
from helpers import encode

H, W = 37, 53  # odd sizes catch width/height swaps


def rng_image(seed: int = 0, shape=(H, W, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def blocks_image() -> np.ndarray:
    """Large flat blocks (survive JPEG) with distinct corners (catch rotations)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 2, : W // 2] = (255, 0, 0)
    img[: H // 2, W // 2:] = (0, 255, 0)
    img[H // 2:, : W // 2] = (0, 0, 255)
    img[H // 2:, W // 2:] = (255, 255, 0)
    return img


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, ext, kw", [
    ("PNG", "png", {}),
    ("BMP", "bmp", {}),
    ("TIFF", "tif", {}),
    ("WEBP", "webp", {"lossless": True}),
    ("PPM", "ppm", {}),
])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt, ext, kw):
    img = rng_image(1)
    path = tmp_path / f"x.{ext}"
    Image.fromarray(img).save(path, format=fmt, **kw)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, img)
    assert out.flags.writeable and out.flags.c_contiguous


def test_jpeg_and_bytes_input(tmp_path):
    img = blocks_image()
    data = encode(Image.fromarray(img), "JPEG", quality=95)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    from_path, from_bytes = read_image(path), read_image(data)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert np.abs(from_path.astype(int) - img).mean() < 4


def test_gif_reads_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((H, W, 3), v, np.uint8)).convert("P") for v in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = read_image(path)
    assert out.shape == (H, W, 3)
    assert abs(int(out.mean()) - 10) <= 2


# --- modes ---------------------------------------------------------------------------------


def test_grayscale_and_bilevel_become_rgb():
    gray = rng_image(2, (H, W))
    out = read_image(encode(Image.fromarray(gray), "PNG"))
    assert out.shape == (H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    bits = Image.fromarray(gray > 127)  # mode 1
    out = read_image(encode(bits, "PNG"))
    np.testing.assert_array_equal(out[..., 0], np.where(gray > 127, 255, 0))


def test_palette_without_transparency():
    im = Image.fromarray(rng_image(3)).quantize(16)
    out = read_image(encode(im, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


def test_palette_with_transparency_composites_onto_white():
    idx = np.zeros((H, W), np.uint8)
    idx[:, W // 2:] = 1
    im = Image.fromarray(idx, mode=None)
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # 0 blue, 1 red
    im.info["transparency"] = 1
    data = encode(im, "PNG", transparency=1)
    out = read_image(data)
    np.testing.assert_array_equal(out[0, 0], (0, 0, 255))
    np.testing.assert_array_equal(out[0, -1], (255, 255, 255))  # transparent -> white


def test_rgba_alpha_is_composited_onto_white():
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish everywhere
    rgba[:, :10, 3] = 255  # opaque
    rgba[:, 10:20, 3] = 0  # transparent
    rgba[:, 20:, 3] = 128  # half
    out = read_image(encode(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(out[0, 0], (200, 0, 0))
    np.testing.assert_array_equal(out[0, 15], (255, 255, 255))
    half = out[0, 30].astype(int)
    assert abs(half[0] - 227) <= 1 and abs(half[1] - 127) <= 1  # 200*a + 255*(1-a), 255*(1-a)


def test_la_mode():
    la = np.zeros((H, W, 2), np.uint8)
    la[..., 0] = 50
    la[..., 1] = 255
    la[:, 0, 1] = 0
    out = read_image(encode(Image.fromarray(la, mode=None), "PNG"))
    np.testing.assert_array_equal(out[0, 1], (50, 50, 50))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[:, : W // 2, 0] = 255  # pure cyan on the left
    cmyk[:, W // 2:, 3] = 255  # black on the right
    im = Image.frombytes("CMYK", (W, H), cmyk.tobytes())
    out = read_image(encode(im, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert out.shape == (H, W, 3)
    left, right = out[H // 2, 2].astype(int), out[H // 2, -3].astype(int)
    assert left[0] < 30 and left[1] > 225 and left[2] > 225, left
    assert right.max() < 30, right


def test_16bit_png_scales_not_clips():
    values = np.array([[0, 257, 30000, 65535]], np.uint16).repeat(3, axis=0)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    out = read_image(encode(im, "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 117, 255])  # 30000/257 = 116.7


def test_16bit_tiff():
    values = (np.arange(H * W).reshape(H, W) * 31).astype(np.uint16)
    out = read_image(encode(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[..., 1], np.rint(values / 257).astype(np.uint8))


def test_32bit_int_and_float_modes():
    ints = np.array([[0, 65535, 1000]], np.int32)
    out = read_image(encode(Image.fromarray(ints, mode=None), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 4])
    # Out of the 16-bit range: stretched from min..max, nothing clipped.
    wide = np.array([[-100, 0, 100]], np.int32)
    out = read_image(encode(Image.fromarray(wide, mode=None), "TIFF"))
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 255 and abs(int(out[0, 1, 0]) - 127.5) <= 0.5
    floats = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = read_image(encode(Image.fromarray(floats, mode=None), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("orientation, rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    stored = blocks_image()
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    raw = np.asarray(Image.open(path).convert("RGB"))  # as stored, no transpose
    out = read_image(path)
    expected = np.rot90(raw, k=rotate)  # k=-1: 90 degrees clockwise (orientation 6)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    if rotate % 2:
        assert out.shape[:2] == (W, H)


def test_broken_exif_still_reads(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(blocks_image()).save(path, exif=b"Exif\x00\x00garbage")
    assert read_image(path).shape == (H, W, 3)


# --- damage and limits ---------------------------------------------------------------------


def test_truncated_jpeg_names_file(tmp_path):
    data = encode(Image.fromarray(rng_image(4, (64, 64, 3))), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeeplabError, match=r"cut\.jpg: truncated or corrupt JPEG"):
        read_image(path)


def test_zero_byte_missing_directory_and_not_an_image(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DeeplabError, match=r"empty\.png: empty file"):
        read_image(empty)
    with pytest.raises(DeeplabError, match=r"nope\.jpg: no such file"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(DeeplabError, match="is a directory"):
        read_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not a picture\n")
    with pytest.raises(DeeplabError, match=r"notes\.jpg: not a supported image"):
        read_image(text)
    with pytest.raises(DeeplabError, match=r"^<stdin>: empty file"):
        read_image(b"", name="<stdin>")


@pytest.mark.parametrize("fmt, name, kw", [
    ("JPEG", "JPEG", {}), ("PNG", "PNG", {}), ("TIFF", "TIFF", {}), ("TIFF", "TIFF", {"big_endian": True}),
    ("GIF", "GIF", {}), ("BMP", "BMP", {}), ("WEBP", "WebP", {}), ("PPM", "PPM", {}),
])
def test_a_header_cut_short_is_named_by_its_format(fmt, name, kw):
    data = encode(Image.fromarray(rng_image(8)), fmt, **kw)
    assert sniff_format(data) == name
    cut = next(data[:n] for n in range(4, len(data)) if sniff_format(data[:n]))  # the magic, and no more
    with pytest.raises(DeeplabError, match=rf"^cut: truncated or corrupt {name} (\(its header cannot be read\)|header \()"):
        read_image(cut, name="cut")


def test_sniffing_names_no_format_for_other_files():
    for data in (b"hello, not a picture", b"P9 no such netpbm", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"\xff\xd8", b"P"):
        assert sniff_format(data) is None, data


# In a fresh interpreter: read each damaged TIFF, print the one-line error, and let stderr show
# whatever the decoders wrote on their own; `quiet` first when asked.
DECODE_DAMAGED = """
import sys
from deeplab_cli.errors import DeeplabError
from deeplab_cli.image_io import quiet_decoders, read_image
from helpers import damaged_tiffs
if sys.argv[1] == "quiet":
    quiet_decoders()
for name, data in damaged_tiffs().items():
    try:
        read_image(data, name=name)
    except DeeplabError as exc:
        print(exc)
"""


def test_quiet_decoders_keeps_libtiff_and_pil_off_stderr():
    def run(mode):
        here = Path(__file__).resolve().parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
        proc = subprocess.run([sys.executable, "-c", DECODE_DAMAGED, mode], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines(), proc.stderr

    errors, noise = run("loud")
    assert errors == ["lzw.tif: truncated or corrupt TIFF (decoder error -2)",
                      "samples.tif: truncated or corrupt TIFF (its header cannot be read)"]
    if "Using code not yet in table" not in noise or "More samples per pixel" not in noise:
        pytest.skip(f"this PIL and libtiff do not print these on their own: {noise!r}")
    quiet_errors, quiet_noise = run("quiet")
    assert quiet_errors == errors
    assert quiet_noise == ""


def test_pixel_cap_is_checked_before_decoding():
    # A PNG whose header promises 300x300 pixels but holds no image data: decoding it
    # would fail as truncated, so the cap message proves the header check came first.
    full = encode(Image.fromarray(rng_image(5, (300, 300, 3))), "PNG")
    header_only = full[: full.index(b"IDAT") + 20]  # a few bytes of pixel data
    with pytest.raises(DeeplabError, match=r"big\.png: 300x300 is 0\.1 megapixels, more than the limit"):
        read_image(header_only, name="big.png", max_pixels=50_000)
    with pytest.raises(DeeplabError, match="truncated"):
        read_image(header_only, name="big.png", max_pixels=None)


def test_default_cap_stops_a_decompression_bomb():
    bomb = encode(Image.new("1", (11_000, 10_000)), "PNG")  # 110 MP in a few kB
    assert len(bomb) < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own DecompressionBombWarning
        with pytest.raises(DeeplabError, match="110.0 megapixels"):
            read_image(bomb, name="bomb.png")
    small = rng_image(6, (30, 40, 3))
    assert read_image(encode(Image.fromarray(small), "PNG"), max_pixels=1200).shape == (30, 40, 3)


# --- writing -------------------------------------------------------------------------------


PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]


def labels_map(n: int = len(PALETTE), seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (H, W))


def test_palette_png_holds_ids_and_palette(tmp_path):
    labels = labels_map()
    path = tmp_path / "mask.png"
    write_labels(path, labels, PALETTE, "palette")
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == (W, H)
        np.testing.assert_array_equal(np.asarray(im), labels)
        pal = im.getpalette()
    assert [tuple(pal[3 * i: 3 * i + 3]) for i in range(len(PALETTE))] == PALETTE
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), colorize(labels, PALETTE))
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # no temp file left


def test_many_classes_fall_back_to_16bit_gray(tmp_path):
    labels = labels_map(300)
    assert labels.max() > 255
    palette = [(i % 256, 0, 0) for i in range(300)]
    for fmt in ("palette", "gray"):
        path = tmp_path / f"{fmt}.png"
        write_labels(path, labels, palette, fmt)
        with Image.open(path) as im:
            assert im.mode.startswith("I")
            np.testing.assert_array_equal(np.asarray(im), labels)


def test_gray_png(tmp_path):
    labels = labels_map()
    data = encode_output("gray", labels=labels, palette=PALETTE)
    im = Image.open(io.BytesIO(data))
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), labels)


def test_overlay_blends():
    img, labels = rng_image(8), labels_map()
    np.testing.assert_array_equal(overlay(img, labels, PALETTE, 0.0), img)
    np.testing.assert_array_equal(overlay(img, labels, PALETTE, 1.0), colorize(labels, PALETTE))
    half = overlay(img, labels, PALETTE, 0.5).astype(int)
    expected = (img.astype(int) + colorize(labels, PALETTE)) / 2
    assert np.abs(half - expected).max() <= 0.5 + 1e-9
    data = encode_output("overlay", labels=labels, palette=PALETTE, image=img, alpha=0.5)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), half)


def test_probs_npy(tmp_path):
    import torch

    probs = torch.rand(len(PALETTE), H, W).softmax(0)
    path = tmp_path / "p.npy"
    write_labels(path, probs.argmax(0).numpy(), PALETTE, "probs", probs=probs)
    loaded = np.load(path)
    assert loaded.dtype == np.float32 and loaded.shape == (len(PALETTE), H, W)
    np.testing.assert_array_equal(loaded, probs.numpy())


def test_write_to_stream_and_failed_write_keeps_old_file(tmp_path):
    stream = io.BytesIO()
    write_bytes(stream, b"abc")
    assert stream.getvalue() == b"abc"
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_bytes(target, object())  # fails inside the atomic write
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# --- caller mistakes are refused, not written as wrong data ---------------------------------


def test_probs_format_without_probabilities_is_refused_and_writes_nothing(tmp_path):
    """write_labels(..., "probs") without probs used to write a .npy holding array([nan])."""
    path = tmp_path / "p.npy"
    with pytest.raises(ValueError, match=r"^probs format: no probabilities given") as info:
        write_labels(path, labels_map(), PALETTE, "probs")
    assert "\n" not in str(info.value)
    for bad, shown in [(np.zeros((H, W), np.float32), f"shape ({H}, {W})"), ("abc", "str")]:
        with pytest.raises(ValueError, match="probs format: expected probabilities") as info:
            encode_output("probs", probs=bad)
        assert shown in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad_id", [-1, 65536, 70000])
@pytest.mark.parametrize("fmt", ["palette", "gray", "overlay"])
def test_label_ids_outside_16_bits_are_refused_not_wrapped(tmp_path, fmt, bad_id):
    """astype used to wrap them: -1 was written as 255 (or 65535), 70000 as 4464."""
    labels = labels_map().astype(np.int64)
    labels[3, 4] = bad_id
    path = tmp_path / "mask.png"
    with pytest.raises(ValueError, match=rf"^labels: class id {bad_id} is outside 0\.\.65535$"):
        write_labels(path, labels, PALETTE, fmt, image=rng_image(2))
    assert list(tmp_path.iterdir()) == []


def test_label_ids_at_the_16_bit_edges_round_trip(tmp_path):
    labels = labels_map().astype(np.int64)
    labels[0, 0], labels[1, 1] = 65535, 0
    path = tmp_path / "mask.png"
    write_labels(path, labels, None, "gray")
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), labels)


@pytest.mark.parametrize("bad, shown", [
    (np.zeros((H, W), np.float32), "float32"),  # astype would truncate 1.7 to 1
    (np.zeros((H, W, 1), np.uint8), f"({H}, {W}, 1)"),
    (None, "missing"),
])
def test_labels_that_are_not_integer_ids_h_w_are_refused(bad, shown):
    for fmt in ("palette", "gray"):
        with pytest.raises(ValueError, match="^labels: ") as info:
            encode_output(fmt, labels=bad, palette=PALETTE)
        assert shown in str(info.value) and "\n" not in str(info.value)


def test_boolean_labels_are_ids_0_and_1():
    mask = labels_map(2).astype(bool)
    np.testing.assert_array_equal(colorize(mask, PALETTE), colorize(mask.astype(np.uint8), PALETTE))
    data = encode_output("gray", labels=mask)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), mask.astype(np.uint8))


@pytest.mark.parametrize("image, shown", [
    (None, "needs the image"),  # used to be AttributeError: 'NoneType' has no 'shape'
    (rng_image(3)[..., 0], f"got uint8 ({H}, {W})"),  # used to be a broadcast ValueError
    (rng_image(3).astype(np.float32), "got float32"),
    (np.dstack([rng_image(3), rng_image(4)[..., :1]]), f"got uint8 ({H}, {W}, 4)"),
])
def test_overlay_needs_an_rgb_image(tmp_path, image, shown):
    path = tmp_path / "o.png"
    with pytest.raises(ValueError, match="^overlay: ") as info:
        write_labels(path, labels_map(), PALETTE, "overlay", image=image)
    assert shown in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^overlay: needs a palette"):
        write_labels(path, labels_map(), None, "overlay", image=rng_image(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("palette", [[(0, 0, 300)] * 5, [(0, 0)] * 5, [(0.5, 0, 0)] * 5])
def test_colorize_refuses_a_palette_it_would_wrap(palette):
    with pytest.raises(ValueError, match="^palette: expected RGB triples"):
        colorize(labels_map(), palette)


def test_a_negative_max_pixels_is_a_caller_error_and_zero_means_no_limit():
    """max_pixels=-1 used to refuse every image ('more than the limit of -1e-06')."""
    data = encode(Image.fromarray(rng_image(9, (5, 7, 3))), "PNG")
    with pytest.raises(ValueError, match=r"^max_pixels -1: expected None or 0 \(no limit\)"):
        read_image(data, max_pixels=-1)
    assert read_image(data, max_pixels=0).shape == (5, 7, 3)
    assert read_image(data, max_pixels=None).shape == (5, 7, 3)
    assert read_image(data, max_pixels=35).shape == (5, 7, 3)
    # A small limit reads in pixels, not '0.0 megapixels, more than the limit of 3.4e-05'.
    with pytest.raises(DeeplabError, match=r"^x\.png: 7x5 is 35 pixels, more than the limit of 34 \(--max-pixels\)$"):
        read_image(data, name="x.png", max_pixels=34)
