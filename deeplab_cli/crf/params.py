"""CRF parameters: the five kernel parameters, the iteration count and the normalization."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from deeplab_cli.errors import DeeplabError

Normalization = Literal["symmetric", "after"]


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Mean-field CRF settings, named as in pydensecrf / DeepLab's configs.

    Defaults are those of the DeepLab v2 ResNet-101 PyTorch configs (REFERENCE §2).
    """

    pos_w: float = 3.0  # w2, weight of the Gaussian (smoothness) kernel
    pos_xy_std: float = 1.0  # sigma_gamma, in pixels
    bi_w: float = 4.0  # w1, weight of the bilateral (appearance) kernel
    bi_xy_std: float = 67.0  # sigma_alpha, in pixels
    bi_rgb_std: float = 3.0  # sigma_beta, in 0..255 colour units
    iterations: int = 10
    normalization: Normalization = "symmetric"

    def __post_init__(self) -> None:
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DeeplabError(f"CRF parameter {name} must be a positive number, got {value}")
        for name in ("pos_w", "bi_w"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise DeeplabError(f"CRF parameter {name} must be finite, got {value}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise DeeplabError(f"CRF iterations must be a non-negative integer, got {self.iterations}")
        if self.normalization not in ("symmetric", "after"):
            raise DeeplabError(
                f"CRF normalization must be 'symmetric' or 'after', got {self.normalization!r}"
            )

    def replace(self, **changes: Any) -> "CRFParams":
        """A copy with the given fields changed; None values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def scaled(self, factor: float) -> "CRFParams":
        """The same CRF for an image resized by `factor`: spatial bandwidths scale with it."""
        return self.replace(pos_xy_std=self.pos_xy_std * factor, bi_xy_std=self.bi_xy_std * factor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "CRF parameters") -> "CRFParams":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise DeeplabError(f"{source}: unknown CRF parameter(s) {', '.join(unknown)}")
        try:
            kwargs = {k: (int(v) if k == "iterations" else v if k == "normalization" else float(v))
                      for k, v in data.items()}
        except (TypeError, ValueError) as exc:
            raise DeeplabError(f"{source}: {exc}") from None
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "CRFParams":
        """Read a preset written by `deeplab tune-crf` (a JSON object; extra keys
        'score', 'metric' and 'source' are allowed and ignored)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise DeeplabError(f"{path}: cannot read CRF preset ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise DeeplabError(f"{path}: not a JSON CRF preset ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise DeeplabError(f"{path}: a CRF preset must be a JSON object")
        params = data.get("crf", data)
        if not isinstance(params, dict):
            raise DeeplabError(f"{path}: 'crf' must be a JSON object")
        params = {k: v for k, v in params.items() if k not in ("score", "metric", "source")}
        return cls.from_dict(params, source=str(path))
