"""Image reading (any common format and mode -> upright RGB uint8) and mask writing.

Reading: `read_image` accepts a path or the encoded bytes (for stdin) and always returns
an RGB uint8 array (H, W, 3) the way a viewer would show the picture: EXIF orientation
applied, grayscale / palette / CMYK / 16-bit converted, alpha composited onto white.
Anything a user can get wrong (missing, empty, truncated, not an image, too many pixels)
raises a one-line DeeplabError naming the file.

Writing: masks are encoded to bytes first (`encode_output`), so the encoding can run on a
writer thread, then written atomically (`write_bytes`) or to a binary stream (stdout).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import io
import logging
import os
import warnings
from typing import IO, Sequence

import numpy as np

from deeplab_cli.errors import DeeplabError
from deeplab_cli.fsutil import atomic_open, read_input

# Files a directory walk picks up (lower-case suffixes).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm",
})

# Decoders PIL may use. Restricting them keeps exotic parsers (and EPS, which shells out
# to Ghostscript) away from untrusted files. MPO is what many phone cameras write as .jpg.
READ_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "DIB", "TIFF", "WEBP", "GIF", "PPM")

# Default decompression-bomb cap for reading: 100 megapixels (a 24 MP photo is far below).
DEFAULT_MAX_PIXELS = 100_000_000

FORMATS = ("palette", "gray", "overlay", "probs")

# Background that transparent pixels are composited onto (what a viewer on a white page shows).
ALPHA_BACKGROUND = (255, 255, 255)

# Leading bytes of the formats read, to name the format of a file PIL could not open.
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def _display_name(source, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(source)


def read_image(source: str | os.PathLike | bytes, *, name: str | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file (or its bytes) to an upright RGB uint8 array (H, W, 3).

    - EXIF orientation is applied, so the array is the picture as viewers show it.
    - Grayscale, palette and CMYK become RGB; transparency (RGBA, LA, palette with a
      transparent index) is composited onto white.
    - 16-bit images (I;16, 16-bit PNG/TIFF) are scaled to 8 bits (value / 257), not
      clipped; 32-bit integer ('I') data in 0..65535 likewise, other ranges and float
      ('F') data are stretched from their minimum..maximum to 0..255 (floats already in
      0..1 are multiplied by 255).
    - `max_pixels` (None or 0 = no cap) is checked from the header, before any pixel is
      decoded, so a decompression bomb costs nothing.

    Raises:
        DeeplabError: one line naming the file (`name`, else the path, else '<bytes>')
            and the reason: missing, empty, not an image, truncated, too many pixels.
        ValueError: `max_pixels` is negative (a caller's mistake, not the file's).
    """
    from PIL import Image

    if max_pixels is not None and max_pixels < 0:
        raise ValueError(f"max_pixels {max_pixels}: expected None or 0 (no limit) or a positive "
                         "number of pixels")
    label = _display_name(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = read_input(source, label=label, expected="an image")
    if not data:
        raise DeeplabError(f"{label}: empty file (0 bytes)")

    Image.init()  # register every plugin, so the format names below resolve (MPO, WEBP ...)
    try:
        im = Image.open(io.BytesIO(data), formats=[f for f in READ_FORMATS if f in Image.OPEN])
    except Image.UnidentifiedImageError:
        kind = sniff_format(data)
        if kind:
            raise DeeplabError(f"{label}: truncated or corrupt {kind} (its header cannot be read)") from None
        raise DeeplabError(
            f"{label}: not a supported image (expected JPEG, PNG, BMP, TIFF, WebP, GIF or PPM)"
        ) from None
    except Image.DecompressionBombError as exc:
        # PIL's own, process-wide guard (twice Image.MAX_IMAGE_PIXELS) fired first.
        raise DeeplabError(f"{label}: too many pixels ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DeeplabError(f"{label}: truncated or corrupt {sniff_format(data) or 'image'} header ({exc})") from None

    with im:
        width, height = im.size
        if max_pixels and width * height > max_pixels:
            if width * height >= 50_000 and max_pixels >= 10_000:
                size = f"{width * height / 1e6:.1f} megapixels, more than the limit of {max_pixels / 1e6:g}"
            else:  # in megapixels a small image or limit would read '0.0' or '1e-06'
                size = f"{width * height} pixels, more than the limit of {max_pixels}"
            raise DeeplabError(f"{label}: {width}x{height} is {size} (--max-pixels)")
        if width == 0 or height == 0:
            raise DeeplabError(f"{label}: image has no pixels ({width}x{height})")
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise DeeplabError(f"{label}: truncated or corrupt {im.format or 'image'} ({exc})") from None
        try:
            rgb = _to_rgb(_upright(im))
        except (OSError, ValueError) as exc:
            raise DeeplabError(f"{label}: cannot convert {im.mode} image to RGB ({exc})") from None
    # Arrays viewed from PIL's buffer are read-only; callers (and torch) expect to own them.
    return rgb if rgb.flags.writeable else rgb.copy()


def sniff_format(data: bytes) -> str | None:
    """The format (JPEG, PNG, TIFF, GIF, BMP, WebP, PPM) that `data`'s first bytes announce,
    or None."""
    for magic, kind in MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PPM"
    return None


def quiet_decoders() -> None:
    """Keep the image decoders' own messages off stderr, for a command that reports every bad
    file in one line of its own. Process-wide, so the `deeplab` command calls it once at start;
    the library leaves the process as it found it.

    - PIL's Python warnings (corrupt EXIF, odd TIFF tags, its decompression-bomb warning:
      `read_image` applies its own pixel cap) are ignored, and its log records ("More
      samples per pixel than can be decoded") dropped.
    - libtiff prints its errors and warnings ("LZWDecode: Corrupted LZW table", "JPEGLib:
      Bogus Huffman table") to stderr from C; its handlers are cleared in the libtiff that
      PIL loaded, when one can be found. Where none can (a libtiff linked into PIL itself),
      they stay.
    """
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    pil_log = logging.getLogger("PIL")
    if not any(isinstance(handler, logging.NullHandler) for handler in pil_log.handlers):
        pil_log.addHandler(logging.NullHandler())  # else logging's last resort prints to stderr
    pil_log.propagate = False
    for lib in _loaded_libtiff():
        for setter in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
            func = getattr(lib, setter, None)
            if func is not None:
                func.restype = ctypes.c_void_p
                func.argtypes = [ctypes.c_void_p]
                func(None)


def _loaded_libtiff() -> list:
    """Handles of the libtiff builds already loaded into this process (by PIL's decoder)."""
    from PIL import Image  # its C core, which links libtiff, loads with it

    paths = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split(None, 5)[-1].strip()
                if os.path.basename(path).startswith("libtiff"):
                    paths.add(path)
    except OSError:  # no /proc (macOS): the copies PIL's wheels bundle
        pil = os.path.dirname(Image.__file__)
        for pattern in ("../pillow.libs/libtiff*", ".dylibs/libtiff*"):
            paths.update(glob.glob(os.path.join(pil, pattern)))
    handles = []
    for path in sorted(paths):
        try:  # RTLD_NOLOAD: a handle to what is loaded already, never a second copy
            handles.append(ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY))
        except (OSError, AttributeError):
            continue
    return handles


def _upright(im):
    """Apply the EXIF orientation tag. A damaged EXIF block leaves the pixels as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not cost the picture itself
        return im


def _to_rgb(im) -> np.ndarray:
    """Any PIL mode -> RGB uint8 (H, W, 3), C-contiguous."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return np.ascontiguousarray(np.asarray(Image.alpha_composite(background, rgba).convert("RGB")))
    if mode == "CMYK":
        return np.ascontiguousarray(np.asarray(_cmyk_to_rgb(im)))
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _high_depth_to_uint8(np.asarray(im), mode)  # (H, W)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    # L, 1, P, YCbCr, LAB, HSV: PIL's own conversion is exact for these.
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _cmyk_to_rgb(im):
    """CMYK -> RGB through the embedded ICC profile when there is one, else PIL's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            return ImageCms.profileToProfile(
                im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
        except Exception:  # no LittleCMS, or a profile it cannot use
            pass
    return im.convert("RGB")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit or float gray values to uint8 without clipping (see read_image)."""
    if mode.startswith("I;16") or (mode == "I" and values.size
                                   and values.min() >= 0 and values.max() <= 65535):
        # 65535 / 257 == 255 exactly, so full scale maps to full scale.
        return np.rint(values.astype(np.float32) / 257.0).astype(np.uint8)
    values = values.astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# --- writing -----------------------------------------------------------------------------


def output_suffix(fmt: str) -> str:
    """The file suffix each format writes: '.npy' for probs, '.png' for the rest."""
    if fmt not in FORMATS:
        raise DeeplabError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    return ".npy" if fmt == "probs" else ".png"


def _flat_palette(palette: Sequence[Sequence[int]]) -> list[int]:
    flat = [int(c) for rgb in list(palette)[:256] for c in rgb]
    return flat + [0] * (768 - len(flat))


# Class ids a label map may hold: what a 16-bit PNG stores.
MAX_LABEL = 65535


def checked_labels(labels, where: str = "labels") -> np.ndarray:
    """`labels` as a 2-D integer array of ids 0..65535 (`MAX_LABEL`), or a one-line ValueError
    naming `where`: casting would wrap -1 to 255 and 70000 to 4464, and truncate floats."""
    if labels is None:
        raise ValueError(f"{where}: missing (expected class ids (H, W))")
    if hasattr(labels, "detach"):  # torch tensor, maybe on the GPU
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"{where}: expected integer class ids (H, W), got {labels.dtype} {labels.shape}")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)  # as ids 0/1: a bool array would index as a mask
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > MAX_LABEL:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: class id {bad} is outside 0..{MAX_LABEL}")
    return labels


