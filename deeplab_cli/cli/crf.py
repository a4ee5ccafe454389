"""`deeplab crf`: refine any model's class probabilities with the fully connected CRF.

Reads an image and a .npy of float probabilities (C, H, W), runs `deeplab_cli.crf.dense_crf`
and writes the labels as a palette PNG (pixel values = class ids, VOC colours) or the
refined probabilities as a float32 .npy. Outputs are written atomically; `-o -` is stdout.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import click

from deeplab_cli.cli import options as shared
from deeplab_cli.cli.options import check_output_file, crf_options, crf_params_from_options, device_option
from deeplab_cli.errors import DeeplabError, first_line
from deeplab_cli.fsutil import check_writable_folder, read_input


# What each --format writes; `-o` must carry that suffix (or none), as with `segment`.
SUFFIXES = {"palette": ".png", "probs": ".npy"}


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("probs", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, metavar="OUT",
              help="Output file (.png for palette, .npy for probs), or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["palette", "probs"]), default="palette",
              show_default=True,
              help="palette: PNG of class ids with the VOC colours; probs: float32 (C, H, W) .npy.")
@crf_options
@device_option
@click.option("--max-pixels", type=click.IntRange(min=0), default=100_000_000, show_default=True,
              help="Refuse images with more pixels than this (0 = no limit).")
def crf(image: str, probs: str, output: str, fmt: str, device: str, max_pixels: int,
        **options) -> None:
    """Refine PROBS (a .npy of softmax probabilities, shape (C, H, W), any float dtype) for
    IMAGE (as shown upright, after its EXIF orientation).

    Unset CRF flags take the DeepLab v2 defaults: --pos-w 3 --pos-xy-std 1 --bi-w 4
    --bi-xy-std 67 --bi-rgb-std 3 --iters 10 --crf-norm symmetric.

    \b
    Examples:
      deeplab crf photo.jpg probs.npy -o labels.png
      deeplab crf photo.jpg probs.npy -o refined.npy --format probs --iters 5
      deeplab crf photo.jpg probs.npy -o - --bi-rgb-std 5 --device cpu > labels.png
    """
    from deeplab_cli.crf import dense_crf
    from deeplab_cli.device import resolve_device
    from deeplab_cli.image_io import encode_output, quiet_decoders, read_image, write_bytes
    from deeplab_cli.labels import palette_for

    quiet_decoders()
    params = crf_params_from_options(options)
    _check_output(output, fmt, image, probs)
    target = resolve_device(device)

    rgb = read_image(image, max_pixels=max_pixels)  # (H, W, 3) uint8, upright; one-line errors
    prob_map = _load_probs(probs, image, rgb.shape[:2])  # (C, H, W) float32

    try:
        if target.type == "cuda":
            import torch

            refined = dense_crf(torch.from_numpy(rgb).to(target),
                                torch.from_numpy(prob_map).to(target), params)
            refined = refined.cpu().numpy()
        else:
            refined = dense_crf(rgb, prob_map, params)
    except DeeplabError as exc:
        raise DeeplabError(f"{probs}: {exc}") from None

    if fmt == "probs":
        data = encode_output(fmt, probs=refined)
    else:  # encode_output picks 8- or 16-bit PNGs from the class count (16-bit past 256)
        data = encode_output(fmt, labels=refined.argmax(axis=0), palette=palette_for(len(refined)))
    if output == "-":
        try:
            write_bytes(getattr(sys.stdout, "buffer", sys.stdout), data)
        except BrokenPipeError:
            raise  # the reader left (`| head`): click exits quietly
        except OSError as exc:
            raise DeeplabError(f"-o -: cannot write to stdout ({exc.strerror or exc})") from None
        return
    try:
        write_bytes(output, data)  # missing folders are created
    except (FileExistsError, NotADirectoryError):  # a file where a folder should be
        raise DeeplabError(f"-o {output}: cannot write (part of its folder path is a file)") from None
    except OSError as exc:
        raise DeeplabError(f"-o {output}: cannot write ({exc.strerror or exc})") from None


def _check_output(output: str, fmt: str, *inputs: str) -> None:
    """Refuse, before any work, an output that must not or cannot be written: binary data to
    a terminal, a folder, an input file (it would be lost), a suffix other than the
    format's, a folder where no file can be created (no permission, a file in its path)."""
    if output == "-":
        if shared.stdout_is_tty():
            raise DeeplabError("-o -: refusing to write binary data to a terminal; redirect stdout")
        if sys.stdout is None:  # started with stdout closed (`>&-`)
            raise DeeplabError("-o -: stdout is closed")
        return
    suffix = SUFFIXES[fmt]
    check_output_file(f"-o {output}", output, suffix)
    path = Path(output)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise DeeplabError(f"-o {output}: is the input {source}; refusing to overwrite it")
    if path.suffix and path.suffix.lower() != suffix:
        raise DeeplabError(f"-o {output}: --format {fmt} writes {suffix} files; name the output *{suffix}")
    # As evaluate's and tune-crf's outputs: known now, not after the whole CRF has run.
    check_writable_folder(path.parent, f"-o {output}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _load_probs(path: str, image: str, size: tuple[int, int]):
    """The probability map from a .npy file as float32 (C, H, W) for an image of `size`
    (H, W); one-line errors. The header is checked (shape, dtype, length) before any data
    is touched, so a file claiming a huge shape costs nothing, and nothing is unpickled."""
    import numpy as np
    from numpy.lib import format as npy

    data = read_input(path, expected="a .npy file")
    if not data:
        raise DeeplabError(f"{path}: empty file (0 bytes); expected a .npy array (C, H, W)")
    if data.startswith(b"PK\x03\x04"):  # the zip archive of np.savez
        raise DeeplabError(f"{path}: an .npz archive; expected a single .npy array (C, H, W)")
    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        # Versions 2.0 and 3.0 differ only in the header's text encoding (3.0: UTF-8, for
        # structured field names, which are refused below anyway).
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, EOFError, OSError, SyntaxError, TypeError) as exc:
        raise DeeplabError(f"{path}: not a NumPy .npy array ({first_line(exc)})") from None
    if dtype.hasobject:
        raise DeeplabError(f"{path}: holds Python objects (dtype {dtype}); not unpickled; "
                           "expected float probabilities (C, H, W)")
    if len(shape) != 3:
        raise DeeplabError(f"{path}: expected probabilities of shape (C, H, W), got {shape}")
    if not np.issubdtype(dtype, np.floating):
        raise DeeplabError(f"{path}: expected float probabilities, got dtype {dtype}")
    if tuple(shape[1:]) != tuple(size):
        raise DeeplabError(_mismatch(path, image, shape, size))
    count = int(np.prod(shape))
    available = len(data) - stream.tell()
    if available < count * dtype.itemsize:
        raise DeeplabError(f"{path}: truncated: shape {shape} {dtype} needs "
                           f"{count * dtype.itemsize} bytes of data, the file holds {available}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return np.ascontiguousarray(array, dtype=np.float32)


def _mismatch(path: str, image: str, shape: tuple[int, ...], size: tuple[int, int]) -> str:
    """The message for probabilities whose (H, W) is not the image's, with the likely cause."""
    height, width = size
    message = (f"{path}: shape {shape} does not fit {image} ({width}x{height} pixels): "
               f"expected shape (C, {height}, {width})")
    if tuple(shape[:2]) == (height, width):
        return message + "; this looks like (H, W, C): transpose it to (C, H, W)"
    if tuple(shape[1:]) == (width, height) and _exif_turned(image, size):
        return (message + f"; it fits {image} as stored, but its EXIF orientation turns it "
                "upright: give probabilities for the upright image, as `deeplab segment` does")
    return message


def _exif_turned(image: str, size: tuple[int, int]) -> bool:
    """Whether `image` is stored turned a quarter: its stored width x height is the upright
    `size` (H, W) that `read_image` gave, after its orientation tag."""
    from PIL import Image

    try:
        with Image.open(image) as im:
            return im.size == tuple(size)  # PIL's size is (width, height)
    except Exception:  # only a hint: an unreadable header just gives none
        return False
