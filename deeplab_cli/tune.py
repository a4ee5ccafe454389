"""CRF cross-validation: grid-search w1, sigma_alpha, sigma_beta on labelled images.

As in the paper (w2 and sigma_gamma fixed; w1, sigma_alpha, sigma_beta searched on 100 VOC
val images), scored by mean IoU. The network runs once per image; that image's
probabilities then go through the CRF for every setting of the grid before the next image
is read, so memory stays at one image's worth whatever the grid or the image count. An
optional on-disk cache (float16 .npy) keeps the probabilities across runs, so a second
search with another grid skips the network entirely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError, plural
from deeplab_cli.fsutil import atomic_open
from deeplab_cli.labels import IGNORE_INDEX
from deeplab_cli.metrics import ConfusionMatrix, json_float, percent

# The paper searched w1 in 3..6, sigma_alpha in 30..100 (step 10) and sigma_beta in 3..6;
# the default keeps those ranges with a coarser sigma_alpha step (64 settings, not 128).
DEFAULT_GRID = {"bi_w": "3:6:1", "bi_xy_std": "40:100:20", "bi_rgb_std": "3:6:1"}
GRID_FIELDS = ("bi_w", "bi_xy_std", "bi_rgb_std")
METRIC = "miou"
# Each setting costs one CRF run per image: 1,000 settings on the paper's 100 images are
# about 100,000 CRF runs, hours even on a GPU. Larger grids are refused, not started;
# one range may not list more values than a grid may hold (checked before listing them).
MAX_SETTINGS = 1000


def parse_values(spec: str, *, option: str = "grid") -> list[float]:
    """Values from a comma list whose items are numbers or inclusive `start:stop:step` ranges.

    "3,4,5" -> [3, 4, 5]; "50:80:10" -> [50, 60, 70, 80]; "3,50:60:10" -> [3, 50, 60].
    Duplicates are dropped, order kept. Raises DeeplabError naming `option` on bad input.
    """
    values: list[float] = []
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if ":" in item:
                parts = [float(p) for p in item.split(":")]
                if len(parts) != 3:
                    raise ValueError
                start, stop, step = parts
                if not all(math.isfinite(p) for p in parts):
                    raise DeeplabError(f"{option} {spec}: values must be finite")
                if step <= 0 or stop < start:
                    raise DeeplabError(f"{option} {spec}: range {item} needs start <= stop and step > 0")
                count = math.floor((stop - start) / step + 1e-9) + 1
                if count > MAX_SETTINGS:
                    raise DeeplabError(f"{option} {spec}: range {item} has {count} values, more than "
                                       f"a grid may hold ({MAX_SETTINGS}); use a larger step")
                # Rounding keeps 0.1-steps from drifting to 0.30000000000000004.
                values.extend(round(start + i * step, 10) for i in range(count))
            else:
                values.append(float(item))
        except ValueError:
            raise DeeplabError(f"{option} {spec}: expected numbers or start:stop:step ranges") from None
    values = list(dict.fromkeys(values))
    if not values:
        shown = spec if spec.strip() else repr(spec)  # quoted when blank: --bi-w '': no values
        raise DeeplabError(f"{option} {shown}: no values")
    if not all(math.isfinite(v) for v in values):
        raise DeeplabError(f"{option} {spec}: values must be finite")
    return values


def build_grid(base: CRFParams, *, bi_w: Sequence[float], bi_xy_std: Sequence[float],
               bi_rgb_std: Sequence[float]) -> list[CRFParams]:
    """Every combination of the three searched parameters over `base` (which fixes w2,
    sigma_gamma, the iteration count and the normalization). Invalid values (e.g. a
    non-positive std) and grids of more than `MAX_SETTINGS` settings raise DeeplabError."""
    size = len(bi_w) * len(bi_xy_std) * len(bi_rgb_std)
    if size > MAX_SETTINGS:
        raise DeeplabError(f"tune-crf: the grid has {size} settings ({len(bi_w)} x {len(bi_xy_std)} "
                           f"x {len(bi_rgb_std)} values), more than {MAX_SETTINGS}; search "
                           "fewer values (each setting is one CRF run per image)")
    return [base.replace(bi_w=w, bi_xy_std=xy, bi_rgb_std=rgb)
            for w, xy, rgb in itertools.product(bi_w, bi_xy_std, bi_rgb_std)]


@dataclasses.dataclass
class TuneItem:
    """One labelled image: RGB uint8 (H, W, 3), labels (H, W) and an optional cache key."""

    name: str
    rgb: np.ndarray
    label: np.ndarray
    key: str | None = None


class ProbsCache:
    """Network probabilities on disk as float16 .npy, one file per image.

    Files live in `directory/<fingerprint>/`, where the fingerprint names everything that
    determines the probabilities except the image (weights, scales, input size); the
    per-image key should change when the image file does (see `image_key`).
    """

    def __init__(self, directory: str | Path, fingerprint: str, *, device=None):
        self.directory = Path(directory) / fingerprint
        self.device = device
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DeeplabError(f"--cache-dir {directory}: cannot create ({exc.strerror})") from None

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def load(self, key: str, shape: tuple[int, ...] | None = None):
        """The cached probabilities (C, H, W) float32, on `device` as a torch tensor when
        one was given (else NumPy), or None when absent, unreadable or not what this cache
        writes: a float16 probability map (finite, summing to 1 over C), of `shape` when
        given. A None entry is recomputed and overwritten, so a damaged or foreign file
        never reaches the scores."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # EOFError: an empty file
            return None
        if not _is_probability_map(array, shape):
            return None
        return self._to_device(array)

    def save(self, key: str, probs) -> Any:
        """Store `probs` as float16; return them rounded to float16 and back, so a run
        that fills the cache scores exactly what a run that reads it will."""
        array = _to_numpy(probs).astype(np.float16)
        with atomic_open(self._path(key), "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        return self._to_device(array)

    def _to_device(self, array: np.ndarray):
        """float32: a torch tensor on `device`, or NumPy when there is none."""
        if self.device is None:
            return array.astype(np.float32)
        import torch

        return torch.from_numpy(array).to(self.device).float()


def _is_probability_map(array: np.ndarray, shape: tuple[int, ...] | None) -> bool:
    """Whether `array` is a float16 (C, H, W) map of probabilities, of `shape` if given."""
    if array.dtype != np.float16 or array.ndim != 3 or array.size == 0:
        return False
    if shape is not None and tuple(array.shape) != tuple(shape):
        return False
    probs = array.astype(np.float32)
    if not np.isfinite(probs).all() or probs.min() < 0:
        return False
    # float16 rounding of C terms: well under 1e-2 for the class counts in use.
    return bool(np.abs(probs.sum(axis=0) - 1).max() < 1e-2)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of the given values (their reprs)."""
    return hashlib.sha1("\x1f".join(repr(p) for p in parts).encode()).hexdigest()[:16]


def image_key(name: str, path: str | Path | None) -> str:
    """Cache key for an image file: its name plus a hash of its path, size and mtime."""
    if path is None:
        return name
    path = Path(path)
    st = path.stat()
    return f"{name}-{fingerprint(str(path.resolve()), st.st_size, st.st_mtime_ns)[:10]}"


@dataclasses.dataclass
class TuneResult:
    """Confusion matrices per grid setting, plus the network alone (no CRF) for reference."""

    grid: list[CRFParams]
    confusions: list[ConfusionMatrix]
    baseline: ConfusionMatrix

    @property
    def images(self) -> int:
        return self.baseline.images

    def scores(self) -> list[float]:
        """Mean IoU of each setting, in grid order."""
        return [c.mean_iou() for c in self.confusions]

    @property
    def best_index(self) -> int:
        """The setting with the highest mean IoU; ties go to the earliest in the grid."""
        return int(np.argmax([_sortable(s) for s in self.scores()]))

    @property
    def best(self) -> CRFParams:
        return self.grid[self.best_index]

    @property
    def best_score(self) -> float:
        return self.scores()[self.best_index]

    def preset(self, *, source: str = "") -> dict[str, Any]:
        """The best setting as a preset that `CRFParams.from_json_file` reads."""
        return {"crf": self.best.to_dict(), "score": json_float(self.best_score), "metric": METRIC,
                "no_crf_score": json_float(self.baseline.mean_iou()), "images": self.images,
                "source": source}

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The whole search: every setting with its scores, the best one, the no-CRF scores."""
        rows = []
        for params, conf in zip(self.grid, self.confusions):
            rows.append({"crf": params.to_dict(),
                         **{k: json_float(v) for k, v in conf.scores().items()}})
        return {"metric": METRIC, "images": self.images, "best": self.best_index,
                "best_crf": self.best.to_dict(), "best_score": json_float(self.best_score),
                "no_crf": self.baseline.to_dict(class_names, matrix=False),
                "best_detail": self.confusions[self.best_index].to_dict(class_names, matrix=False),
                "settings": rows}

    def format_table(self, *, top: int | None = None) -> str:
        """Settings sorted by mean IoU (best first), then the no-CRF line."""
        scores = self.scores()
        order = sorted(range(len(self.grid)), key=lambda i: (-_sortable(scores[i]), i))
        if top is not None:
            order = order[:top]
        lines = [f"{'w1':>6} {'xy_std':>7} {'rgb_std':>7}  {'mIoU':>6}  {'pixel acc':>9}"]
        for i in order:
            p, c = self.grid[i], self.confusions[i]
            lines.append(f"{p.bi_w:>6g} {p.bi_xy_std:>7g} {p.bi_rgb_std:>7g}  "
                         f"{percent(scores[i]):>6}  {percent(c.pixel_accuracy()):>9}")
        lines.append(f"{'no CRF':>22}  {percent(self.baseline.mean_iou()):>6}  "
                     f"{percent(self.baseline.pixel_accuracy()):>9}")
        return "\n".join(lines)


def tune_crf(
    items: Iterable[TuneItem],
    grid: Sequence[CRFParams],
    *,
    n_classes: int,
    probs_fn: Callable[[np.ndarray], Any],
    crf_fn: Callable[[Any, Any, CRFParams], Any] | None = None,
    params_for: Callable[[np.ndarray, CRFParams], CRFParams] | None = None,
    cache: ProbsCache | None = None,
    on_image: Callable[[TuneItem, "TuneResult"], None] | None = None,
) -> TuneResult:
    """Score every CRF setting of `grid` on `items` by mean IoU.

    Args:
        items: labelled images (an iterator is consumed once).
        grid: the CRF settings to try (e.g. from `build_grid`).
        n_classes: number of classes of the probabilities.
        probs_fn: RGB uint8 (H, W, 3) -> probabilities (C, H, W), NumPy or torch on any
            device (a `Segmenter.probs`); called once per image unless cached.
        crf_fn: (image, probs, params) -> refined probs, called once per setting; default
            `deeplab_cli.crf.dense_crf_each`, which builds each lattice once per image for
            all the settings that share it (same results as `dense_crf` one at a time).
            Probabilities stay where `probs_fn` put them (on the GPU for a CUDA run).
        params_for: (rgb, setting) -> the CRF parameters for that image (e.g. spatial stds
            scaled to the network's input size); default: the setting itself.
        cache: where to keep probabilities between runs (keys from `TuneItem.key`).
        on_image: called after each image with the partial result (progress reports).
    """
    if not grid:
        raise DeeplabError("tune-crf: the grid is empty")
    grid = list(grid)
    result = TuneResult(grid, [ConfusionMatrix(n_classes) for _ in grid], ConfusionMatrix(n_classes))
    for item in items:
        key = item.key if cache is not None else None
        probs = cache.load(key, (n_classes, *item.label.shape)) if key is not None else None
        if probs is None:
            probs = probs_fn(item.rgb)  # (C, H, W)
            if key is not None:
                probs = cache.save(key, probs)
        if tuple(probs.shape[1:]) != item.label.shape:
            raise DeeplabError(f"{item.name}: probabilities are {tuple(probs.shape)} but the label is "
                               f"{item.label.shape}")
        result.baseline.update(item.label, _argmax(probs), name=item.name)
        image = _image_for(item.rgb, probs)
        settings = [params_for(item.rgb, p) for p in grid] if params_for is not None else grid
        for i, refined in _refine_each(crf_fn, image, probs, settings):  # (C, H, W), same place as probs
            result.confusions[i].update(item.label, _argmax(refined), name=item.name)
        if on_image is not None:
            on_image(item, result)
    if result.images == 0:
        raise DeeplabError("tune-crf: no images to tune on")
    if result.baseline.total == 0:
        # Every score would be NaN: no setting is better than another.
        raise DeeplabError(f"tune-crf: nothing to score: every label pixel of the "
                           f"{plural(result.images, 'image')} is {IGNORE_INDEX} (ignore)")
    return result


def _refine_each(crf_fn, image, probs, settings: list[CRFParams]) -> Iterable[tuple[int, Any]]:
    """(i, the CRF of `probs` under settings[i]) for every setting: through `crf_fn` one at a
    time, else `dense_crf_each` (lattices shared, in its order)."""
    if crf_fn is None:
        from deeplab_cli.crf import dense_crf_each

        return dense_crf_each(image, probs, settings)
    return ((i, crf_fn(image, probs, params)) for i, params in enumerate(settings))


def write_preset(path: str | Path, result: TuneResult, *, source: str = "") -> None:
    """Write the best setting as a JSON preset (atomically)."""
    write_json(path, result.preset(source=source))


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a JSON report atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def _argmax(probs) -> np.ndarray:
    """Labels (H, W) from probabilities (C, H, W) of any array kind, on the CPU."""
    if hasattr(probs, "detach"):  # torch: reduce on the device, move only the labels
        import torch

        dtype = torch.uint8 if probs.shape[0] <= 256 else torch.int32
        return probs.argmax(0).to(dtype).cpu().numpy()
    if hasattr(probs, "get") and not isinstance(probs, np.ndarray):  # CuPy
        return probs.argmax(0).get()
    return np.asarray(probs).argmax(0)


def _image_for(rgb: np.ndarray, probs):
    """The image where the CRF will want it: on the GPU once per image for CUDA probs, so
    the grid does not copy it again for every setting."""
    if hasattr(probs, "detach") and probs.is_cuda:
        import torch

        return torch.from_numpy(np.ascontiguousarray(rgb)).to(probs.device)
    return rgb


def _to_numpy(probs) -> np.ndarray:
    if hasattr(probs, "detach"):
        return probs.detach().float().cpu().numpy()
    if hasattr(probs, "get") and not isinstance(probs, np.ndarray):
        return probs.get()
    return np.asarray(probs)


def _sortable(value: float) -> float:
    """NaN scores (no pixel counted) rank below every real one."""
    return -math.inf if math.isnan(value) else value


__all__ = ["DEFAULT_GRID", "ProbsCache", "TuneItem", "TuneResult", "build_grid", "fingerprint",
           "image_key", "parse_values", "tune_crf", "write_json", "write_preset"]
