"""Fully connected CRF (mean field on the permutohedral lattice), on the CPU and on CUDA.

`dense_crf(image, probs, params)` refines one image's class probabilities; `dense_crf_batch`
does several; `dense_crf_each` runs one image under many settings (a parameter search),
building each lattice once. Inputs may be NumPy arrays, torch tensors (CPU or CUDA) or CuPy
arrays; the result has the type and device of `probs`. CPU data runs `deeplab_cli.crf.cpu`,
CUDA data the CuPy kernels of `deeplab_cli.crf.cuda` (shared with torch zero-copy through
DLPack, on torch's current stream). Both compute pydensecrf's mean field (REFERENCE §2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError, first_line, one_line

__all__ = ["CRFParams", "dense_crf", "dense_crf_batch", "dense_crf_each", "check_size"]

# How far the probabilities may sum away from 1 over the labels (float16 softmax included).
SUM_TOLERANCE = 1e-2


def check_size(height: int, width: int, n_labels: int | None = None, params: CRFParams | None = None) -> None:
    """Raise DeeplabError when the lattice cannot index an image of this size (int16 lattice
    coordinates, int32 corner counts; see `deeplab_cli.crf.geometry.check_size`), on any device.
    `n_labels` is accepted for callers sizing a batch; label rows use 64-bit offsets, so it
    sets no limit."""
    from deeplab_cli.crf.geometry import check_size as check

    check(height, width, params)


def dense_crf(image: Any, probs: Any, params: CRFParams | Mapping[str, Any] | None = CRFParams()) -> Any:
    """Refine class probabilities with the fully connected CRF.

    Args:
        image: RGB uint8 (H, W, 3): NumPy, torch (any device) or CuPy.
        probs: float probabilities (C, H, W) summing to 1 over C (e.g. a softmax), C >= 2.
        params: kernel parameters, iterations and normalization: a CRFParams, or a dict
            of its fields (`CRFParams.from_dict`; missing fields take the defaults);
            None means CRFParams().

    Returns:
        float32 (C, H, W) marginals, of the same type and on the same device as `probs`.

    Raises:
        DeeplabError: bad shapes, dtypes or values, or an image the lattice cannot index.
    """
    return dense_crf_batch([image], [probs], params)[0]


def dense_crf_batch(images: Iterable[Any], probs_list: Iterable[Any],
                    params: CRFParams | Mapping[str, Any] | None = CRFParams()) -> list[Any]:
    """`dense_crf` over several images (sizes may differ). CUDA inputs that share a label
    count, a device and an array type run together as one batch on the GPU."""
    params = _params(params)
    images, probs_list = list(images), list(probs_list)  # generators welcome; indexed below
    if len(images) != len(probs_list):
        raise DeeplabError(f"CRF: {len(images)} images but {len(probs_list)} probability maps")
    results: list[Any] = [None] * len(images)
    gpu_groups: dict[tuple, list[int]] = {}  # (array type, device, labels) -> indices
    for i, (image, probs) in enumerate(zip(images, probs_list)):
        where = f"image {i}" if len(images) > 1 else "input"
        _validate(image, probs, where, params)
        kind = _kind(probs)
        if kind in ("torch-cuda", "cupy"):
            gpu_groups.setdefault((kind, str(probs.device), probs.shape[0]), []).append(i)
        else:
            results[i] = _run_cpu(image, probs, params)
    for (kind, _, _), group in gpu_groups.items():
        outs = None
        if kind == "torch-cuda" and not _cupy_usable():
            # A CUDA build of torch without a working CuPy (the `cuda` extra not installed):
            # the CRF runs on the CPU rather than failing, and the result goes back to the GPU.
            _note_cpu_fallback()
        elif kind == "torch-cuda" and "kernels" not in _cupy_state:
            outs = _first_cuda_run([images[i] for i in group], [probs_list[i] for i in group], params)
        else:
            outs = _run_cuda([images[i] for i in group], [probs_list[i] for i in group], params)
        if outs is None:  # the CPU CRF; the result goes back where the probabilities were
            outs = [_run_cpu(images[i], probs_list[i], params) for i in group]
        for i, out in zip(group, outs):
            results[i] = out
    return results


def dense_crf_each(image: Any, probs: Any,
                   settings: Iterable[CRFParams | Mapping[str, Any] | None]) -> Iterator[tuple[int, Any]]:
    """`dense_crf` of one image under each of several settings (a parameter search), sharing
    the work the settings have in common.

    Yields (i, refined) for every i, where refined equals `dense_crf(image, probs,
    settings[i])` bit for bit; the order groups the settings by the lattices they need
    (`geometry.lattice_key`), so each is built once and only one setting's result is held
    at a time. On the CPU the Gaussian lattice serves every setting with its pos_xy_std and
    the bilateral one every setting with its bi_xy_std and bi_rgb_std; on the GPU settings
    share both lattices and their norms when the stds, the normalization and the kernels
    in use agree. Either way a setting that differs from the one before only in its weights
    or iteration count costs its iterations alone.

    Raises:
        DeeplabError: bad inputs (as `dense_crf`) or a setting the lattice cannot take,
            before anything runs (here, not at the first result).
    """
    from deeplab_cli.crf.geometry import lattice_key

    settings = [_params(s) for s in settings]
    if not settings:
        return iter(())
    _validate(image, probs, "input", settings[0])
    n_labels, height, width = (int(s) for s in probs.shape)
    for params in settings[1:]:
        check_size(height, width, n_labels, params)
    order = sorted(range(len(settings)), key=lambda i: lattice_key(settings[i]))
    return _each(image, probs, settings, order)


def _each(image: Any, probs: Any, settings: list[CRFParams], order: list[int]) -> Iterator[tuple[int, Any]]:
    kind = _kind(probs)
    gpu = kind in ("torch-cuda", "cupy")
    if kind == "torch-cuda" and not _cupy_usable():
        _note_cpu_fallback()
        gpu = False
    elif kind == "torch-cuda" and "kernels" not in _cupy_state:
        # The process's first GPU run decides between the kernels and the CPU (_first_cuda_run).
        outs = _first_cuda_run([image], [probs], settings[order[0]])
        if outs is not None:
            yield order[0], outs[0]
            order = order[1:]
        gpu = outs is not None
    steps = (_run_cuda_each if gpu else _run_cpu_each)(image, probs, [settings[i] for i in order])
    yield from zip(order, steps)


# Per process: "usable" (CuPy imports and sees a GPU), "noted" (the fallback was said),
# "kernels" (whether the first GPU CRF run compiled and launched the kernels).
_cupy_state: dict[str, bool] = {}

# The errors of a CuPy that imports but cannot build or run the kernels here (a wheel for
# another CUDA major version, a missing NVRTC), as (module, class name): matched by name,
# since CuPy need not be importable where this module is.
CUPY_SETUP_ERRORS = {
    ("cupy.cuda.compiler", "CompileException"),
    ("cupy_backends.cuda.api.driver", "CUDADriverError"),
    ("cupy_backends.cuda.api.runtime", "CUDARuntimeError"),
    ("cupy_backends.cuda.libs.nvrtc", "NVRTCError"),
}


def _cupy_usable() -> bool:
    """Whether CuPy imports and sees a GPU; asked once per process."""
    if "usable" not in _cupy_state:
        from deeplab_cli.device import cupy_available

        _cupy_state["usable"] = cupy_available()
    return _cupy_state["usable"]


def _note_cpu_fallback() -> None:
    """Say once per process on stderr that CUDA tensors get the CPU CRF."""
    if not _cupy_state.get("noted"):
        import sys

        print("deeplab: CuPy is not installed or sees no GPU, so the CRF runs on the CPU "
              "(pip install 'deeplab-cli[cuda]' for the GPU CRF)", file=sys.stderr)
        _cupy_state["noted"] = True


def _first_cuda_run(images: list[Any], probs: list[Any], params: CRFParams) -> list[Any] | None:
    """The process's first GPU CRF run for torch inputs: its results, or None when CuPy
    could not compile or launch the kernels (`_cupy_setup_error`), said once on stderr and
    remembered, so that this and every later CUDA tensor gets the CPU CRF. Any other
    exception (a DeeplabError, a bug) propagates."""
    import sys

    try:
        outs = _run_cuda(images, probs, params)
    except Exception as exc:
        if not _cupy_setup_error(exc):
            raise
        _cupy_state["kernels"] = False
        _cupy_state["usable"] = False  # later calls go straight to the CPU, without a note
        _cupy_state["noted"] = True
        print(f"deeplab: CuPy could not compile/launch the CRF kernels ({type(exc).__name__}: "
              f"{first_line(exc)}), so the CRF runs on the CPU (a CuPy built for torch's CUDA "
              "version gives the GPU CRF)", file=sys.stderr)
        return None
    _cupy_state["kernels"] = True
    return outs


def _cupy_setup_error(exc: BaseException) -> bool:
    """Whether `exc` says CuPy is unusable here rather than that a run went wrong: one of
    CUPY_SETUP_ERRORS, an ImportError of a CuPy module (a wheel whose compiled parts do
    not load), or CuPy's "CuPy failed to load <library>" RuntimeError."""
    cls = type(exc)
    if (cls.__module__, cls.__name__) in CUPY_SETUP_ERRORS:
        return True
    if isinstance(exc, ImportError):
        return (exc.name or "").split(".")[0] in ("cupy", "cupy_backends")
    return type(exc) is RuntimeError and str(exc).startswith("CuPy failed to load")


