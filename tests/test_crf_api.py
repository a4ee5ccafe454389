"""The public CRF API: validation, dispatch by input type, batches, size limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_photo
from deeplab_cli.crf import CRFParams, dense_crf, dense_crf_batch
from deeplab_cli.crf.cpu import dense_crf_cpu
from deeplab_cli.errors import DeeplabError

PARAMS = CRFParams(iterations=3)


def inputs(h=23, w=31, c=4, seed=0, y=100, x=150):
    image = np.ascontiguousarray(load_photo("coffee.jpg")[y:y + h, x:x + w])
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(c, h, w)).astype(np.float32) * 2
    e = np.exp(logits - logits.max(0))
    return image, (e / e.sum(0)).astype(np.float32)


def test_numpy_in_numpy_out_equals_cpu_oracle():
    image, probs = inputs()
    out = dense_crf(image, probs, PARAMS)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == probs.shape
    np.testing.assert_array_equal(out, dense_crf_cpu(image, probs, PARAMS))
    assert np.abs(out - probs).max() > 1e-3  # it did refine


def test_torch_in_torch_out():
    image, probs = inputs()
    out = dense_crf(torch.from_numpy(image), torch.from_numpy(probs), PARAMS)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), dense_crf(image, probs, PARAMS))
    # a float64 tensor and a numpy image work too
    out64 = dense_crf(image, torch.from_numpy(probs).double(), PARAMS)
    assert isinstance(out64, torch.Tensor)
    np.testing.assert_allclose(out64.numpy(), out.numpy(), atol=1e-6)


def test_byte_order_of_numpy_inputs_does_not_matter():
    image, probs = inputs()
    swapped = probs.astype(probs.dtype.newbyteorder(">" if probs.dtype.byteorder != ">" else "<"))
    assert swapped.dtype != probs.dtype and str(swapped.dtype) != "float32"
    np.testing.assert_array_equal(dense_crf(image, swapped, PARAMS), dense_crf(image, probs, PARAMS))


def test_default_params_are_deeplab():
    image, probs = inputs(h=17, w=19)
    np.testing.assert_array_equal(dense_crf(image, probs), dense_crf_cpu(image, probs, CRFParams()))


def test_batch_equals_singles():
    pairs = [inputs(h=21, w=29, seed=1), inputs(h=13, w=40, c=4, seed=2, y=10, x=10)]
    outs = dense_crf_batch([p[0] for p in pairs], [torch.from_numpy(p[1]) for p in pairs], PARAMS)
    assert len(outs) == 2
    for (image, probs), out in zip(pairs, outs):
        np.testing.assert_array_equal(out.numpy(), dense_crf(image, probs, PARAMS))


@pytest.mark.parametrize("mutate,message", [
    (lambda im, p: (im, p[:, :-1]), "does not match"),
    (lambda im, p: (im[..., :2], p), "does not match"),
    (lambda im, p: (im, p[0]), "(C, H, W)"),
    (lambda im, p: (im.astype(np.float32), p), "uint8"),
    (lambda im, p: (im, (p * 100).astype(np.int32)), "floating point"),
    (lambda im, p: (im, p[:1] / p[:1]), "at least 2 labels"),
    (lambda im, p: (im, np.where(np.arange(p.shape[2]) == 3, np.nan, p).astype(np.float32)), "NaN"),
    (lambda im, p: (im, np.where(np.arange(p.shape[2]) == 3, np.inf, p).astype(np.float32)), "NaN"),
    (lambda im, p: (im, p - p.mean(0)), "negative"),
    (lambda im, p: (im, p * 3), "not a probability map"),
])
def test_validation_errors_are_one_line(mutate, message):
    image, probs = inputs()
    bad_image, bad_probs = mutate(image, probs)
    with pytest.raises(DeeplabError) as info:
        dense_crf(bad_image, bad_probs, PARAMS)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batch_length_mismatch_and_unknown_types():
    image, probs = inputs()
    with pytest.raises(DeeplabError, match="2 images but 1"):
        dense_crf_batch([image, image], [probs], PARAMS)
    with pytest.raises(DeeplabError, match="expected a NumPy array"):
        dense_crf(image.tolist(), probs, PARAMS)


def test_image_too_large_is_refused_by_dense_crf():
    image = np.zeros((10, 10, 3), np.uint8)
    probs = np.full((2, 10, 10), 0.5, np.float32)
    with pytest.raises(DeeplabError, match="int16"):
        dense_crf(image, probs, CRFParams(bi_rgb_std=0.001))


def test_cuda_tensors_without_cupy_get_the_cpu_crf(monkeypatch, capsys):
    # A CUDA build of torch but no usable CuPy: the CRF runs on the CPU instead of failing,
    # the result comes back as a tensor where the probabilities were, and it says so once.
    # (No GPU here: CPU tensors stand in for CUDA ones.)
    import deeplab_cli.crf as crf_module

    real_kind = crf_module._kind
    monkeypatch.setattr(crf_module, "_kind",
                        lambda a: "torch-cuda" if real_kind(a) == "torch" else real_kind(a))
    monkeypatch.setattr(crf_module, "_cupy_state", {"usable": False})

    def no_gpu(*args):
        raise AssertionError("the GPU path was taken")

    monkeypatch.setattr(crf_module, "_run_cuda", no_gpu)
    image, probs = inputs()
    for _ in range(2):
        out = dense_crf(torch.from_numpy(image), torch.from_numpy(probs), PARAMS)
        assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
        np.testing.assert_array_equal(out.numpy(), dense_crf_cpu(image, probs, PARAMS))
    assert capsys.readouterr().err.count("the CRF runs on the CPU") == 1


def _cupy_error(module: str, name: str, message: str) -> Exception:
    """An exception of a class named as CuPy names its own (CuPy is not installed here)."""
    cls = type(name, (Exception,), {"__module__": module})
    return cls(message)


@pytest.fixture
def cuda_stand_in(monkeypatch):
    """CPU tensors taken for CUDA ones, a CuPy that imports and sees a GPU, and a GPU run
    that raises `fail["error"]` (None: returns the CPU result, marked) and counts its calls."""
    import deeplab_cli.crf as crf_module

    real_kind = crf_module._kind
    monkeypatch.setattr(crf_module, "_kind",
                        lambda a: "torch-cuda" if real_kind(a) == "torch" else real_kind(a))
    monkeypatch.setattr(crf_module, "_cupy_state", {"usable": True})
    fail = {"error": None, "calls": 0}

    def run_cuda(images, probs, params):
        fail["calls"] += 1
        if fail["error"] is not None:
            raise fail["error"]
        return [torch.full_like(p, 7.0) for p in probs]  # a result the CPU CRF never gives

    monkeypatch.setattr(crf_module, "_run_cuda", run_cuda)
    return fail


@pytest.mark.parametrize("error,shown", [
    (_cupy_error("cupy.cuda.compiler", "CompileException",
                 "nvrtc: error: invalid value for --gpu-architecture (-arch)\nmore log"),
     "CompileException: nvrtc: error: invalid value for --gpu-architecture (-arch)"),
    (_cupy_error("cupy_backends.cuda.api.driver", "CUDADriverError",
                 "CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with an "
                 "unsupported toolchain."),
     "CUDADriverError: CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with "
     "an unsupported toolchain"),
    (_cupy_error("cupy_backends.cuda.api.runtime", "CUDARuntimeError",
                 "cudaErrorInsufficientDriver: CUDA driver version is insufficient"),
     "CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver version is insufficient"),
    (ImportError("libnvrtc.so.12: cannot open shared object file",
                 name="cupy_backends.cuda.libs.nvrtc"),
     "ImportError: libnvrtc.so.12: cannot open shared object file"),
], ids=["compile", "driver", "runtime", "import"])
def test_a_cupy_that_cannot_build_the_kernels_falls_back_to_the_cpu_once(cuda_stand_in, capsys,
                                                                          error, shown):
    # A CuPy for another CUDA major version imports and sees the GPU, then fails to compile
    # or launch the kernels: a traceback before, now the CPU CRF with one note per process.
    cuda_stand_in["error"] = error
    image, probs = inputs()
    for _ in range(3):
        out = dense_crf(torch.from_numpy(image), torch.from_numpy(probs), PARAMS)
        assert isinstance(out, torch.Tensor)
        np.testing.assert_array_equal(out.numpy(), dense_crf_cpu(image, probs, PARAMS))
    assert cuda_stand_in["calls"] == 1  # remembered: later calls go straight to the CPU
    assert capsys.readouterr().err == (
        f"deeplab: CuPy could not compile/launch the CRF kernels ({shown}), so the CRF runs on "
        "the CPU (a CuPy built for torch's CUDA version gives the GPU CRF)\n")


@pytest.mark.parametrize("error", [
    DeeplabError("CRF: not enough GPU memory"),
    RuntimeError("an index out of range in the dispatcher"),  # a bug: no fallback hides it
    ImportError("no module", name="numpy"),
    _cupy_error("mylib.cupy", "CompileException", "not CuPy's class"),
])
def test_other_errors_of_the_first_gpu_run_propagate(cuda_stand_in, capsys, error):
    cuda_stand_in["error"] = error
    image, probs = inputs()
    for calls in (1, 2):  # nothing remembered: the next call tries the GPU again
        with pytest.raises(type(error)):
            dense_crf(torch.from_numpy(image), torch.from_numpy(probs), PARAMS)
        assert cuda_stand_in["calls"] == calls
    assert capsys.readouterr().err == ""


def test_after_a_good_first_run_cupy_errors_propagate(cuda_stand_in, capsys):
    # Only the first load can say "this CuPy cannot build the kernels"; later a CuPy error
    # is a real failure of that run.
    image, probs = inputs()
    out = dense_crf(torch.from_numpy(image), torch.from_numpy(probs), PARAMS)
    assert float(out.max()) == 7.0  # the (stand-in) GPU path ran
    cuda_stand_in["error"] = _cupy_error("cupy_backends.cuda.api.runtime", "CUDARuntimeError",
                                         "cudaErrorIllegalAddress: an illegal memory access")
    with pytest.raises(Exception, match="cudaErrorIllegalAddress"):
        dense_crf(torch.from_numpy(image), torch.from_numpy(probs), PARAMS)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("which,message", [
    ("probabilities", "CRF input: probabilities are on device meta; use cpu or cuda tensors"),
    ("image", "CRF input: image is on device meta; use a cpu or cuda tensor"),
])
def test_tensors_on_other_devices_are_refused_in_one_line(which, message):
    # torch's 'meta' device (like 'mps' or 'xpu') holds no data the CRF can read.
    image, probs = inputs(h=7, w=9, c=3)
    good = torch.from_numpy(image), torch.from_numpy(probs)
    bad = (good[0].to("meta"), good[1]) if which == "image" else (good[0], good[1].to("meta"))
    with pytest.raises(DeeplabError) as info:
        dense_crf(*bad, PARAMS)
    assert str(info.value) == message
    with pytest.raises(DeeplabError, match=f"^CRF image 1: {which} (is|are) on device meta;"):
        dense_crf_batch([good[0], bad[0]], [good[1], bad[1]], PARAMS)
