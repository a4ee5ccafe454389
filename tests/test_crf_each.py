"""One image under many CRF settings (`dense_crf_each`, a parameter search): each result is
what `dense_crf` gives for that setting, bit for bit, while each lattice is built once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emulation import build_emulated
from test_crf_cuda import DEEPLAB, README, _cupy, case_inputs
from deeplab_cli.crf import cpu, cuda, dense_crf, dense_crf_each
from deeplab_cli.crf.geometry import lattice_key
from deeplab_cli.errors import DeeplabError

# Out of geometry order on purpose; two Gaussian geometries (pos_xy_std 1 and 3) and three
# bilateral ones ((67, 3), (40, 3), (80, 13)).
SETTINGS = [
    DEEPLAB,
    README,
    DEEPLAB.replace(bi_xy_std=40),
    DEEPLAB.replace(bi_w=6),
    DEEPLAB.replace(normalization="after"),
    DEEPLAB.replace(iterations=0),
    DEEPLAB.replace(pos_w=0, iterations=3),
    README.replace(bi_w=2, iterations=4),
    DEEPLAB.replace(bi_xy_std=40, bi_w=5),
    DEEPLAB.replace(bi_w=6),  # twice: both get a result
]


@pytest.fixture(scope="module")
def inputs():
    images, probs = case_inputs([("coffee.jpg", 150, 200, 37, 53)], 5, seed=3)
    return images[0], probs[0]


def test_every_setting_gets_what_dense_crf_gives_with_each_lattice_built_once(inputs, monkeypatch):
    image, probs = inputs
    built = []
    build = cpu.build_lattice

    def counting(features, **kw):
        built.append(features.shape[1])
        return build(features, **kw)

    monkeypatch.setattr(cpu, "build_lattice", counting)
    monkeypatch.setattr(cpu, "_warm", True)  # no warm-up run (its tiny lattices) in the count
    results = list(dense_crf_each(image, probs, SETTINGS))
    order = [i for i, _ in results]
    assert sorted(order) == list(range(len(SETTINGS)))
    keys = [lattice_key(SETTINGS[i]) for i in order]
    assert keys == sorted(keys)  # grouped by what they build
    # pos_xy_std 1 and 3; bilateral (67, 3), (40, 3), (80, 13): nothing built twice
    assert sorted(built) == [2, 2, 5, 5, 5]
    monkeypatch.setattr(cpu, "build_lattice", build)
    outs = {}
    for i, out in results:
        alone = dense_crf(image, probs, SETTINGS[i])
        assert out.dtype == np.float32 and np.array_equal(out, alone), SETTINGS[i]
        outs[i] = out
    # the settings really differ: a shared lattice with a stale weight would show here
    assert not np.array_equal(outs[0], outs[3]) and not np.array_equal(outs[0], outs[4])
    assert np.array_equal(outs[3], outs[9])
    clipped = np.clip(probs, 1e-5, 1)
    assert np.allclose(outs[5], clipped / clipped.sum(0), rtol=0, atol=1e-7)  # no iterations: softmax(-U)


def test_torch_inputs_get_torch_results(inputs):
    image, probs = inputs
    settings = [DEEPLAB.replace(iterations=2), {"bi_w": 6, "iterations": 2}]
    got = dict(dense_crf_each(torch.from_numpy(image), torch.from_numpy(probs), settings))
    for i, params in enumerate(settings):
        assert isinstance(got[i], torch.Tensor) and got[i].device.type == "cpu"
        assert np.array_equal(got[i].numpy(), dense_crf(image, probs, params))


def test_bad_inputs_and_settings_are_refused_before_anything_runs(inputs, monkeypatch):
    image, probs = inputs

    def no_work(*args, **kw):
        raise AssertionError("the CRF ran")

    monkeypatch.setattr(cpu, "build_lattice", no_work)
    with pytest.raises(DeeplabError, match="beyond int16"):  # the second setting's tiny sigma
        dense_crf_each(image, probs, [DEEPLAB, DEEPLAB.replace(bi_xy_std=1e-4)])
    with pytest.raises(DeeplabError, match="logits"):
        dense_crf_each(image, np.log(probs), [DEEPLAB])
    with pytest.raises(DeeplabError, match="params must be"):
        dense_crf_each(image, probs, [DEEPLAB, 3])
    assert list(dense_crf_each(image, probs, [])) == []


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emulated"))


class Counting:
    """A backend that counts the launches of each kernel."""

    def __init__(self, backend):
        self._backend, self.counts = backend, {}

    def launch(self, name, *args, **kw):
        self.counts[name] = self.counts.get(name, 0) + 1
        self._backend.launch(name, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_emulated_settings_sharing_lattices_equal_fresh_runs(emulated, inputs):
    image, probs = inputs
    order = sorted(range(len(SETTINGS)), key=lambda i: lattice_key(SETTINGS[i]))
    settings = [SETTINGS[i] for i in order]
    backend = Counting(emulated)
    outs = list(cuda.dense_crf_cuda_each(image, probs, settings, backend))
    # one build per distinct key among the settings with iterations
    groups = {lattice_key(s) for s in settings if s.iterations}
    assert backend.counts["lattice_elevate"] == len(groups) < len(settings) - 1
    for params, out in zip(settings, outs):
        alone = cuda.CudaCRF([image], [probs], params, backend=emulated).run()[0]
        assert np.array_equal(out, alone), params


@pytest.mark.parametrize("stencil", [False, True], ids=["lattice", "stencil"])
def test_emulated_reweight_equals_a_fresh_crf(emulated, inputs, stencil):
    image, probs = inputs
    first, second = DEEPLAB.replace(iterations=3), DEEPLAB.replace(pos_w=5, bi_w=2, iterations=4)
    crf = cuda.CudaCRF([image], [probs], first, backend=emulated, gauss_stencil=stencil)
    with pytest.raises(RuntimeError, match="prepare"):
        crf.reweight(second)
    crf.prepare()
    assert (crf._stencil is not None) == stencil
    crf.iterate()
    before = crf.result()[0]
    crf.reweight(second)
    crf.iterate()
    after = crf.result()[0]
    fresh = cuda.CudaCRF([image], [probs], second, backend=emulated, gauss_stencil=stencil).run()[0]
    assert np.array_equal(after, fresh)
    assert not np.array_equal(after, before)
    with pytest.raises(ValueError, match="other lattices"):
        crf.reweight(second.replace(bi_rgb_std=5))
    with pytest.raises(ValueError, match="other lattices"):
        crf.reweight(second.replace(bi_w=0))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_gpu_each_equals_dense_crf_on_the_gpu(inputs, kind):
    # The GPU path shares a prepared CudaCRF between settings of one lattice_key (reweight):
    # each result must still be the single run's, bit for bit, and stay on the GPU.
    cp = _cupy()
    image, probs = inputs
    if kind == "torch":
        image_g, probs_g = torch.from_numpy(image).cuda(), torch.from_numpy(probs).cuda()
    else:
        image_g, probs_g = cp.asarray(image), cp.asarray(probs)
    got = dict(dense_crf_each(image_g, probs_g, SETTINGS))
    assert sorted(got) == list(range(len(SETTINGS)))
    for i, params in enumerate(SETTINGS):
        alone = dense_crf(image_g, probs_g, params)
        if kind == "torch":
            assert got[i].is_cuda and torch.equal(got[i], alone), params
        else:
            assert isinstance(got[i], cp.ndarray) and bool((got[i] == alone).all()), params