# -- validation ----------------------------------------------------------------------------

def _params(params: Any) -> CRFParams:
    """CRFParams from what `dense_crf` accepts as `params`; one-line errors."""
    if isinstance(params, CRFParams):
        return params
    if params is None:
        return CRFParams()
    if isinstance(params, Mapping):
        return CRFParams.from_dict(params)
    raise DeeplabError(
        f"CRF: params must be a CRFParams or a dict of its fields, got {type(params).__name__}")


def _kind(array: Any) -> str:
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        return "torch-cuda" if array.is_cuda else "torch"
    if module == "cupy":
        return "cupy"
    if module == "numpy":
        return "numpy"
    raise DeeplabError(f"CRF: expected a NumPy array, torch tensor or CuPy array, got {type(array).__name__}")


def _check_device(array: Any, where: str, what: str, use: str) -> str:
    """`_kind(array)`, refusing torch tensors on devices other than the CPU and CUDA ('meta',
    'mps', 'xpu', ...): the CPU CRF cannot read them (the meta device holds no data at
    all), and `_kind` would send them there."""
    kind = _kind(array)
    if kind == "torch" and array.device.type != "cpu":
        raise DeeplabError(f"CRF {where}: {what} on device {one_line(str(array.device))}; use {use}")
    return kind


def _dtype_name(array: Any) -> str:
    """'float32', 'uint8', ...: NumPy/CuPy dtype names leave out the byte order ('>f4')."""
    return getattr(array.dtype, "name", None) or str(array.dtype).replace("torch.", "")


