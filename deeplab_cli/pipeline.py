"""The segmentation pipeline: RGB image -> network -> probabilities -> CRF -> label map.

`Segmenter` holds a loaded model and runs, for one image or a group of same-size images:
upload the uint8 pixels to the device once; resize so the longer side is at most
`max_size` (0 = native); DeepLab v2 (multi-scale or not) under the chosen precision;
bilinear upsampling of the logits to the ORIGINAL size; softmax; the dense CRF at the
original resolution with its spatial bandwidths scaled by original / network size; argmax.
On CUDA everything stays on the GPU and only the label map comes back to the host.

Large images: the network resolution is bounded by `max_size`, and the memory the CRF
would need at full resolution is estimated first. When it does not fit (or the lattice
cannot index that many pixels), the CRF runs at the largest resolution that fits and its
result is upsampled; that is said once on stderr.

`Segmenter.segment_many` streams an iterable of sources: a pool of reader threads decodes
ahead, the network runs on same-size groups of up to `batch_size` images, and an optional
writer thread encodes/saves results, so decoding and encoding overlap the network.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import operator
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError

PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = ("contiguous", "channels_last")

# Dense CRF working memory per pixel: about 48 bytes per label (pydensecrf peaks at 3.9 GB
# for 4 MP x 21 labels, REFERENCE §2: unary, Q, messages and lattice values with up to
# ~1.2 vertices per pixel), plus the probabilities going in and out, plus per-pixel lattice
# keys, offsets and barycentric weights.
CRF_BYTES_PER_PIXEL_LABEL = 56
CRF_BYTES_PER_PIXEL = 256

_KEEP_META_CRF = object()  # from_weights: "use the weights' own CRF parameters"
_NOT_WRITTEN = object()  # segment_many: a write dropped after an earlier failure


@dataclasses.dataclass
class SegmentResult:
    """One image's segmentation.

    labels: class ids (H, W) at the original (upright) size, uint8 for <= 256 classes,
        else uint16.
    probs: class probabilities (C, H, W) float32 on the segmenter's device (after the CRF
        when there is one), or None unless asked for (`keep_probs=True`).
    timings: seconds per stage: 'network' (upload, resize, DCNN, upsampling, softmax),
        'crf', 'labels' (argmax and download); callers add 'decode' and 'encode'.
    network_size: (h, w) of the image the network saw.
    crf_size: (h, w) the CRF ran at (the original size unless memory forced less), or None.
    """

    labels: np.ndarray
    probs: Any = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    network_size: tuple[int, int] | None = None
    crf_size: tuple[int, int] | None = None


@dataclasses.dataclass
class BatchItem:
    """What `segment_many` yields per source, in input order.

    Exactly one of `result` and `error` is set. `output` is what `on_result` returned.
    """

    source: Any
    image: np.ndarray | None = None
    result: SegmentResult | None = None
    error: BaseException | None = None
    output: Any = None
    decode_s: float = 0.0


def network_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) the network sees: the image scaled so its longer side is at most `max_size`
    (aspect kept, never upscaled; 0 = native size)."""
    longer = max(height, width)
    if max_size <= 0 or longer <= max_size:
        return height, width
    scale = max_size / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def _as_rgb(rgb, where: str = "image") -> np.ndarray:
    """`rgb` as a NumPy RGB uint8 (H, W, 3) array (any strides), or a one-line ValueError
    naming `where` and what is wrong: another dtype (float, uint16, bool), a grayscale,
    RGBA or single-channel shape, or no pixels. Nothing is converted implicitly: the
    network's mean subtraction assumes 0..255 RGB."""
    rgb = np.asarray(rgb)
    _check_rgb(rgb.dtype, rgb.shape, where)
    return rgb


def _checked_image(rgb, where: str = "image"):
    """`_as_rgb` for NumPy and array-likes; a torch tensor or CuPy array (which need not be on
    the host) keeps its type and device, with the same checks of dtype and shape."""
    dtype, shape = getattr(rgb, "dtype", None), getattr(rgb, "shape", None)
    if isinstance(rgb, np.ndarray) or dtype is None or shape is None:
        return _as_rgb(rgb, where)
    _check_rgb(dtype, shape, where)
    return rgb


