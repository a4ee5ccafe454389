"""Choosing where to run: 'auto', 'cpu', 'cuda' or 'cuda:N'."""

from __future__ import annotations

import sys

from deeplab_cli.errors import DeeplabError

_warned_fallback = False


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except Exception:  # ImportError, or a CuPy built for another CUDA
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_device(spec: str = "auto", *, quiet: bool = False):
    """Turn a device string into a torch.device, or raise a one-line DeeplabError.

    'auto' picks torch's current CUDA device (cuda:0 unless set otherwise) when torch sees
    a GPU; else the CPU, saying so on stderr once per process unless `quiet`.
    """
    import torch

    global _warned_fallback
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not quiet and not _warned_fallback:
            print("deeplab: no CUDA device found; running on the CPU", file=sys.stderr)
            _warned_fallback = True
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = 0
        if spec.startswith("cuda:"):
            try:
                index = int(spec[5:])
            except ValueError:
                index = -1
            if index < 0:
                raise DeeplabError(f"--device {spec}: expected cuda:N with N a number from 0")
        if not torch.cuda.is_available():
            raise DeeplabError(
                f"--device {spec}: CUDA is not available ({_cuda_report()}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if index >= count:
            names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
            raise DeeplabError(f"--device {spec}: no such GPU; found {count}: {names}")
        return torch.device("cuda", index)
    raise DeeplabError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def _cuda_report() -> str:
    import torch

    parts = [f"torch {torch.__version__} built "
             + (f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA")]
    parts.append("CuPy usable" if cupy_available() else "CuPy not usable")
    return ", ".join(parts)
