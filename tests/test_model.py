"""The DeepLab v2 network: checkpoint layout, output stride, MSC fusion, preprocessing, and
parity with an independent functional implementation of the published layout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeplab_cli.model import (MEAN_BGR, build_model, fold_batchnorms_, inference_copy, predict_probs,
                                preprocess)

# The published layout, written down independently of deeplab_cli.model (REFERENCE §1):
# (layer index, blocks, output channels, stride of block1, dilation of the 3x3 convs).
LAYOUT = ((2, 3, 256, 1, 1), (3, 4, 512, 2, 1), (4, 23, 1024, 1, 2), (5, 3, 2048, 1, 4))
RATES = {"L": (6, 12, 18, 24), "S": (2, 4, 8, 12)}


def randomize(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every BN non-trivial statistics and affine terms, and the ASPP visible weights,
    so a wrong eps, mean, order or missing layer changes the output."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))
        elif key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=gen))
        elif key.endswith("bn.weight"):
            value.copy_(0.5 + 0.5 * torch.rand(value.shape, generator=gen))
        elif key.endswith("bn.bias"):
            value.copy_(0.1 * torch.randn(value.shape, generator=gen))
        elif key.startswith("base.aspp"):
            value.copy_(0.02 * torch.randn(value.shape, generator=gen))
    return state


@pytest.fixture(scope="module")
def model21():
    torch.manual_seed(0)
    model = build_model(21)
    randomize(model)
    return model


def test_state_dict_keys_count_and_parameters():
    model = build_model(21)
    state = model.state_dict()
    assert len(state) == 632
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 528
    assert sum(p.numel() for p in model.parameters()) == 44_048_532
    keys = list(state)
    assert keys[0] == "base.layer1.conv1.conv.weight"
    assert keys[-1] == "base.aspp.c3.bias"
    assert all(k.startswith("base.") for k in keys)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["base.layer1.conv1.conv.weight"] == (64, 3, 7, 7)
    assert shapes["base.layer2.block1.reduce.conv.weight"] == (64, 64, 1, 1)
    assert shapes["base.layer2.block1.shortcut.conv.weight"] == (256, 64, 1, 1)
    assert shapes["base.layer3.block1.reduce.conv.weight"] == (128, 256, 1, 1)
    assert shapes["base.layer4.block23.conv3x3.conv.weight"] == (256, 256, 3, 3)
    assert shapes["base.layer5.block3.increase.conv.weight"] == (2048, 512, 1, 1)
    assert shapes["base.layer5.block3.increase.bn.running_var"] == (2048,)
    assert shapes["base.aspp.c2.weight"] == (21, 2048, 3, 3)
    assert shapes["base.aspp.c2.bias"] == (21,)
    assert state["base.layer4.block2.reduce.bn.num_batches_tracked"].dtype == torch.int64
    # Only block1 of each layer projects its shortcut.
    assert not any(".block2.shortcut" in k for k in keys)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.eps == 1e-5


def test_cocostuff_parameter_count():
    with torch.device("meta"):
        model = build_model(182)
    assert sum(p.numel() for p in model.parameters()) == 55_919_384
    assert len(model.state_dict()) == 632


def test_aspp_rates():
    for aspp, rates in RATES.items():
        with torch.device("meta"):
            model = build_model(5, aspp=aspp)
        convs = [getattr(model.base.aspp, f"c{i}") for i in range(4)]
        assert [c.dilation[0] for c in convs] == list(rates)
        assert [c.padding[0] for c in convs] == list(rates)
    with pytest.raises(ValueError):
        build_model(5, aspp="M")


@pytest.mark.parametrize(("size", "out"), [((513, 513), (65, 65)), ((321, 321), (41, 41)),
                                           ((65, 49), (9, 7)), ((500, 375), (63, 48))])
def test_output_stride(size, out):
    # Shapes only: the meta device computes no numbers.
    with torch.device("meta"):
        model = build_model(21)
        x = torch.empty(1, 3, *size)
    assert tuple(model(x, msc=False).shape) == (1, 21, *out)
    assert tuple(model(x, msc=True).shape) == (1, 21, *out)


def test_msc_is_max_of_three_scales(model21):
    x = torch.randn(1, 3, 65, 49, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        full = model21.base(x)
        h, w = full.shape[2:]
        branches = [full]
        for scale in (0.75, 0.5):
            small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            branches.append(F.interpolate(model21.base(small), size=(h, w), mode="bilinear",
                                          align_corners=False))
        expected = torch.stack(branches).max(dim=0).values
        fused = model21(x, msc=True)
        single = model21(x, msc=False)
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)
    torch.testing.assert_close(single, full, rtol=0, atol=0)
    # The fusion really mixes scales: some pixels come from a downscaled branch.
    assert (fused > single).any()


def test_train_mode_keeps_bn_frozen(model21):
    x = torch.randn(2, 3, 33, 41, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model21(x, msc=False)
        model21.train()
        try:
            during = model21(x, msc=False)
        finally:
            model21.eval()
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in model21.named_parameters() if ".bn." in n)


def test_preprocess_values():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1] = (10, 20, 30)
    rgb[1, 2] = (255, 0, 128)
    x = preprocess(rgb)
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, 2, 3)
    # Channel 0 is blue, 2 is red; the mean is subtracted, nothing is divided.
    assert x[0, :, 0, 1].tolist() == pytest.approx([30 - 104.008, 20 - 116.669, 10 - 122.675], abs=1e-4)
    assert x[0, :, 1, 2].tolist() == pytest.approx([128 - 104.008, 0 - 116.669, 255 - 122.675], abs=1e-4)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-m for m in MEAN_BGR], abs=1e-4)
    torch.testing.assert_close(preprocess(rgb[::-1])[0], x[0].flip(1))  # a negative-stride view
    batch = preprocess(torch.from_numpy(np.stack([rgb, rgb[::-1].copy()])))
    assert tuple(batch.shape) == (2, 3, 2, 3)
    torch.testing.assert_close(batch[0], x[0])
    torch.testing.assert_close(batch[1], x[0].flip(1))
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4), dtype=np.uint8))


def test_preprocess_subtracts_the_mean_it_is_given():
    """The weights carry their own mean pixel (WeightsMeta.mean_bgr); preprocess used to
    subtract the published one whatever the weights said."""
    rgb = np.random.default_rng(5).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    bgr = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1).float()  # (3, H, W)
    for mean in [(0.0, 0.0, 0.0), (1.5, -2.0, 300.0), np.array([10, 20, 30]), torch.tensor([4.0, 5.0, 6.0])]:
        expected = bgr - torch.as_tensor(np.asarray(mean, dtype=np.float32)).view(3, 1, 1)
        torch.testing.assert_close(preprocess(rgb, mean_bgr=mean)[0], expected)
    torch.testing.assert_close(preprocess(rgb), preprocess(rgb, mean_bgr=MEAN_BGR))
    assert not torch.allclose(preprocess(rgb), preprocess(rgb, mean_bgr=(0, 0, 0)))


@pytest.mark.parametrize("mean", [(1, 2), (1, 2, 3, 4), (1, float("nan"), 3), (1, 2, float("inf")),
                                  "abc", (1, True, 3), None, 5])
def test_preprocess_refuses_a_mean_that_is_not_three_finite_numbers(mean):
    with pytest.raises(ValueError, match=r"^mean_bgr: expected three finite numbers") as info:
        preprocess(np.zeros((2, 2, 3), np.uint8), mean_bgr=mean)
    assert "\n" not in str(info.value)


def test_predict_probs_upsamples_and_normalises(model21):
    rgb = np.random.default_rng(3).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    x = preprocess(rgb)
    probs = predict_probs(model21, x, size=(37, 45), msc=False)
    assert tuple(probs.shape) == (1, 21, 37, 45) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 37, 45))
    with torch.no_grad():
        logits = model21(x, msc=False)
    expected = torch.softmax(F.interpolate(logits, size=(37, 45), mode="bilinear",
                                           align_corners=False), dim=1)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- independent reference


def reference_logits(state: dict[str, torch.Tensor], x: torch.Tensor, rates) -> torch.Tensor:
    """DeepLab v2 ResNet-101 in plain functional calls over a state dict, in float64."""
    sd = {k: v.double() for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def unit(h, prefix, *, stride=1, padding=0, dilation=1, relu=True):
        h = F.conv2d(h, sd[f"{prefix}.conv.weight"], stride=stride, padding=padding,
                     dilation=dilation)
        shape = (1, -1, 1, 1)
        scale = sd[f"{prefix}.bn.weight"] / torch.sqrt(sd[f"{prefix}.bn.running_var"] + 1e-5)
        h = (h - sd[f"{prefix}.bn.running_mean"].view(shape)) * scale.view(shape) \
            + sd[f"{prefix}.bn.bias"].view(shape)
        return h.clamp_min(0) if relu else h

    h = unit(x.double(), "base.layer1.conv1", stride=2, padding=3)
    h = F.max_pool2d(h, 3, stride=2, padding=1, ceil_mode=True)
    for layer, blocks, _, stride, dilation in LAYOUT:
        for b in range(1, blocks + 1):
            p = f"base.layer{layer}.block{b}"
            s = stride if b == 1 else 1
            out = unit(h, f"{p}.reduce", stride=s)
            out = unit(out, f"{p}.conv3x3", padding=dilation, dilation=dilation)
            out = unit(out, f"{p}.increase", relu=False)
            skip = unit(h, f"{p}.shortcut", stride=s, relu=False) if b == 1 else h
            h = (out + skip).clamp_min(0)
    return sum(F.conv2d(h, sd[f"base.aspp.c{i}.weight"], sd[f"base.aspp.c{i}.bias"],
                        padding=r, dilation=r) for i, r in enumerate(rates))


def reference_msc(state, x, rates):
    full = reference_logits(state, x, rates)
    outs = [full]
    for scale in (0.5, 0.75):
        small = F.interpolate(x.double(), scale_factor=scale, mode="bilinear", align_corners=False)
        outs.append(F.interpolate(reference_logits(state, small, rates), size=full.shape[2:],
                                  mode="bilinear", align_corners=False))
    return torch.stack(outs).max(0).values


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def test_parity_with_functional_reference(model21):
    rgb = np.random.default_rng(4).integers(0, 256, (65, 49, 3), dtype=np.uint8)
    x = preprocess(rgb)
    state = model21.state_dict()
    with torch.no_grad():
        ours = model21(x, msc=True)
        ref = reference_msc(state, x, RATES["L"])
    assert ours.abs().max() > 1e-3  # the comparison is not between zeros
    assert relative_error(ours, ref) < 1e-5


def test_parity_aspp_s():
    torch.manual_seed(5)
    model = build_model(3, aspp="S")
    randomize(model, seed=5)
    x = torch.randn(1, 3, 41, 57, generator=torch.Generator().manual_seed(6)) * 60
    with torch.no_grad():
        ours = model(x, msc=False)
        ref = reference_logits(model.state_dict(), x, RATES["S"])
        wrong_rates = reference_logits(model.state_dict(), x, RATES["L"])
    assert relative_error(ours, ref) < 1e-5
    assert relative_error(ours, wrong_rates) > 1e-3  # the reference can tell the rates apart


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_copy_is_the_same_function_with_bn_folded(model21, channels_last):
    """The folded copy matches the functional reference of the checkpoint layout as closely as
    the model itself, holds no batch norm, and leaves the original model untouched."""
    before = {k: v.clone() for k, v in model21.state_dict().items()}
    fused = inference_copy(model21, channels_last=channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.n_classes == 21 and not any(p.requires_grad for p in fused.parameters())
    conv = fused.base.layer4.block3.conv3x3.conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    rgb = np.random.default_rng(4).integers(0, 256, (65, 49, 3), dtype=np.uint8)
    x = preprocess(rgb)
    with torch.no_grad():
        ours = fused(x.contiguous(memory_format=torch.channels_last) if channels_last else x, msc=True)
        ref = reference_msc(before, x, RATES["L"])
    assert relative_error(ours, ref) < 1e-5
    after = model21.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model21.modules())


@pytest.mark.parametrize("channels_last", [False, True])
def test_fold_batchnorms_changes_the_model_itself_into_the_inference_copy(model21, channels_last, monkeypatch):
    """In place: no deep copy, the layers without a batch norm keep their very storage, and
    the result is exactly what inference_copy makes (same float64 folding)."""
    expected = inference_copy(model21, channels_last=channels_last)
    model = copy.deepcopy(model21)
    classifier = model.base.aspp.c0.weight.data_ptr()  # no batch norm: nothing to fold

    def no_copies(*args, **kw):
        raise AssertionError("fold_batchnorms_ copied the model")

    with monkeypatch.context() as patch:
        patch.setattr(copy, "deepcopy", no_copies)
        folded = fold_batchnorms_(model, channels_last=channels_last)
    assert folded is model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert (model.base.aspp.c0.weight.data_ptr() == classifier) != channels_last  # NHWC re-lays it out
    conv = model.base.layer4.block3.conv3x3.conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