def _check_rgb(dtype, shape, where: str) -> None:
    """`_as_rgb`'s checks on a dtype (NumPy, CuPy or torch) and shape."""
    shape = tuple(shape)
    if str(dtype).removeprefix("torch.") != "uint8" or len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"{where}: expected RGB uint8 (H, W, 3), got {dtype} {shape}; "
                         "convert it first (e.g. PIL's Image.convert('RGB'))")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{where}: empty image ({shape[1]}x{shape[0]})")


def format_bytes(n: float) -> str:
    """A byte count for messages, in the largest unit (GB, MB, kB) that keeps it at 1 or
    more, so a small budget never reads '0.0 GB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def crf_memory_bytes(height: int, width: int, n_labels: int) -> int:
    """Estimated peak memory of the dense CRF on an image of this size (either device)."""
    return height * width * (CRF_BYTES_PER_PIXEL_LABEL * n_labels + CRF_BYTES_PER_PIXEL)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo, else free physical pages, else 8 GB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


_tf32_lock = threading.Lock()
_tf32_state: dict[str, Any] = {"users": 0, "before": None}


@contextlib.contextmanager
def _cudnn_tf32_off():
    """Turn cuDNN's TF32 switch off for the block, then restore the caller's setting.

    The switch is process-wide, so blocks that overlap (one segmenter used from several
    threads) share one reference count: it goes off when the first enters and is restored
    when the last leaves. A plain save/restore would let an early leaver turn TF32 back on
    under a thread still inside, and the last leaver restore "off" for good.
    """
    import torch

    with _tf32_lock:
        if _tf32_state["users"] == 0:
            _tf32_state["before"] = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
        _tf32_state["users"] += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_state["users"] -= 1
            if _tf32_state["users"] == 0:
                torch.backends.cudnn.allow_tf32 = _tf32_state["before"]


_OPTION_NAMES = ("msc", "max_size", "precision", "memory_budget", "memory_format")


def _checked_options(*, crf: Any = None, max_size: Any = 513, precision: Any = "fp32",
                     memory_budget: Any = None, memory_format: Any = "contiguous",
                     msc: Any = True) -> tuple[int, CRFParams | None]:
    """Check `Segmenter`'s options (one-line DeeplabErrors); returns (max_size, crf) as used."""
    if precision not in PRECISIONS:
        raise DeeplabError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    try:
        if isinstance(max_size, bool):
            raise TypeError
        size = operator.index(max_size)
    except TypeError:
        raise DeeplabError(f"--max-size {max_size!r}: expected a whole number of pixels") from None
    if size < 0:
        raise DeeplabError(f"--max-size {max_size}: expected 0 (native) or a positive size")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(
            memory_budget, (int, float)) or not memory_budget >= 1):
        raise DeeplabError(f"memory budget {memory_budget!r}: expected a positive number of bytes "
                           "or None (automatic)")
    if isinstance(crf, Mapping):
        crf = CRFParams.from_dict(crf, source="crf")
    elif crf is not None and not isinstance(crf, CRFParams):
        raise DeeplabError(f"crf: expected CRFParams, a dict of its fields or None, "
                           f"got {type(crf).__name__}")
    if memory_format not in MEMORY_FORMATS:
        raise DeeplabError(f"memory format {memory_format!r}: expected one of {', '.join(MEMORY_FORMATS)}")
    return size, crf


