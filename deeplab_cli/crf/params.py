"""CRF parameters: the five kernel parameters, the iteration count and the normalization."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from deeplab_cli.errors import DeeplabError, one_line, short_repr

Normalization = Literal["symmetric", "after"]


# Largest |pos_w|, |bi_w|. A kernel's normalized message is below 1 with 'after' and below
# about 4·sqrt(64 N) < 1e6 with 'symmetric', so weighted energies stay far inside float32;
# near 3e38 they overflow to inf and the softmax gives NaN (pydensecrf's too).
MAX_WEIGHT = 1e30
# Most mean-field iterations a CRFParams takes. pydensecrf users run 5-10 and the mean field
# has converged long before 1000; a larger count is a typo (or 1e20) that would run for ever.
MAX_ITERATIONS = 1000
# The largest positive number float32 rounds to 0 (half its smallest subnormal, 2^-149; ties
# go to even).
FLOAT32_ZERO = 2.0**-150


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Mean-field CRF settings, named as in pydensecrf / DeepLab's configs.

    Defaults are those of the DeepLab v2 ResNet-101 PyTorch configs (REFERENCE §2).
    `iterations` is a whole number from 0 to MAX_ITERATIONS (1000); values a CRF cannot use
    raise a one-line DeeplabError.
    """

    pos_w: float = 3.0  # w2, weight of the Gaussian (smoothness) kernel
    pos_xy_std: float = 1.0  # sigma_gamma, in pixels
    bi_w: float = 4.0  # w1, weight of the bilateral (appearance) kernel
    bi_xy_std: float = 67.0  # sigma_alpha, in pixels
    bi_rgb_std: float = 3.0  # sigma_beta, in 0..255 colour units
    iterations: int = 10
    normalization: Normalization = "symmetric"

    def __post_init__(self) -> None:
        # Plain Python numbers from here on (NumPy or other real scalars welcome), so that
        # to_dict() is JSON-serializable and the kernels get the types they expect.
        for name in ("pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DeeplabError(f"CRF parameter {name} must be a number, got {short_repr(value)}")
            try:
                number = float(value)
            except OverflowError:  # an int or Fraction beyond any float (10**400)
                raise DeeplabError(f"CRF parameter {name} is too large, got {short_repr(value)}") from None
            object.__setattr__(self, name, number)
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DeeplabError(f"CRF parameter {name} must be a positive number, got {value}")
        for name in ("pos_w", "bi_w"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise DeeplabError(f"CRF parameter {name} must be finite, got {value}")
        check_float32(self)
        iterations = self.iterations
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
            raise DeeplabError(f"CRF iterations must be a non-negative integer, got {short_repr(iterations)}")
        iterations = int(iterations)
        if iterations > MAX_ITERATIONS:
            raise DeeplabError(f"CRF iterations must be at most {MAX_ITERATIONS} (5-10 is usual), "
                               f"got {short_repr(iterations)}")
        object.__setattr__(self, "iterations", iterations)
        if self.normalization not in ("symmetric", "after"):
            raise DeeplabError(
                f"CRF normalization must be 'symmetric' or 'after', got {short_repr(self.normalization)}"
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
        """CRFParams from a mapping of field names (a JSON preset, weights metadata);
        errors are one line starting with `source` (control characters escaped). Numbers
        may be JSON numbers or numeric strings; `iterations` must be a whole number."""
        source = one_line(str(source))
        if not isinstance(data, Mapping):
            raise DeeplabError(f"{source}: expected a mapping of CRF parameter names to values, "
                               f"got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Quoted as repr (cut short): a key may be any text ('a\nb', 5000 characters) or no text.
        unknown = sorted((k for k in data if k not in fields), key=lambda k: (not isinstance(k, str), str(k)))
        if unknown:
            raise DeeplabError(f"{source}: unknown CRF parameter(s) {', '.join(short_repr(k) for k in unknown)}")
        kwargs = {k: v if k == "normalization" else _number(v, k, source, whole=k == "iterations")
                  for k, v in data.items()}
        try:
            return cls(**kwargs)
        except DeeplabError as exc:
            raise DeeplabError(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "CRFParams":
        """Read a preset written by `deeplab tune-crf` (a JSON object; extra keys
        'score', 'metric' and 'source' are allowed and ignored)."""
        path = Path(path)
        name = one_line(str(path))  # a newline in a file name stays on the message's one line
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Notepad) is dropped
        except OSError as exc:
            raise DeeplabError(f"{name}: cannot read CRF preset ({one_line(str(exc.strerror or exc))})") from None
        except UnicodeDecodeError:
            raise DeeplabError(f"{name}: not a JSON CRF preset (not UTF-8 text)") from None
        except json.JSONDecodeError as exc:
            raise DeeplabError(f"{name}: not a JSON CRF preset ({exc.msg} at line {exc.lineno})") from None
        except ValueError:
            # Python refuses to read integers longer than its int_max_str_digits (4300).
            raise DeeplabError(f"{name}: not a JSON CRF preset (a number with more than "
                               f"{sys.get_int_max_str_digits()} digits)") from None
        except RecursionError:
            raise DeeplabError(f"{name}: not a JSON CRF preset (nested too deeply)") from None
        if not isinstance(data, dict):
            raise DeeplabError(f"{name}: a CRF preset must be a JSON object")
        params = data.get("crf", data)
        if not isinstance(params, dict):
            raise DeeplabError(f"{name}: 'crf' must be a JSON object")
        params = {k: v for k, v in params.items() if k not in ("score", "metric", "source")}
        return cls.from_dict(params, source=name)


def _number(value: Any, name: str, source: str, *, whole: bool) -> float | int:
    """A preset's value as a float (an int when `whole`), or a one-line error naming it.
    Booleans are refused: JSON `true` is no count or weight."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise DeeplabError(f"{source}: {name}: could not convert {short_repr(value)} to a number")
    if whole and isinstance(value, numbers.Integral):
        return int(value)
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
        raise DeeplabError(f"{source}: {name}: could not convert {short_repr(value)} to a number") from None
    if not whole:
        return number
    if not (math.isfinite(number) and number.is_integer()):
        raise DeeplabError(f"{source}: {name} must be a whole number, got {short_repr(value)}")
    return int(number)


def check_float32(params: Any) -> None:
    """Refuse, in one line, what float32 arithmetic cannot carry: a σ that rounds to 0 (the
    lattice divides by σ: x / 0) and a weight beyond ±MAX_WEIGHT (the energies would
    overflow to inf, the result to NaN). `params`: a CRFParams or any object with its fields."""
    for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
        value = getattr(params, name)
        if value <= FLOAT32_ZERO:
            raise DeeplabError(f"CRF parameter {name} {value!r} rounds to 0 in float32; "
                               "use a larger standard deviation")
    for name in ("pos_w", "bi_w"):
        value = getattr(params, name)
        if abs(value) > MAX_WEIGHT:
            raise DeeplabError(f"CRF parameter {name} {value!r} is too large: weights beyond "
                               f"±{MAX_WEIGHT:g} overflow the float32 energies")