def _validate(image: Any, probs: Any, where: str, params: CRFParams) -> None:
    """Devices, shapes, dtypes and values; one DeeplabError line naming what is wrong."""
    _check_device(image, where, "image is", "a cpu or cuda tensor")
    kind = _check_device(probs, where, "probabilities are", "cpu or cuda tensors")
    if len(probs.shape) != 3:
        raise DeeplabError(f"CRF {where}: probabilities must be (C, H, W), got shape {tuple(probs.shape)}")
    n_labels, height, width = (int(s) for s in probs.shape)
    if tuple(int(s) for s in image.shape) != (height, width, 3):
        raise DeeplabError(
            f"CRF {where}: image shape {tuple(image.shape)} does not match probabilities "
            f"{tuple(probs.shape)} (expected ({height}, {width}, 3), RGB)"
        )
    if _dtype_name(image) != "uint8":
        raise DeeplabError(f"CRF {where}: image must be uint8 RGB, got {_dtype_name(image)}")
    if not _is_float(probs, kind):
        raise DeeplabError(f"CRF {where}: probabilities must be floating point, got {_dtype_name(probs)}")
    if n_labels < 2:
        raise DeeplabError(f"CRF {where}: need at least 2 labels, got {n_labels}")
    check_size(height, width, n_labels, params)

    finite, low, worst_sum = _stats(probs, kind)
    if not finite:
        raise DeeplabError(f"CRF {where}: probabilities contain NaN or infinity")
    if low < 0:
        raise DeeplabError(f"CRF {where}: probabilities contain negative values (min {low:.3g}); "
                           "pass softmax probabilities, not logits")
    if worst_sum > SUM_TOLERANCE:
        raise DeeplabError(
            f"CRF {where}: not a probability map: values do not sum to 1 over the {n_labels} labels "
            f"(off by up to {worst_sum:.3g}); pass softmax probabilities, not logits"
        )


