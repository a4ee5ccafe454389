"""Choosing where to run: 'auto', 'cpu', 'cuda' or 'cuda:N'."""

from __future__ import annotations

import sys

from deeplab_cli.errors import DeeplabError, short_repr

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


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec="auto", *, quiet: bool = False):
    """The torch.device to run on, from a string or a torch.device, or a one-line DeeplabError.

    Accepted: 'auto', 'cpu', 'cuda', 'cuda:N' (any case, surrounding spaces ignored; None
    means 'auto') and torch.device objects of type cpu or cuda. 'cpu:N' and
    torch.device('cpu', N) are taken as torch takes them, as the CPU: the result is
    torch.device('cpu') (torch has one CPU device; a tensor made on 'cpu:1' is on 'cpu').
    'auto' picks torch's current CUDA device (cuda:0 unless set otherwise) when torch sees
    a GPU; else the CPU, saying so on stderr once per process unless `quiet`. 'cuda' is
    cuda:0. Refused, naming the value: other backends ('mps', 'xpu': the CRF runs only on
    the CPU or CUDA), anything else, CUDA on a machine where torch sees none, and cuda:N
    past the GPUs there are. The CLI's --device, `weights.load_model` and
    `pipeline.Segmenter` all take devices through here.
    """
    import torch

    global _warned_fallback
    if isinstance(spec, torch.device):
        spec = str(spec)  # 'cpu', 'cuda', 'cuda:1', 'mps', 'meta': checked as strings
    elif spec is None:
        spec = "auto"
    elif not isinstance(spec, str):
        raise DeeplabError(f"--device {_show(spec)}: expected {DEVICE_CHOICES} or a torch.device")
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not quiet and not _warned_fallback:
            print("deeplab: no CUDA device found; running on the CPU", file=sys.stderr)
            _warned_fallback = True
        return torch.device("cpu")
    if text == "cpu" or (text.startswith("cpu:") and text[4:].isascii() and text[4:].isdigit()):
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = 0
        if text.startswith("cuda:"):
            digits = text[5:]
            index = int(digits) if digits.isascii() and digits.isdigit() else -1
            if index < 0:
                raise DeeplabError(f"--device {_show(text)}: expected cuda:N with N a number from 0")
        if not torch.cuda.is_available():
            raise DeeplabError(
                f"--device {_show(text)}: CUDA is not available ({_cuda_report()}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if index >= count:
            names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
            raise DeeplabError(f"--device {_show(text)}: no such GPU; found {count}: {names}")
        return torch.device("cuda", index)
    raise DeeplabError(f"--device {_show(text)}: expected {DEVICE_CHOICES} "
                       "(the CRF runs only on the CPU or CUDA)")


def _show(value) -> str:
    """A device value as messages name it: as typed when it is short printable text,
    else its repr cut to one short line."""
    if isinstance(value, str) and value.isprintable() and " " not in value and len(value) <= 40:
        return value
    return short_repr(value, 40)


def _cuda_report() -> str:
    import torch

    parts = [f"torch {torch.__version__} built "
             + (f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA")]
    parts.append("CuPy usable" if cupy_available() else "CuPy not usable")
    return ", ".join(parts)
