"""`deeplab crf`: refine any model's class probabilities with the fully connected CRF.

Reads an image and a float32 .npy of probabilities (C, H, W), runs `deeplab_cli.crf.dense_crf`
and writes the labels as a palette PNG (pixel values = class ids, VOC colours) or the
refined probabilities as a float32 .npy. Outputs are written atomically; `-o -` is stdout.
"""

from __future__ import annotations

import io
import sys

import click

from deeplab_cli.cli.options import crf_options, crf_params_from_options, device_option
from deeplab_cli.errors import DeeplabError, first_line
from deeplab_cli.fsutil import read_input


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
def crf(image: str, probs: str, output: str, fmt: str, device: str, **options) -> None:
    """Refine PROBS (a float32 .npy of softmax probabilities, shape (C, H, W)) for IMAGE.

    \b
    Examples:
      deeplab crf photo.jpg probs.npy -o labels.png
      deeplab crf photo.jpg probs.npy -o refined.npy --format probs --iters 5
      deeplab crf photo.jpg probs.npy -o - --bi-rgb-std 5 --device cpu > labels.png
    """
    from deeplab_cli.crf import dense_crf
    from deeplab_cli.device import resolve_device
    from deeplab_cli.image_io import encode_output, read_image, write_bytes
    from deeplab_cli.labels import palette_for

    params = crf_params_from_options(options)
    target = resolve_device(device)

    rgb = read_image(image)  # (H, W, 3) uint8, one-line errors naming the file
    prob_map = _load_probs(probs)
    if prob_map.shape[1:] != rgb.shape[:2]:
        raise DeeplabError(
            f"{probs}: probabilities are {prob_map.shape[2]}x{prob_map.shape[1]} but {image} is "
            f"{rgb.shape[1]}x{rgb.shape[0]} (expected shape (C, {rgb.shape[0]}, {rgb.shape[1]}))"
        )

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
    else:  # encode_output picks 8- or 16-bit PNGs from the class ids
        data = encode_output(fmt, labels=refined.argmax(axis=0),
                             palette=palette_for(min(len(refined), 256)))
    write_bytes(getattr(sys.stdout, "buffer", sys.stdout) if output == "-" else output, data)


def _load_probs(path: str):
    """The probability map from a .npy file, float32 (C, H, W); one-line errors."""
    import numpy as np

    data = read_input(path, expected="a .npy file")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DeeplabError(f"{path}: not a NumPy .npy array ({first_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        array.close()  # an .npz archive
        raise DeeplabError(f"{path}: an .npz archive; expected a single .npy array (C, H, W)")
    if array.ndim != 3:
        raise DeeplabError(f"{path}: expected probabilities of shape (C, H, W), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DeeplabError(f"{path}: expected float probabilities, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