def _is_float(array: Any, kind: str) -> bool:
    """Real floating point: any NumPy float (long double included: it is read as float32),
    torch/CuPy float16, bfloat16, float32, float64."""
    if kind == "numpy":
        import numpy as np

        return np.issubdtype(array.dtype, np.floating)
    return _dtype_name(array) in ("float32", "float64", "float16", "bfloat16")


def _stats(probs: Any, kind: str) -> tuple[bool, float, float]:
    """(all finite, minimum, largest |sum over C - 1|), with one device sync for GPU data."""
    if kind in ("torch", "torch-cuda"):
        import torch

        p = probs.detach().float()
        stats = torch.stack([torch.isfinite(p).all().float(), p.min(),
                             (p.sum(0) - 1).abs().max()]).cpu().tolist()
        return bool(stats[0]), stats[1], stats[2]
    if kind == "cupy":
        import cupy as xp
    else:
        import numpy as xp
    p = probs.astype(xp.float32, copy=False)
    finite = bool(xp.isfinite(p).all())
    if not finite:
        return False, 0.0, 0.0
    return True, float(p.min()), float(xp.abs(p.sum(axis=0) - 1).max())


# -- dispatch ------------------------------------------------------------------------------

def _run_cpu(image: Any, probs: Any, params: CRFParams) -> Any:
    return next(_run_cpu_each(image, probs, [params]))


def _run_cpu_each(image: Any, probs: Any, settings: list[CRFParams]) -> Iterator[Any]:
    """The CPU CRF under each setting (float32 (C, H, W)), as a torch tensor on the
    probabilities' device when they are one."""
    from deeplab_cli.crf.cpu import dense_crf_cpu_each

    to_torch = _kind(probs) in ("torch", "torch-cuda")
    for out in dense_crf_cpu_each(_to_numpy(image), _to_numpy(probs), settings):
        if to_torch:
            import torch

            out = torch.from_numpy(out).to(probs.device)  # back where the probabilities were
        yield out


def _to_numpy(array: Any):
    import numpy as np

    kind = _kind(array)
    if kind in ("torch", "torch-cuda"):
        return array.detach().cpu().float().numpy() if array.dtype.is_floating_point \
            else array.detach().cpu().numpy()
    if kind == "cupy":
        return array.get()
    return np.asarray(array)


def _run_cuda(images: list[Any], probs: list[Any], params: CRFParams) -> list[Any]:
    """Hand CUDA inputs to the CuPy kernels, zero-copy and on torch's current stream."""
    try:
        import cupy
    except ImportError:
        raise DeeplabError(
            "CRF: CUDA inputs need CuPy (pip install 'deeplab-cli[cuda]'); "
            "or move the probabilities to the CPU"
        ) from None
    from deeplab_cli.crf.cuda import dense_crf_cuda_batch

    # dense_crf_batch groups the inputs: one array type, one device, one label count.
    if _kind(probs[0]) == "torch-cuda":
        import torch

        device = probs[0].device
        probs_t = [p.detach().float().contiguous() for p in probs]
        images_t = [_torch_image(im, device) for im in images]
        stream = torch.cuda.current_stream(device)
        with _on_torch_stream(cupy, device, stream):
            outs = dense_crf_cuda_batch([cupy.from_dlpack(im) for im in images_t],
                                        [cupy.from_dlpack(p) for p in probs_t], params)
            # Keep the inputs alive until the work queued on the stream is done with them.
            results = [torch.from_dlpack(o) for o in outs]
        for tensor in (*probs_t, *images_t):
            tensor.record_stream(stream)
        return results

    device = probs[0].device
    with device:
        images_c = [_cupy_image(im) for im in images]
        probs_c = [cupy.ascontiguousarray(p, dtype=cupy.float32) for p in probs]
        return dense_crf_cuda_batch(images_c, probs_c, params)


