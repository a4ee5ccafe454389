"""Labelled image sets on disk: PASCAL VOC layout, image/label folders, predictions.

A dataset is a list of `Sample`s (a name and the paths of its image, ground-truth label
PNG and, when scoring saved predictions, prediction PNG). Listing checks that every file
exists, so a bad layout fails before any network runs; reading checks sizes and label
values. Labels are class indices: palette PNGs are read as their raw indices (mode P),
never converted to RGB; 255 marks pixels to ignore. `prefetch` reads ahead on a thread
pool so a GPU run is not bound by decoding.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from deeplab_cli.errors import DeeplabError, plural
from deeplab_cli.fsutil import read_input, text_lines
from deeplab_cli.labels import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
LABEL_SUFFIXES = (".png",)

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One item of a dataset. `image` is None when only labels and predictions are scored."""

    name: str
    label: Path
    image: Path | None = None
    pred: Path | None = None


@dataclasses.dataclass
class LoadedSample:
    """A sample read from disk: RGB uint8 (H, W, 3) or None, labels (H, W) and prediction."""

    sample: Sample
    label: np.ndarray
    rgb: np.ndarray | None = None
    pred: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.sample.name


# Listing


def voc_samples(root: str | Path, split: str = "val", *, labels: str | Path | None = None,
                images: bool = True) -> list[Sample]:
    """Samples of a PASCAL VOC split: `root/ImageSets/Segmentation/<split>.txt`.

    Each line of the split file is a name (looked up as `JPEGImages/<name>.jpg` and
    `SegmentationClass/<name>.png`) or an image path and a label path relative to `root`
    (the "trainaug" lists). `labels` replaces `root/SegmentationClass` (e.g. with
    SegmentationClassAug). `split` may also be the path of a split file. With
    `images=False` the JPEGs are neither looked up nor required.
    """
    root = Path(root)
    if not root.is_dir():
        raise DeeplabError(f"--root {root}: no such directory")
    split_file = split_path(root, split)
    if not split_file.is_file():
        raise DeeplabError(f"{split_file}: split file not found (--split {split})")
    label_dir = Path(labels) if labels is not None else root / "SegmentationClass"
    if not label_dir.is_dir():
        raise DeeplabError(f"{label_dir}: label directory not found")
    samples = []
    first_line_of: dict[str, int] = {}
    for lineno, line in enumerate(_read_split(split_file), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            image = root / "JPEGImages" / f"{fields[0]}.jpg"
            label = label_dir / f"{fields[0]}.png"
            # The name becomes an output file name (--save-pred, the probability cache),
            # so a line like '../x' must not carry its folders along.
            name = Path(fields[0]).name
        elif len(fields) == 2:
            image, label = (root / f.lstrip("/") for f in fields)
            name = Path(fields[0]).stem
            if labels is not None:
                label = label_dir / label.name
        else:
            raise DeeplabError(f"{split_file}:{lineno}: expected a name or 'image label' paths")
        # A name listed twice would count its pixels twice, and its saved prediction
        # (and cache entry) would be written twice under one name.
        if name in first_line_of:
            raise DeeplabError(f"{split_file}:{lineno}: {name} is listed twice "
                               f"(also on line {first_line_of[name]})")
        first_line_of[name] = lineno
        samples.append(Sample(name, label, image if images else None))
    if not samples:
        raise DeeplabError(f"{split_file}: the split file lists no images")
    _check_exist(samples)
    return samples


def split_path(root: str | Path, split: str) -> Path:
    """The split file `voc_samples` reads: `split` itself when it names a .txt file, else
    `root/ImageSets/Segmentation/<split>.txt`."""
    if split.endswith(".txt") and Path(split).is_file():
        return Path(split)
    return Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"


def _read_split(path: Path) -> list[str]:
    """The lines of a split file (`fsutil.text_lines`: UTF-8, a byte-order mark dropped,
    any line ends, blank lines kept for the line numbers); one-line errors for unreadable
    or binary files."""
    data = read_input(path, expected="a split file")
    return text_lines(data, label=str(path), expected="one name per line")


def paired_samples(images: str | Path, labels: str | Path) -> list[Sample]:
    """Pair every image in `images` with the label PNG of the same stem in `labels`."""
    image_map = _by_stem(images, IMAGE_SUFFIXES, "--images")
    label_map = _by_stem(labels, LABEL_SUFFIXES, "--labels")
    missing = [image_map[s] for s in image_map if s not in label_map]
    if missing:
        raise DeeplabError(
            f"{labels}: no label PNG for {missing[0].name}"
            + (f" and {plural(len(missing) - 1, 'more image')}" if len(missing) > 1 else "")
        )
    return [Sample(stem, label_map[stem], image_map[stem]) for stem in sorted(image_map)]


def label_samples(labels: str | Path) -> list[Sample]:
    """Every label PNG in a folder, without images (for scoring saved predictions)."""
    label_map = _by_stem(labels, LABEL_SUFFIXES, "--labels")
    return [Sample(stem, label_map[stem]) for stem in sorted(label_map)]


def with_predictions(samples: Iterable[Sample], pred_dir: str | Path) -> list[Sample]:
    """Attach the prediction PNG of the same stem in `pred_dir` to each sample."""
    pred_map = _by_stem(pred_dir, LABEL_SUFFIXES, "--pred")
    samples = list(samples)
    missing = [s.name for s in samples if s.name not in pred_map]
    if missing:
        # A JPEG of the same name is the likely cause: its compression changes the indices.
        others = sorted(p.name for p in Path(pred_dir).glob(f"{glob_escape(missing[0])}.*")
                        if p.suffix.lower() not in LABEL_SUFFIXES)
        raise DeeplabError(
            f"{pred_dir}: no prediction {missing[0]}.png"
            + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + (f"; {others[0]} is not a PNG: predictions must be lossless PNGs of class indices"
               if others else "")
        )
    return [dataclasses.replace(s, pred=pred_map[s.name]) for s in samples]


def _by_stem(folder: str | Path, suffixes: tuple[str, ...], option: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DeeplabError(f"{option} {folder}: no such directory")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in found:
            raise DeeplabError(f"{folder}: two files named {path.stem}: {found[path.stem].name} and {path.name}")
        found[path.stem] = path
    if not found:
        raise DeeplabError(f"{option} {folder}: no {'/'.join(suffixes)} files")
    return found


def _check_exist(samples: list[Sample]) -> None:
    for attr in ("image", "label"):
        missing = [getattr(s, attr) for s in samples
                   if getattr(s, attr) is not None and not getattr(s, attr).is_file()]
        if missing:
            raise DeeplabError(
                f"{missing[0]}: {attr} not found"
                + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )


# Reading


def read_label(path: str | Path, *, n_classes: int | None = None, kind: str = "label",
               max_pixels: int | None = None) -> np.ndarray:
    """Class indices (H, W) from a palette or grayscale PNG; palette colours are ignored.

    With `n_classes`, values outside 0 .. n_classes - 1 other than 255 raise DeeplabError
    naming the file. `max_pixels` (None or 0 = no cap) is checked from the header, before
    decoding. `kind` ("label" or "prediction") words the messages.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if max_pixels and width * height > max_pixels:
                raise DeeplabError(
                    f"{path}: {kind} is {width}x{height}, {width * height / 1e6:.1f} megapixels, "
                    f"more than the limit of {max_pixels / 1e6:g} (--max-pixels)"
                )
            mode = im.mode
            if mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
                # np.asarray of a mode P image gives the palette indices, not colours.
                labels = np.asarray(im)
            else:
                raise DeeplabError(
                    f"{path}: {kind} PNG has mode {mode}; expected class indices "
                    f"(a palette or grayscale PNG), not colours" + _colour_hint(im)
                )
    except DeeplabError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise DeeplabError(f"{path}: cannot read {kind} ({exc})") from None
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif labels.dtype.kind == "i" or labels.dtype.itemsize > 2:
        if labels.size and (labels.min() < 0 or labels.max() > 65535):
            raise DeeplabError(f"{path}: {kind} values outside 0..65535")
        labels = labels.astype(np.uint16)
    if n_classes is not None:
        bad = labels >= n_classes
        if kind == "label":
            bad &= labels != IGNORE_INDEX
        if bad.any():
            values = np.unique(labels[bad])
            shown = ", ".join(str(int(v)) for v in values[:5]) + (" ..." if values.size > 5 else "")
            ignore = f", {IGNORE_INDEX} = ignore" if kind == "label" else ""
            raise DeeplabError(
                f"{path}: {kind} values {shown} are outside the {n_classes} classes "
                f"(0..{n_classes - 1}{ignore})"
            )
    return labels


def _colour_hint(im) -> str:
    """Why a colour label was likely saved so (only a hint; '' when unsure): the VOC-style
    palette colours written as RGB (the commonest mistake), or gray saved as RGB."""
    from deeplab_cli.labels import palette_for

    if im.mode not in ("RGB", "RGBA"):
        return ""
    try:
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    except Exception:
        return ""
    colours = np.unique(rgb[:, 0].astype(np.uint32) << 16 | rgb[:, 1].astype(np.uint32) << 8 | rgb[:, 2])
    if colours.size > 256:
        return ""
    palette = {r << 16 | g << 8 | b for r, g, b in palette_for(256)}
    if all(int(c) in palette for c in colours):
        return "; its colours are the VOC palette's: map them back to indices or save a palette PNG"
    if all((int(c) >> 16) == (int(c) >> 8 & 255) == (int(c) & 255) for c in colours):
        return "; it is gray (R = G = B): save the indices as a grayscale PNG"
    return ""


def load_sample(sample: Sample, *, n_classes: int | None = None,
                max_pixels: int | None = None) -> LoadedSample:
    """Read a sample's files and check that their sizes agree (one-line DeeplabError if not)."""
    label = read_label(sample.label, n_classes=n_classes, max_pixels=max_pixels)
    rgb = pred = None
    if sample.image is not None:
        from deeplab_cli.image_io import read_image

        kwargs = {"max_pixels": max_pixels} if max_pixels is not None else {}
        rgb = read_image(sample.image, **kwargs)
        if rgb.shape[:2] != label.shape:
            raise DeeplabError(
                f"{sample.label}: label is {_wh(label.shape)} but image {sample.image.name} is {_wh(rgb.shape)}"
                + _exif_hint(sample.image, label.shape, rgb.shape[:2])
            )
    if sample.pred is not None:
        pred = read_label(sample.pred, n_classes=n_classes, kind="prediction", max_pixels=max_pixels)
        if pred.shape != label.shape:
            raise DeeplabError(
                f"{sample.pred}: prediction is {_wh(pred.shape)} but label {sample.label.name} is {_wh(label.shape)}"
            )
    return LoadedSample(sample, label, rgb, pred)


def _exif_hint(image: Path, label_shape: tuple[int, ...], upright: tuple[int, ...]) -> str:
    """The likely cause of a label/image size mismatch when the label fits the image as
    stored but its EXIF orientation turns it (images are read upright), else ''."""
    if tuple(label_shape) != tuple(upright[::-1]):
        return ""
    from PIL import Image

    try:
        with Image.open(image) as im:
            stored = im.size[::-1]  # PIL's size is (width, height)
    except Exception:  # only a hint: an unreadable header gives none
        return ""
    if tuple(stored) != tuple(label_shape):
        return ""
    return ("; the label fits the image as stored, but its EXIF orientation turns it upright "
            "(images are read upright): turn the label to match")


def _wh(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


# Read-ahead


def prefetch(func: Callable[[T], R], items: Iterable[T], *, workers: int = 2, depth: int = 8) -> Iterator[R]:
    """`map(func, items)` computed ahead on `workers` threads, at most `depth` in flight.

    Results come in input order; an exception raised by `func` surfaces when its item is
    reached. Decoding (PIL, NumPy) releases the GIL, so threads keep a GPU busy.
    """
    items = iter(items)
    if workers <= 0:
        yield from map(func, items)
        return
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="deeplab-read") as pool:
        try:
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # Stop reading ahead when the consumer stops early or an error surfaces.
            for future in pending:
                future.cancel()