def _checked_palette(palette, where: str = "palette") -> np.ndarray:
    """`palette` as uint8 (n, 3), or a one-line ValueError (values outside 0..255 would wrap)."""
    if palette is None:
        raise ValueError(f"{where}: missing (expected RGB colours, one per class)")
    table = np.asarray(palette)
    if table.ndim != 2 or table.shape[1] != 3 or not np.issubdtype(table.dtype, np.integer) \
            or (table.size and (table.min() < 0 or table.max() > 255)):
        raise ValueError(f"{where}: expected RGB triples of whole numbers 0..255")
    return table.astype(np.uint8)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class ids (H, W) -> RGB uint8 (H, W, 3) through `palette`; ids past its end are black.

    Raises:
        ValueError: labels that are not integer ids 0..65535 (H, W), or a bad palette.
    """
    labels = checked_labels(labels)
    colours = _checked_palette(palette)
    table = np.zeros((max(len(palette), int(labels.max(initial=0)) + 1), 3), np.uint8)
    table[: len(palette)] = colours
    return table[labels]


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over the image: (1 - alpha) * image + alpha * colour.

    Raises:
        ValueError: no image, an image that is not RGB uint8 (H, W, 3), labels as
            `colorize` refuses them, or image and labels of different sizes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise DeeplabError(f"--alpha {alpha}: expected a number from 0 to 1")
    if image is None:
        raise ValueError("overlay: needs the image the labels belong to (image=...)")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"overlay: expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    labels = checked_labels(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colour = colorize(labels, palette).astype(np.float32)
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def encode_labels_png(labels: np.ndarray, palette: Sequence[Sequence[int]] | None = None,
                      *, n_classes: int | None = None) -> bytes:
    """Class ids (H, W) -> PNG bytes whose pixel values are the ids.

    With a palette and at most 256 classes: a mode-P PNG carrying the dataset palette
    (viewers show colours, readers get ids). Without a palette: mode L (gray ids).
    More than 256 classes (or ids > 255) cannot fit 8 bits: a 16-bit grayscale PNG.

    Raises:
        ValueError: labels that are not integer ids 0..65535 (H, W) (see `checked_labels`).
    """
    from PIL import Image

    labels = checked_labels(labels)
    n = max(n_classes or 0, len(palette) if palette is not None else 0)
    if n > 256 or labels.max(initial=0) > 255:
        im = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint16, copy=False)))  # mode I;16
    else:
        im = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint8, copy=False)))  # mode L
        if palette is not None:
            im.putpalette(_flat_palette(palette))  # L + palette -> mode P, same values
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def encode_rgb_png(rgb: np.ndarray) -> bytes:
    """RGB uint8 (H, W, 3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """Array -> .npy bytes (float32 for probabilities)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_output(fmt: str, *, labels: np.ndarray | None = None,
                  palette: Sequence[Sequence[int]] | None = None,
                  image: np.ndarray | None = None, probs=None, alpha: float = 0.5) -> bytes:
    """Encode one result in an output format.

    palette: labels (H, W) + palette -> mode-P PNG (16-bit gray for > 256 classes).
    gray: labels -> mode-L PNG of class ids (16-bit for > 256 classes).
    overlay: image (H, W, 3) + labels + palette -> RGB PNG, mask blended with `alpha`.
    probs: probs (C, H, W) -> float32 .npy.

    Raises:
        ValueError: what the format needs is missing or malformed (no probs for 'probs', no
            image or palette for 'overlay', labels that are not ids 0..65535 (H, W)).
        DeeplabError: an unknown `fmt` or an `alpha` outside 0..1 (user options).
    """
    if fmt == "palette":
        return encode_labels_png(labels, palette)
    if fmt == "gray":
        return encode_labels_png(labels, None, n_classes=len(palette) if palette is not None else None)
    if fmt == "overlay":
        if palette is None:
            raise ValueError("overlay: needs a palette (one RGB colour per class)")
        return encode_rgb_png(overlay(image, labels, palette, alpha))
    if fmt == "probs":
        if probs is None:  # np.asarray(None, float32) would be array(nan)
            raise ValueError("probs format: no probabilities given (probs=...)")
        if hasattr(probs, "detach"):  # torch tensor, maybe on the GPU
            probs = probs.detach().float().cpu().numpy()
        try:
            probs = np.asarray(probs, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"probs format: expected probabilities (C, H, W), got "
                             f"{type(probs).__name__}") from None
        if probs.ndim != 3:
            raise ValueError(f"probs format: expected probabilities (C, H, W), got shape {probs.shape}")
        return encode_npy(probs)
    raise DeeplabError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


def write_bytes(target: str | os.PathLike | IO[bytes], data: bytes) -> None:
    """Write `data` to a binary stream, or to a file atomically (temp name + rename).

    All of `data` reaches the stream, or an OSError says why not (BrokenPipeError when
    its reader has gone).
    """
    if hasattr(target, "write"):
        _write_all(target, data)
        return
    with atomic_open(target, "wb") as fh:
        fh.write(data)


def _write_all(stream: IO[bytes], data: bytes) -> None:
    """Write and flush all of `data`, however little the stream takes per call.

    Under `python -u` or PYTHONUNBUFFERED=1, sys.stdout.buffer is a raw FileIO: one write()
    call, which a pipe whose reader leaves (or a signal) cuts short, and whose count of
    bytes taken a caller must check. A non-blocking stream takes nothing when full (None,
    or BlockingIOError from a buffered one): wait until it can take more.
    """
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        try:
            n = stream.write(view[done:] if done else data)
        except BlockingIOError as exc:  # a buffered stream kept what it could
            done += exc.characters_written
            _wait_writable(stream)
            continue
        if n is None:
            if not isinstance(stream, io.RawIOBase):
                break  # a writer that reports no count (a plain class): it took it all
            _wait_writable(stream)  # a raw non-blocking stream took nothing
            continue
        if n <= 0:
            raise OSError(errno.EIO, "the stream took none of the data")
        done += n
    while True:
        try:
            stream.flush()
            return
        except BlockingIOError:
            _wait_writable(stream)


def _wait_writable(stream) -> None:
    """Block until a non-blocking stream's descriptor can take more bytes."""
    import select

    select.select([], [stream.fileno()], [])


def write_labels(target: str | os.PathLike | IO[bytes], labels: np.ndarray,
                 palette: Sequence[Sequence[int]] | None, fmt: str = "palette", *,
                 image: np.ndarray | None = None, probs=None, alpha: float = 0.5) -> None:
    """Encode a result (see `encode_output`) and write it atomically or to a stream."""
    write_bytes(target, encode_output(fmt, labels=labels, palette=palette, image=image,
                                      probs=probs, alpha=alpha))
