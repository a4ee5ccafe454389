"""DeepLab v2 ResNet-101 with ASPP (output stride 8), its multi-scale wrapper and preprocessing.

The module tree reproduces the layout of the public PyTorch checkpoints exactly, so their
state dicts load with `strict=True` (REFERENCE §1): `base.layer1.conv1.conv.weight` ...
`base.aspp.c3.bias`. Batch norm is frozen: the network only ever runs on the running
statistics stored in the weights.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ImageNet mean pixel in BGR order, on the 0..255 scale (Caffe's convention).
MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)

ASPP_RATES: dict[str, tuple[int, ...]] = {"L": (6, 12, 18, 24), "S": (2, 4, 8, 12)}

# (blocks, output channels, stride of the first block, dilation) of layer2..layer5.
RESNET101_LAYERS: tuple[tuple[int, int, int, int], ...] = (
    (3, 256, 1, 1),
    (4, 512, 2, 1),
    (23, 1024, 1, 2),
    (3, 2048, 1, 4),
)
BN_EPS = 1e-5


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its stored statistics, even under `.train()`.

    It keeps BatchNorm2d's parameter and buffer names, so checkpoints load unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=BN_EPS)
        for param in self.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        return super().train(False)


class ConvBnRelu(nn.Module):
    """A bias-free convolution followed by frozen BN and, optionally, ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1,
        padding: int = 0, dilation: int = 1, relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding,
                              dilation=dilation, bias=False)
        self.bn = FrozenBatchNorm2d(out_ch)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, dilated 3x3, 1x1 increase, plus a shortcut.

    As in the Caffe ResNet, the stride sits on the 1x1 `reduce` (and the projection
    shortcut), not on the 3x3.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, dilation: int,
                 projection: bool) -> None:
        super().__init__()
        mid = out_ch // 4
        self.reduce = ConvBnRelu(in_ch, mid, 1, stride=stride)
        self.conv3x3 = ConvBnRelu(mid, mid, 3, padding=dilation, dilation=dilation)
        self.increase = ConvBnRelu(mid, out_ch, 1, relu=False)
        self.shortcut = (ConvBnRelu(in_ch, out_ch, 1, stride=stride, relu=False)
                         if projection else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(out + self.shortcut(x))


class ResLayer(nn.Sequential):
    """`n_blocks` bottlenecks named block1..blockN; block1 projects and carries the stride."""

    def __init__(self, n_blocks: int, in_ch: int, out_ch: int, *, stride: int,
                 dilation: int) -> None:
        super().__init__()
        for i in range(n_blocks):
            self.add_module(f"block{i + 1}", Bottleneck(
                in_ch if i == 0 else out_ch, out_ch,
                stride=stride if i == 0 else 1, dilation=dilation, projection=i == 0,
            ))


class Stem(nn.Sequential):
    """7x7/2 convolution and a 3x3/2 max pool that rounds up (Caffe's pooling arithmetic)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBnRelu(3, 64, 7, stride=2, padding=3)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab v2: parallel dilated 3x3 classifiers, summed."""

    def __init__(self, in_ch: int, n_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.rates = tuple(rates)
        for i, rate in enumerate(self.rates):
            conv = nn.Conv2d(in_ch, n_classes, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [getattr(self, f"c{i}") for i in range(len(self.rates))]
        out = branches[0](x)
        for conv in branches[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Sequential):
    """The single-scale network: stem, four residual layers, ASPP -> logits at stride 8."""

    def __init__(self, n_classes: int, *, rates: Sequence[int]) -> None:
        super().__init__()
        self.layer1 = Stem()
        in_ch = 64
        for i, (blocks, out_ch, stride, dilation) in enumerate(RESNET101_LAYERS):
            self.add_module(f"layer{i + 2}", ResLayer(blocks, in_ch, out_ch, stride=stride,
                                                      dilation=dilation))
            in_ch = out_ch
        self.aspp = ASPP(in_ch, n_classes, rates)


class MSC(nn.Module):
    """Multi-scale inputs: the base network on the image and on downscaled copies,
    fused by an element-wise max of the logits at the full-scale logits' size."""

    def __init__(self, base: DeepLabV2, *, scales: Sequence[float] = (0.5, 0.75)) -> None:
        super().__init__()
        self.base = base
        self.scales = tuple(float(s) for s in scales)

    @property
    def n_classes(self) -> int:
        return self.base.aspp.c0.out_channels

    def forward(self, x: torch.Tensor, *, msc: bool = True) -> torch.Tensor:
        """Logits (N, C, h, w) for a preprocessed batch x (N, 3, H, W); h, w ≈ H/8, W/8."""
        logits = self.base(x)  # (N, C, h, w)
        if not msc or not self.scales:
            return logits
        size = logits.shape[2:]
        fused = logits
        for scale in self.scales:
            if any(int(side * scale) < 1 for side in x.shape[2:]):
                # A side shorter than 1 / scale pixels would vanish; that copy gets 1 pixel.
                small = F.interpolate(x, size=tuple(max(1, int(side * scale)) for side in x.shape[2:]),
                                      mode="bilinear", align_corners=False)
            else:
                # scale_factor (not a size) so the sampling grid matches the published models.
                small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            scaled = F.interpolate(self.base(small), size=size, mode="bilinear",
                                   align_corners=False)
            fused = torch.maximum(fused, scaled)
        return fused


def build_model(n_classes: int, *, aspp: str = "L",
                scales: Sequence[float] = (0.5, 0.75)) -> MSC:
    """DeepLab v2 ResNet-101 for `n_classes`, in eval mode, with randomly initialised weights.

    Args:
        n_classes: output channels of the ASPP classifiers (21 for VOC, 182 for COCO-Stuff).
        aspp: "L" (rates 6, 12, 18, 24) or "S" (2, 4, 8, 12).
        scales: extra input scales used by `MSC.forward(..., msc=True)`.
    """
    if aspp not in ASPP_RATES:
        raise ValueError(f"aspp must be one of {', '.join(ASPP_RATES)}, got {aspp!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    model = MSC(DeepLabV2(n_classes, rates=ASPP_RATES[aspp]), scales=scales)
    return model.eval()


@torch.no_grad()
def fold_batchnorms_(model: MSC, *, channels_last: bool = False) -> MSC:
    """Turn `model` itself into its inference form and return it: the same function up to
    float rounding (about 1e-6 relative on the logits), each frozen batch norm folded into
    the convolution before it (weight * g, bias b - m * g with g = gamma / sqrt(var + eps),
    worked out in float64), gradients off, and with `channels_last` the weights stored NHWC
    (`benchmarks/network.py` times both layouts). Its state dict no longer matches the
    checkpoints'. Only one layer's weights exist twice at any moment, so this is the way to
    prepare a model nobody else holds; `inference_copy` leaves the original alone."""
    model.eval().requires_grad_(False)
    for unit in model.modules():
        if not isinstance(unit, ConvBnRelu) or not isinstance(unit.bn, nn.BatchNorm2d):
            continue
        conv, bn = unit.conv, unit.bn
        gain = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, bias=True,
                           device=conv.weight.device, dtype=conv.weight.dtype).requires_grad_(False)
        folded.weight.copy_(conv.weight.double() * gain.view(-1, 1, 1, 1))
        folded.bias.copy_(bn.bias.double() - bn.running_mean.double() * gain)
        unit.conv, unit.bn = folded, nn.Identity()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def inference_copy(model: MSC, *, channels_last: bool = False) -> MSC:
    """A copy of `model` in inference form (see `fold_batchnorms_`); `model` is left as it was."""
    return fold_batchnorms_(copy.deepcopy(model), channels_last=channels_last)


def preprocess(rgb, *, mean_bgr: Sequence[float] = MEAN_BGR) -> torch.Tensor:
    """RGB uint8 (H, W, 3) or (N, H, W, 3), NumPy or torch on any device, to the network's
    input: float32 (N, 3, H, W), BGR, 0..255 minus `mean_bgr`, on the input's device.

    `mean_bgr` is the mean pixel (B, G, R) the weights were trained with (`WeightsMeta.mean_bgr`);
    the default is the published models' ImageNet mean. Raises ValueError for a wrong shape
    or a mean that is not three finite numbers.
    """
    mean_bgr = checked_mean_bgr(mean_bgr)
    if isinstance(rgb, np.ndarray):
        rgb = np.ascontiguousarray(rgb)  # torch refuses negative strides (e.g. a flipped view)
    x = torch.as_tensor(rgb)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or batch (N, H, W, 3), got {tuple(x.shape)}")
    x = x.flip(-1).permute(0, 3, 1, 2).float()  # (N, 3, H, W) BGR
    mean = torch.tensor(mean_bgr, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean).contiguous()


def checked_mean_bgr(mean_bgr: Sequence[float]) -> tuple[float, float, float]:
    """`mean_bgr` as a tuple of three finite floats, or a one-line ValueError."""
    try:
        values = tuple(float(v) for v in mean_bgr if not isinstance(v, (bool, str, bytes)))
        complete = len(values) == len(mean_bgr) == 3
    except (TypeError, ValueError):
        complete = False
    if not complete or not all(np.isfinite(values)):
        raise ValueError(f"mean_bgr: expected three finite numbers (B, G, R), got {mean_bgr!r}")
    return values


@torch.no_grad()  # not inference_mode: callers may modify the result in place
def predict_probs(model: MSC, x: torch.Tensor, *, size: tuple[int, int] | None = None,
                  msc: bool = True) -> torch.Tensor:
    """Softmax class probabilities (N, C, H, W) float32 for a preprocessed batch.

    The logits are upsampled bilinearly (align_corners=False) to `size` (default: the
    input's size) before the softmax.
    """
    param = next(model.parameters())
    size = tuple(size) if size is not None else tuple(x.shape[2:])
    if x.ndim != 4 or min(x.shape[2:]) < 1 or len(size) != 2 or min(size) < 1:
        raise ValueError(f"predict_probs: expected a non-empty batch (N, 3, H, W) and a size (H, W) "
                         f"of at least 1x1, got {tuple(x.shape)} and {size}")
    logits = model(x.to(device=param.device, dtype=param.dtype), msc=msc)  # (N, C, h, w)
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1)  # (N, C, H, W)