def _run_cuda_each(image: Any, probs: Any, settings: list[CRFParams]) -> Iterator[Any]:
    """`_run_cuda` for one image under each setting (`dense_crf_cuda_each`), one result at a
    time; CuPy's device, stream and allocator are set around each step, not held between."""
    import cupy

    from deeplab_cli.crf.cuda import dense_crf_cuda_each

    if _kind(probs) == "torch-cuda":
        import torch

        device = probs.device
        probs_t = probs.detach().float().contiguous()
        image_t = _torch_image(image, device)
        stream = torch.cuda.current_stream(device)
        inputs = (probs_t, image_t)  # kept alive until the work queued on the stream is done
        place, back = (lambda: _on_torch_stream(cupy, device, stream)), torch.from_dlpack

        def start():
            return dense_crf_cuda_each(cupy.from_dlpack(image_t), cupy.from_dlpack(probs_t), settings)
    else:
        inputs = ()
        place, back = (lambda: probs.device), (lambda out: out)

        def start():
            return dense_crf_cuda_each(_cupy_image(image), cupy.ascontiguousarray(probs, dtype=cupy.float32),
                                       settings)
    steps = None
    try:
        while True:
            with place():
                steps = steps or start()
                out = next(steps, None)
                result = None if out is None else back(out)
            if result is None:
                return
            yield result
    finally:
        for tensor in inputs:
            tensor.record_stream(stream)


@contextlib.contextmanager
def _on_torch_stream(cupy: Any, device: Any, stream: Any) -> Iterator[None]:
    """CuPy on torch's CUDA `device` and `stream` (torch's current one), allocating through
    torch's caching allocator, so the network and the CRF share one pool instead of each
    holding its own peak."""
    with cupy.cuda.Device(device.index), _external_stream(cupy, stream.cuda_stream, device.index), \
            cupy.cuda.using_allocator(_torch_allocator(cupy).malloc):
        yield


def _external_stream(cupy: Any, pointer: int, device_index: int) -> Any:
    """A CuPy stream object for a CUDA stream CuPy does not own (torch's current stream):
    `Stream.from_external` (CuPy 14+, which takes an object speaking the CUDA stream
    protocol) where this CuPy has it, else the older, deprecated `ExternalStream`."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(pointer, device_index)
    return from_external(_StreamHandle(pointer))


def _torch_allocator(cupy: Any) -> Any:
    """A CuPy allocator that takes memory from torch's caching allocator, on torch's
    current stream of the device CuPy asks for."""
    import torch

    def malloc(size: int, device_id: int) -> int:
        return torch.cuda.caching_allocator_alloc(size, device_id, torch.cuda.current_stream(device_id))

    def free(pointer: int, device_id: int) -> None:
        torch.cuda.caching_allocator_delete(pointer)

    return cupy.cuda.memory.PythonFunctionAllocator(malloc, free)


class _StreamHandle:
    """A raw cudaStream_t exposed through the CUDA stream protocol (`__cuda_stream__`)."""

    def __init__(self, pointer: int) -> None:
        self.pointer = int(pointer)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)  # (protocol version, handle)


def _torch_image(image: Any, device):
    import torch

    kind = _kind(image)
    if kind == "cupy":
        image = torch.from_dlpack(image)
    elif kind == "numpy":
        image = torch.from_numpy(image)
    return image.to(device=device, dtype=torch.uint8).contiguous()


def _cupy_image(image: Any):
    import cupy

    kind = _kind(image)
    if kind in ("torch", "torch-cuda"):
        image = image.detach().contiguous()
        image = cupy.from_dlpack(image) if kind == "torch-cuda" else cupy.asarray(image.numpy())
    return cupy.ascontiguousarray(cupy.asarray(image), dtype=cupy.uint8)