class Segmenter:
    """DeepLab v2 + dense CRF on one device, for single images or streams of them.

    Args:
        model: an `MSC` network (see `deeplab_cli.model`), best already on `device`.
        meta: the weights' `WeightsMeta` (class names, palette, CRF defaults, and the mean
            pixel `mean_bgr` the network's input is centred with; a meta without
            one gets the published models' `model.MEAN_BGR`).
        device: 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device of type cpu or cuda
            (`deeplab_cli.device.resolve_device`: anything else is a one-line DeeplabError).
            The segmenter's copy of `model` is moved there.
        crf: CRF parameters tuned for the network's resolution (a CRFParams or a dict of
            its fields), or None for no CRF.
        msc: fuse the 1, 0.75 and 0.5 input scales (the released models' setting).
        max_size: longest side the network sees (0 = native resolution).
        precision: 'fp32', 'bf16' or 'fp16' (autocast). On the CPU fp16 falls back to fp32.
        memory_format: the network's activation layout, 'contiguous' (NCHW, the faster on an
            idle CPU) or 'channels_last' (NHWC); `benchmarks/network.py` compares them.
        memory_budget: bytes the probabilities and CRF may use; None = 80% of the GPU's free
            memory, or 60% of the host's available memory.
        notify: where one-line notes go (default: stderr); each distinct note is said once.

    The segmenter runs a copy of `model` with its batch norms folded in; `model` itself is
    left as it was. (`from_weights` passes the internal `_owns_model=True`: the model it has
    just loaded is folded in place, as a copy would briefly double the weights' memory.)

    One segmenter may serve several threads at once, with the results one thread would get.
    Each call sizes its CRF from the memory free when it starts, so on a GPU concurrent calls
    can together need more than that; give each thread its own `memory_budget` share there.
    """

    def __init__(self, model, meta, *, device, crf: CRFParams | None = CRFParams(),
                 msc: bool = True, max_size: int = 513, precision: str = "fp32",
                 memory_budget: int | None = None, memory_format: str = "contiguous",
                 notify: Callable[[str], None] | None = None, _owns_model: bool = False) -> None:
        import torch

        from deeplab_cli.device import resolve_device
        from deeplab_cli.model import MEAN_BGR, checked_mean_bgr, fold_batchnorms_, inference_copy

        size, crf = _checked_options(crf=crf, max_size=max_size, precision=precision,
                                     memory_budget=memory_budget, memory_format=memory_format)
        self.meta = meta
        # The mean pixel the weights were trained with (their metadata), else the published one.
        mean = getattr(meta, "mean_bgr", None)
        self.mean_bgr = MEAN_BGR if mean is None else checked_mean_bgr(mean)
        # One-line errors for what cannot run here ('cuda' without a GPU, 'mps', 'cuda:x').
        self.device = resolve_device(device)
        self.memory_format = memory_format
        # The network in inference form: batch norms folded into the convolutions.
        prepare = fold_batchnorms_ if _owns_model else inference_copy
        # .to(): the copy goes where the inputs will be (a no-op when it is there already).
        self.model = prepare(model, channels_last=memory_format == "channels_last").to(self.device)
        self.crf = crf
        self.msc = msc
        self.max_size = size
        self.precision = precision
        self.memory_budget = memory_budget
        self._notify = notify or (lambda line: print(f"deeplab: {line}", file=sys.stderr))
        self._said: set = set()
        self.n_classes = int(getattr(self.model, "n_classes", 0) or len(meta.classes))
        self._autocast_dtype = None
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            if self.device.type == "cpu" and dtype is torch.float16:
                self.note("--precision fp16 is not supported on the CPU; using fp32")
            else:
                self._autocast_dtype = dtype

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None = None, *, device="auto",
                     crf: CRFParams | None = _KEEP_META_CRF, **kw) -> "Segmenter":
        """Load weights (a registry name, a file, or None for the default) onto `device`
        (as `Segmenter` takes it); the CRF defaults to the weights' own parameters, and the
        network subtracts the weights' own mean pixel. `kw` are `Segmenter`'s other keyword
        arguments; an unknown one (TypeError) or a bad value (DeeplabError) is refused before
        anything is read."""
        from deeplab_cli.device import resolve_device
        from deeplab_cli.weights import load_model

        unknown = sorted(set(kw) - set(_OPTION_NAMES) - {"notify"})
        if unknown:
            raise TypeError(f"Segmenter.from_weights() got an unexpected keyword argument "
                            f"{unknown[0]!r} (expected device, crf, notify or one of "
                            f"{', '.join(_OPTION_NAMES)})")
        _checked_options(**({} if crf is _KEEP_META_CRF else {"crf": crf}),
                         **{k: v for k, v in kw.items() if k in _OPTION_NAMES})
        dev = resolve_device(device)
        model, meta = load_model(weights, device=dev)
        if crf is _KEEP_META_CRF:
            crf = meta.crf
        return cls(model, meta, device=dev, crf=crf, **kw, _owns_model=True)

    # --- small helpers -------------------------------------------------------------------

    def note(self, line: str, *, key: Any = None) -> None:
        """Say `line` once per segmenter: later notes with the same `key` (default: the
        line itself) are dropped."""
        key = line if key is None else key
        if key not in self._said:
            self._said.add(key)
            self._notify(line)

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        return network_size(height, width, self.max_size)

    def memory_budget_bytes(self) -> int:
        """Bytes the probabilities and the CRF may take on this device (see Args)."""
        import torch

        if self.memory_budget:
            return int(self.memory_budget)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return int(0.8 * (free + cached))
        return int(0.6 * _host_available_bytes())

    def _autocast(self):
        import torch

        if self._autocast_dtype is None:
            # fp32 means fp32: cuDNN would otherwise run the convolutions in TF32 on
            # Ampere and newer GPUs, which moves logits by ~1e-3 relative.
            return _cudnn_tf32_off() if self.device.type == "cuda" else contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _upload(self, rgb: np.ndarray):
        """RGB uint8 (H, W, 3) or (N, H, W, 3), checked by `_as_rgb`, -> a uint8 tensor on
        the device (one copy)."""
        import torch

        if not rgb.flags.writeable:  # torch.from_numpy warns on read-only arrays
            rgb = rgb.copy()
        return torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device)

    def _logits(self, x):
        """uint8 (N, H, W, 3) on the device -> float32 logits (N, C, h, w) at stride 8
        of the network-size image."""
        import torch
        import torch.nn.functional as F

        from deeplab_cli.model import preprocess

        height, width = x.shape[1:3]
        with torch.no_grad():
            inp = preprocess(x, mean_bgr=self.mean_bgr)  # (N, 3, H, W) float32, BGR minus mean
            net = self.network_size(height, width)
            if net != (height, width):
                # Antialiased: plain bilinear would alias badly at 8x reductions.
                inp = F.interpolate(inp, size=net, mode="bilinear", align_corners=False,
                                    antialias=True)  # (N, 3, h', w')
            # A model loaded in half precision (load_model(dtype=...)) takes its own dtype.
            inp = inp.to(next(self.model.parameters()).dtype)
            if self.memory_format == "channels_last":
                inp = inp.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.model(inp, msc=self.msc)  # (N, C, h, w)
            return logits.float().contiguous()

    @staticmethod
    def _upsampled_softmax(logits, size: tuple[int, int]):
        """(C, h, w) logits -> (C, H, W) probabilities, bilinear (align_corners=False).

        The softmax runs in place, so the peak is one (C, H, W) buffer, not three.
        """
        import torch.nn.functional as F

        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        up -= up.amax(dim=0, keepdim=True)
        up.exp_()
        up /= up.sum(dim=0, keepdim=True)
        return up  # (C, H, W)

    def _upsampled_argmax(self, scores, size: tuple[int, int]):
        """argmax over C of `scores` (C, h, w) upsampled bilinearly to `size`, without
        holding the full (C, H, W) upsampled tensor: channels go through in chunks that
        fit the memory budget, keeping a running maximum (ties keep the lower id, as argmax)."""
        import torch
        import torch.nn.functional as F

        if tuple(scores.shape[1:]) == tuple(size):
            return scores.argmax(dim=0)
        n = scores.shape[0]
        plane = size[0] * size[1] * 4
        chunk = max(1, min(n, self.memory_budget_bytes() // (4 * plane)))
        best_val = best_idx = None
        for start in range(0, n, chunk):
            up = F.interpolate(scores[None, start:start + chunk], size=size, mode="bilinear",
                               align_corners=False)[0]  # (c, H, W)
            val, idx = up.max(dim=0)
            idx += start
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx, best_idx)
        return best_idx  # (H, W)

    def _resized_image(self, x, size: tuple[int, int]):
        """uint8 (H, W, 3) on the device resized (antialiased) to `size`, still uint8."""
        import torch.nn.functional as F

        if tuple(x.shape[:2]) == tuple(size):
            return x
        img = x.permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
        return img[0].round_().clamp_(0, 255).to(x.dtype).permute(1, 2, 0).contiguous()

    # --- CRF parameters and working resolution --------------------------------------------

    def _crf_params_at(self, size: tuple[int, int], net: tuple[int, int],
                       params: CRFParams | None = None) -> CRFParams | None:
        """CRF parameters (`params`, default the segmenter's own) for a CRF run at `size`
        when the network saw `net`: the spatial stds were tuned at the network's
        resolution, so they grow with size / net."""
        params = params or self.crf
        if params is None:
            return None
        factor = max(size) / max(net)
        return params if factor == 1 else params.scaled(factor)

    def crf_params_for(self, rgb: np.ndarray, params: CRFParams | None = None) -> CRFParams | None:
        """The CRF parameters (`params`, default the segmenter's own; None without a CRF)
        applied at `rgb`'s own resolution: spatial stds multiplied by original / network
        size when the network saw a downscaled copy, unchanged otherwise."""
        height, width = np.shape(rgb)[:2]
        return self._crf_params_at((height, width), self.network_size(height, width), params)

    def crf_size(self, height: int, width: int, n_labels: int | None = None, *,
                 budget: int | None = None) -> tuple[int, int]:
        """Resolution the CRF runs at for an image of this size: the original one unless its
        memory estimate exceeds `budget` (default: `memory_budget_bytes()`) or the lattice
        cannot index it; then the largest size (aspect kept, not below the network's) that fits.

        Raises:
            DeeplabError: not even the network's resolution fits.
        """
        from deeplab_cli.crf import check_size

        n_labels = n_labels or self.n_classes
        budget = budget or self.memory_budget_bytes()
        net = self.network_size(height, width)

        def fits(h: int, w: int) -> bool:
            if crf_memory_bytes(h, w, n_labels) > budget:
                return False
            try:
                check_size(h, w, n_labels, self._crf_params_at((h, w), net))
            except DeeplabError:
                return False
            return True

        if fits(height, width):
            return height, width
        # Never above 1: when only the lattice limit failed, memory alone would allow more.
        scale = min(1.0, math.sqrt(budget / crf_memory_bytes(height, width, n_labels)))
        while scale > 0:
            size = (max(net[0], math.floor(height * scale)), max(net[1], math.floor(width * scale)))
            if fits(*size):
                return size
            if size == net:
                break
            scale *= 0.9
        need = crf_memory_bytes(*net, n_labels)
        if need <= budget:
            # Memory was not the problem: the lattice cannot index the image; say why.
            check_size(*net, n_labels, self._crf_params_at(net, net))
        raise DeeplabError(
            f"{width}x{height}: not enough memory for the CRF even at the network's "
            f"{net[1]}x{net[0]} ({format_bytes(need)} needed, {format_bytes(budget)} available); "
            "use --no-crf or a smaller --max-size"
        )

    # --- the public steps ----------------------------------------------------------------

    def probs(self, rgb: np.ndarray):
        """Class probabilities (C, H, W) float32 on `self.device` at `rgb`'s own size:
        network, bilinear upsampling of the logits, softmax. No CRF.

        Raises:
            ValueError: `rgb` is not RGB uint8 (H, W, 3) with at least one pixel (a float,
                uint16 or bool array, grayscale, RGBA, ...); nothing is converted for you.
        """
        import torch

        x = self._upload(_as_rgb(rgb))  # (H, W, 3) uint8
        logits = self._logits(x[None])[0]  # (C, h, w)
        with torch.no_grad():
            return self._upsampled_softmax(logits, tuple(x.shape[:2]))

    def refine(self, rgb: np.ndarray, probs):
        """The CRF on probabilities (C, H, W) at `rgb`'s size, with `crf_params_for(rgb)`;
        returns (C, H, W) on the same device/type as `probs` (identity when crf is None).

        Raises:
            ValueError: `rgb` is not RGB uint8 (H, W, 3) with at least one pixel, as in
                `probs` (NumPy, or a torch tensor / CuPy array on any device).
        """
        image = _checked_image(rgb)
        if self.crf is None:
            return probs
        import torch

        from deeplab_cli import crf as crf_module

        # For CUDA tensor probabilities a NumPy image (whose .device is the string 'cpu') or a
        # tensor elsewhere goes to their GPU once here; otherwise the image is handed on as it is.
        if isinstance(probs, torch.Tensor) and probs.is_cuda:
            if isinstance(image, torch.Tensor):
                image = image.to(probs.device)
            elif isinstance(image, np.ndarray):
                image = self._upload(image).to(probs.device)  # no-op on the segmenter's GPU
        size = tuple(int(side) for side in image.shape[:2])
        return crf_module.dense_crf(image, probs, self._crf_params_at(size, self.network_size(*size)))

    def segment(self, rgb: np.ndarray, *, keep_probs: bool = False) -> SegmentResult:
        """Labels (H, W) for one RGB uint8 image (H, W, 3); probabilities too if asked.
        A bad image raises ValueError, as in `probs`."""
        return self.segment_batch([rgb], keep_probs=keep_probs)[0]

    def segment_batch(self, images: list[np.ndarray], *, keep_probs: bool = False) -> list[SegmentResult]:
        """Segment same-size images: one network call for all; on CUDA the CRF also runs
        on as many of them at once as the memory budget allows. An empty list gives [];
        a bad image (see `probs`) or images of different sizes raise ValueError."""
        import torch

        images = list(images)
        if not images:
            return []
        images = [_as_rgb(im, f"image {i}" if len(images) > 1 else "image") for i, im in enumerate(images)]
        shape = images[0].shape
        if any(im.shape != shape for im in images):
            raise ValueError("segment_batch needs images of one size; use segment_many")
        height, width = shape[:2]
        n = len(images)
        t0 = time.perf_counter()
        x = self._upload(np.stack(images) if n > 1 else images[0][None])  # (N, H, W, 3)
        logits = self._logits(x)  # (N, C, h, w)
        _sync(self.device)
        net_time = (time.perf_counter() - t0) / n
        results = [SegmentResult(labels=None, timings={"network": net_time},
                                 network_size=self.network_size(height, width)) for _ in range(n)]
        with torch.no_grad():
            if self.crf is None:
                for i in range(n):
                    self._finish_plain(logits[i], (height, width), results[i], keep_probs)
            else:
                self._finish_crf(x, logits, results, keep_probs)
        return results

    def _finish_plain(self, logits, size: tuple[int, int], result: SegmentResult,
                      keep_probs: bool) -> None:
        """No CRF: upsample, (softmax), argmax, download."""
        t0 = time.perf_counter()
        if keep_probs:
            self._check_probs_memory(size)
            result.probs = self._upsampled_softmax(logits, size)  # (C, H, W)
            labels = result.probs.argmax(dim=0)
        else:
            # Softmax keeps the order, so the labels come straight from the logits.
            labels = self._upsampled_argmax(logits, size)
        _sync(self.device)
        t1 = time.perf_counter()
        result.labels = self._download_labels(labels)
        result.timings.update(crf=0.0, labels=time.perf_counter() - t1)
        result.timings["network"] += t1 - t0

    def _finish_crf(self, x, logits, results: list[SegmentResult], keep_probs: bool) -> None:
        """Upsample + softmax at the CRF's resolution, CRF, argmax at the original size."""
        import torch.nn.functional as F

        from deeplab_cli import crf as crf_module

        height, width = x.shape[1:3]
        size = (height, width)
        n_labels = logits.shape[1]
        budget = self.memory_budget_bytes()
        crf_size = self.crf_size(height, width, n_labels, budget=budget)
        if crf_size != size:
            # Keyed without the limit, which moves with free memory: said once per size.
            self.note(f"the CRF runs at {crf_size[1]}x{crf_size[0]} for {width}x{height} "
                      f"images to fit in memory (limit {format_bytes(budget)}); "
                      "its result is upsampled", key=("crf_size", size, crf_size))
            if keep_probs:  # before the CRF runs, not after
                self._check_probs_memory(size)
        params = self._crf_params_at(crf_size, self.network_size(height, width))
        # CUDA: several images per CRF call (fewer, fuller kernel launches) while they fit.
        per_call = 1
        if self.device.type == "cuda":
            per_call = max(1, budget // crf_memory_bytes(*crf_size, n_labels))
        for start in range(0, len(results), per_call):
            idx = range(start, min(start + per_call, len(results)))
            t0 = time.perf_counter()
            probs = [self._upsampled_softmax(logits[i], crf_size) for i in idx]  # (C, h', w') each
            images = [self._resized_image(x[i], crf_size) for i in idx]
            if self.device.type != "cuda":
                images = [im.cpu().numpy() for im in images]
            _sync(self.device)
            t1 = time.perf_counter()
            refined = crf_module.dense_crf_batch(images, probs, params) if len(idx) > 1 else \
                [crf_module.dense_crf(images[0], probs[0], params)]
            _sync(self.device)
            t2 = time.perf_counter()
            for i, q in zip(idx, refined):
                t3 = time.perf_counter()
                if keep_probs and crf_size != size:
                    q = F.interpolate(q[None], size=size, mode="bilinear", align_corners=False)[0]
                labels = self._upsampled_argmax(q, size)  # a plain argmax at the original size
                results[i].labels = self._download_labels(labels)
                results[i].probs = q if keep_probs else None
                results[i].crf_size = crf_size
                results[i].timings["network"] += (t1 - t0) / len(idx)
                results[i].timings["crf"] = (t2 - t1) / len(idx)
                results[i].timings["labels"] = time.perf_counter() - t3

    def _check_probs_memory(self, size: tuple[int, int]) -> None:
        need = self.n_classes * size[0] * size[1] * 4 * 2
        budget = self.memory_budget_bytes()
        if need > budget:
            raise DeeplabError(
                f"{size[1]}x{size[0]}: {self.n_classes}-class probabilities need {format_bytes(need)}, "
                f"more than the {format_bytes(budget)} available; write labels instead of probs"
            )

    def _download_labels(self, labels) -> np.ndarray:
        """(H, W) int64 on the device -> uint8 (<= 256 classes) or uint16 NumPy on the host,
        narrowed on the device so only 1-2 bytes per pixel cross the bus."""
        import torch

        if self.n_classes <= 256:
            return labels.to(torch.uint8).cpu().numpy()
        return labels.to(torch.int16).cpu().numpy().view(np.uint16)

    # --- streams of images ---------------------------------------------------------------

    def segment_many(self, sources: Iterable[Any], *, read: Callable[[Any], np.ndarray] | None = None,
                     batch_size: int = 1, readers: int | None = None, prefetch: int | None = None,
                     keep_probs: bool = False,
                     on_result: Callable[[BatchItem], Any] | None = None,
                     pending_writes: int = 4, stop_on_error: bool = False) -> Iterator[BatchItem]:
        """Segment a stream of sources, yielding one `BatchItem` per source in input order.

        Args:
            sources: anything `read` accepts (default `image_io.read_image`: paths or bytes);
                consumed lazily, at most `prefetch` ahead.
            read: source -> RGB uint8 (H, W, 3). Runs on `readers` threads, ahead of the
                network. Its exceptions become the item's `error`; the stream goes on.
            batch_size: consecutive images of one size go through the network together,
                up to this many.
            keep_probs: keep each result's probabilities (C, H, W).
            on_result: called on a single writer thread with each successful item (to
                encode and save it); its return value becomes `item.output`, an exception
                becomes `item.error`. Items are yielded only once it has returned.
            pending_writes: how many items may wait for the writer before the network waits.
            stop_on_error: end the stream at the first item that fails (to read, segment or
                write): it is the last item yielded, and `on_result` is never called for an
                item after it, although sources after it may have been read or segmented.

        Closing the stream early (leaving a loop over it) cancels the writes that have not
        started; one already under way finishes, so `on_result` may have seen one item
        that was never yielded.
        """
        if read is None:
            from deeplab_cli.image_io import read_image as read
        if batch_size < 1:
            raise DeeplabError(f"--batch-size {batch_size}: expected a positive number")
        readers = readers or max(1, min(4, os.cpu_count() or 1))
        prefetch = prefetch or max(2 * readers, 2 * batch_size)

        def timed_read(source):
            t0 = time.perf_counter()
            image = read(source)
            return image, time.perf_counter() - t0

        source_iter = iter(sources)
        reads: collections.deque[tuple[Any, Future]] = collections.deque()
        done: collections.deque[tuple[BatchItem, Future | None]] = collections.deque()
        read_pool = ThreadPoolExecutor(readers, thread_name_prefix="deeplab-read")
        write_pool = ThreadPoolExecutor(1, thread_name_prefix="deeplab-write") if on_result else None
        # stop_on_error: the position of the first failed item, set by the main thread (read
        # and network errors) or the writer thread (write errors).
        first_error = math.inf
        first_error_lock = threading.Lock()
        handed_on = 0

        def failed(index: int) -> None:
            nonlocal first_error
            if stop_on_error:
                with first_error_lock:
                    first_error = min(first_error, index)

        def write(index: int, item: BatchItem):
            # The one writer thread takes items in order, so an item after a failed one
            # starts only once the failure is known: it is dropped, never half done.
            if index > first_error:
                return _NOT_WRITTEN
            try:
                return on_result(item)
            except Exception:
                failed(index)
                raise

        def fill() -> None:
            while len(reads) < prefetch:
                try:
                    source = next(source_iter)
                except StopIteration:
                    return
                reads.append((source, read_pool.submit(timed_read, source)))

        def finish(entry: tuple[BatchItem, Future | None]) -> BatchItem:
            item, future = entry
            if future is not None:
                try:
                    item.output = future.result()
                except Exception as exc:  # the writer's error belongs to this item only
                    item.error = exc
            return item

        def hand_on(item: BatchItem) -> None:
            nonlocal handed_on
            index, handed_on = handed_on, handed_on + 1
            if index > first_error:
                return  # stop_on_error: after the first failure nothing more goes out
            future = None
            if item.error is not None:
                failed(index)
            elif write_pool is not None:
                future = write_pool.submit(write, index, item)
            done.append((item, future))

        def last(item: BatchItem) -> bool:
            """Whether the stream ends with this item (stop_on_error and it failed)."""
            return stop_on_error and item.error is not None

        try:
            fill()
            while reads and first_error == math.inf:
                source, future = reads.popleft()
                fill()
                try:
                    image, decode_s = future.result()
                except Exception as exc:
                    hand_on(BatchItem(source, error=exc))
                else:
                    group = [BatchItem(source, image=image, decode_s=decode_s)]
                    # Group the next images while they have the same size.
                    while len(group) < batch_size and reads:
                        next_source, next_future = reads[0]
                        try:
                            next_image, next_s = next_future.result()
                        except Exception:
                            break  # its error is handled when its turn comes
                        if next_image.shape != image.shape:
                            break
                        reads.popleft()
                        fill()
                        group.append(BatchItem(next_source, image=next_image, decode_s=next_s))
                    for item in self._segment_group(group, keep_probs=keep_probs):
                        hand_on(item)
                while done and (done[0][1] is None or done[0][1].done() or len(done) > pending_writes):
                    item = finish(done.popleft())
                    yield item
                    if last(item):
                        return
            while done:
                item = finish(done.popleft())
                yield item
                if last(item):
                    return
        finally:
            read_pool.shutdown(wait=True, cancel_futures=True)
            if write_pool is not None:
                # Writes not started are dropped (their items were never yielded); the one
                # under way finishes: whole files only.
                write_pool.shutdown(wait=True, cancel_futures=True)

    def _segment_group(self, group: list[BatchItem], *, keep_probs: bool) -> list[BatchItem]:
        """Run a same-size group; if the group fails, retry its images one by one so one
        bad image (or an out-of-memory batch) does not take the others with it."""
        try:
            results = self.segment_batch([item.image for item in group], keep_probs=keep_probs)
        except Exception as exc:
            self._after_failure(exc)
            if len(group) == 1:
                group[0].error = self._explain(exc, group[0].image)
                return group
            for item in group:
                try:
                    item.result = self.segment(item.image, keep_probs=keep_probs)
                except Exception as one_exc:
                    self._after_failure(one_exc)
                    item.error = self._explain(one_exc, item.image)
                else:
                    item.result.timings["decode"] = item.decode_s
            return group
        for item, result in zip(group, results):
            result.timings["decode"] = item.decode_s
            item.result = result
        return group

    def _after_failure(self, exc: BaseException) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _explain(self, exc: BaseException, image: np.ndarray | None) -> BaseException:
        """Out-of-memory errors become one line a user can act on; others pass through."""
        import torch

        if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc):
            where = "GPU" if self.device.type == "cuda" else "host"
            size = f"{image.shape[1]}x{image.shape[0]}" if image is not None else "image"
            return DeeplabError(f"{size}: out of {where} memory; try a smaller --max-size, "
                                "--batch-size 1 or --no-crf")
        return exc
