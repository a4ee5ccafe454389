"""Segmentation scores from a confusion matrix: pixel accuracy, mean accuracy, IoU.

Definitions follow the DeepLab PyTorch port (REFERENCE §1): one confusion matrix over all
pixels whose ground-truth label is not 255 (rows: ground truth, columns: prediction);
per-class ratios that are 0/0 are NaN and left out of the means (NumPy's nanmean), so
mean accuracy averages over the classes present in the ground truth and mean IoU over
the classes present in the ground truth or the prediction; the frequency-weighted IoU
weighs each class by its share of ground-truth pixels.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from deeplab_cli.errors import DeeplabError, plural
from deeplab_cli.labels import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates an (n_classes, n_classes) confusion matrix over many label maps.

    Args:
        n_classes: number of classes; valid labels are 0 .. n_classes - 1.
        ignore_index: ground-truth value that marks pixels to skip (VOC's 255).
        strict: when True (default) a ground-truth or predicted value outside the class
            set (other than `ignore_index` in the ground truth) raises DeeplabError naming
            the file; when False such ground-truth pixels are skipped, as the port does.
    """

    def __init__(self, n_classes: int, *, ignore_index: int = IGNORE_INDEX, strict: bool = True):
        if n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes = int(n_classes)
        self.ignore_index = ignore_index
        self.strict = strict
        self.matrix = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        self.images = 0

    def update(self, truth, pred, *, name: str | None = None) -> "ConfusionMatrix":
        """Add one image: `truth` and `pred` are integer label maps of the same shape.

        Accepts NumPy arrays or torch tensors (moved to the CPU). `name` (a file name)
        only appears in error messages.
        """
        truth = _as_numpy(truth)
        pred = _as_numpy(pred)
        where = name or "labels"
        if truth.shape != pred.shape:
            raise DeeplabError(
                f"{where}: prediction is {_size(pred.shape)} but the ground truth is {_size(truth.shape)}"
            )
        truth = truth.reshape(-1)
        pred = pred.reshape(-1)
        n = self.n_classes
        valid = truth != self.ignore_index
        out_of_set = valid & ((truth < 0) | (truth >= n))
        if out_of_set.any():
            if self.strict:
                raise DeeplabError(
                    f"{where}: label values {_values(truth[out_of_set])} are outside the "
                    f"{plural(n, 'class')} (0..{n - 1}, {self.ignore_index} = ignore)"
                )
            valid &= ~out_of_set
        truth = truth[valid].astype(np.intp)
        pred = pred[valid].astype(np.intp)
        bad_pred = (pred < 0) | (pred >= n)
        if bad_pred.any():
            raise DeeplabError(
                f"{where}: predicted values {_values(pred[bad_pred])} are outside the "
                f"{plural(n, 'class')} (0..{n - 1})"
            )
        # One bincount over the flattened (truth, pred) pair index builds the matrix.
        self.matrix += np.bincount(truth * n + pred, minlength=n * n).reshape(n, n)
        self.images += 1
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """A new accumulator holding the counts of both (e.g. from two workers)."""
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {self.n_classes}-class and {other.n_classes}-class matrices")
        merged = ConfusionMatrix(self.n_classes, ignore_index=self.ignore_index, strict=self.strict)
        merged.matrix = self.matrix + other.matrix
        merged.images = self.images + other.images
        return merged

    __add__ = merge

    # Scores. Each is a float in [0, 1] (NaN when no pixel was counted).

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def gt_pixels(self) -> np.ndarray:
        """Ground-truth pixels per class, shape (n_classes,)."""
        return self.matrix.sum(axis=1)

    def pred_pixels(self) -> np.ndarray:
        """Predicted pixels per class (among non-ignored ones), shape (n_classes,)."""
        return self.matrix.sum(axis=0)

    def class_accuracy(self) -> np.ndarray:
        """Recall per class; NaN for classes absent from the ground truth."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.matrix) / self.gt_pixels()

    def class_iou(self) -> np.ndarray:
        """IoU per class; NaN for classes neither in the ground truth nor predicted."""
        tp = np.diag(self.matrix)
        union = self.gt_pixels() + self.pred_pixels() - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return tp / union

    def pixel_accuracy(self) -> float:
        total = self.total
        return float(np.trace(self.matrix) / total) if total else math.nan

    def mean_accuracy(self) -> float:
        return _nanmean(self.class_accuracy())

    def mean_iou(self) -> float:
        return _nanmean(self.class_iou())

    def fw_iou(self) -> float:
        total = self.total
        if not total:
            return math.nan
        freq = self.gt_pixels() / total
        present = freq > 0
        return float((freq[present] * self.class_iou()[present]).sum())

    def scores(self) -> dict[str, float]:
        """The four summary scores, keyed as in the JSON output."""
        return {
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_accuracy": self.mean_accuracy(),
            "mean_iou": self.mean_iou(),
            "fw_iou": self.fw_iou(),
        }

    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.n_classes)]
        if len(names) != self.n_classes:
            raise ValueError(f"{len(names)} class names for {self.n_classes} classes")
        return names

    def to_dict(self, class_names: Sequence[str] | None = None, *, matrix: bool = True) -> dict[str, Any]:
        """JSON-ready summary: scores, per-class rows and (optionally) the raw matrix.

        NaN becomes None (JSON null), so the output is strict JSON.
        """
        names = self._names(class_names)
        iou, acc = self.class_iou(), self.class_accuracy()
        gt, pr = self.gt_pixels(), self.pred_pixels()
        out: dict[str, Any] = {"images": self.images, "pixels": self.total, "n_classes": self.n_classes}
        out.update({k: json_float(v) for k, v in self.scores().items()})
        out["classes"] = [
            {"index": i, "name": names[i], "iou": json_float(iou[i]), "accuracy": json_float(acc[i]),
             "gt_pixels": int(gt[i]), "pred_pixels": int(pr[i])}
            for i in range(self.n_classes)
        ]
        if matrix:
            out["confusion"] = self.matrix.tolist()
        return out

    def format_table(self, class_names: Sequence[str] | None = None, *, all_classes: bool = False) -> str:
        """A plain-text table: per-class IoU and accuracy (percent), then the four scores.

        Classes absent from both ground truth and prediction are left out unless
        `all_classes` is set (COCO-Stuff has 182 ids of which many never occur).
        """
        names = self._names(class_names)
        iou, acc, gt = self.class_iou(), self.class_accuracy(), self.gt_pixels()
        width = max([len("frequency-weighted IoU")] + [len(n) for n in names])
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}  {'pixels':>11}"]
        for i, name in enumerate(names):
            if not all_classes and math.isnan(iou[i]):
                continue
            lines.append(f"{name:<{width}}  {percent(iou[i]):>6}  {percent(acc[i]):>6}  {int(gt[i]):>11}")
        lines.append("")
        for label, value in (("pixel accuracy", self.pixel_accuracy()),
                             ("mean accuracy", self.mean_accuracy()),
                             ("mean IoU", self.mean_iou()),
                             ("frequency-weighted IoU", self.fw_iou())):
            lines.append(f"{label:<{width}}  {percent(value):>6}")
        lines.append(f"{'images':<{width}}  {self.images:>6}")
        return "\n".join(lines)


def _as_numpy(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor, possibly on the GPU
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise TypeError(f"label maps must be integer arrays, got {labels.dtype}")
    return labels


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def json_float(value: float) -> float | None:
    """A score for JSON: NaN becomes None (null)."""
    value = float(value)
    return None if math.isnan(value) else value


def percent(value: float) -> str:
    """A score as a percentage with two decimals, '-' for NaN (tables)."""
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in reversed(shape)) if len(shape) == 2 else str(shape)


def _values(values: np.ndarray, limit: int = 5) -> str:
    unique = np.unique(values)
    shown = ", ".join(str(int(v)) for v in unique[:limit])
    return shown + (f" (and {unique.size - limit} more)" if unique.size > limit else "")
