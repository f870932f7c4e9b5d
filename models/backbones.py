"""Lightweight backbone blocks: MobileNetV3, ShuffleNetV2, GhostNet, EfficientNet-Lite, PP-LCNet, factorised convs.

Each block is one class plus one ``@register``. Backbone tables (channels, kernels, expansions) are written
out row by row in the YAMLs under ``models/zoo/``, so a YAML row is one block of the published architecture.
Channel arguments of blocks whose widths are fixed by the architecture (expanded widths, channel splits)
are *not* scaled by ``width_multiple`` (``width_args=()``): a YOLOv5s head on a MobileNetV3 keeps the real
MobileNetV3 and so can load its ImageNet weights.

Sub-module names follow torchvision's structure where one exists (``expand/dw/se/project`` for an inverted
residual, ``branch1/branch2`` for a shuffle unit, SE ``fc1/fc2``) so :mod:`utils.weights.pretrained` can map
torchvision keys onto ours with an explicit table.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.activations import make_activation
from models.attention import SqueezeExcite
from models.common import C3, Conv
from models.registry import KEEP_WHOLE, Example, register

__all__ = [
    "C3Ghost",
    "ConvBNHswish",
    "CrossConv",
    "DepthSepConv",
    "EfficientStem",
    "FactorizedConv",
    "GhostBottleneck",
    "GhostConv",
    "MBConv",
    "MobileNetV3Block",
    "ShuffleBlock",
    "ShuffleStem",
    "round_channels",
]


def round_channels(value: float, divisor: int = 8) -> int:
    """MobileNet channel rounding: nearest multiple of ``divisor`` (at least ``divisor``), never 10% below.

    This is the rule the MobileNetV2/V3 papers' reference models use for SE widths; using YOLOv5's
    round-up instead would change the SE sizes and break both the published counts and weight loading.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _hswish_or_relu(use_hs: bool) -> nn.Module:
    return nn.Hardswish(inplace=True) if use_hs else nn.ReLU(inplace=True)


# ---------------------------------------------------------------------------------------------- MobileNetV3
@register(width_args=(), aliases=("conv_bn_hswish", "MobileNetV3_FirstLayer"), example=[24, 3, 2])
class ConvBNHswish(Conv):
    """MobileNetV3 / PP-LCNet stem: conv + BN + h-swish, whatever the model's default activation is."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2):
        super().__init__(c1, c2, k, s, act=nn.Hardswish(inplace=True))


@register(width_args=(), aliases=("MobileNetV3_InvertedResidual", "InvertedResidual"), example=[24, 3, 48, 1, 1, 2])
class MobileNetV3Block(nn.Module):
    """MobileNetV3 bneck (Howard et al. 2019): 1x1 expand, k x k depthwise, optional SE, linear 1x1 project.

    Args follow the paper's table row: ``[c_out, kernel, c_expanded, use_se, use_hswish, stride]``. The
    expand conv is absent when ``c_expanded == c_in`` (first Small/Large block), as in the paper. The SE
    squeezes to ``round_channels(c_expanded / 4)`` and gates with a hard sigmoid.
    """

    def __init__(self, c1: int, c2: int, k: int, c_mid: int, use_se: bool, use_hs: bool, s: int):
        super().__init__()
        if s not in (1, 2):
            raise ValueError(f"MobileNetV3Block stride must be 1 or 2, got {s}")
        self.use_residual = s == 1 and c1 == c2
        self.expand = Conv(c1, c_mid, 1, 1, act=_hswish_or_relu(use_hs)) if c_mid != c1 else nn.Identity()
        self.dw = Conv(c_mid, c_mid, k, s, g=c_mid, act=_hswish_or_relu(use_hs))
        self.se = (SqueezeExcite(c_mid, round_channels(c_mid / 4), gate=nn.Hardsigmoid()) if use_se
                   else nn.Identity())
        self.project = Conv(c_mid, c2, 1, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.use_residual else y


# --------------------------------------------------------------------------------------------- ShuffleNetV2
@register(width_args=(), aliases=("conv_bn_relu_maxpool", "Conv_maxpool"), example=[24])
class ShuffleStem(nn.Module):
    """ShuffleNetV2 stem: 3x3/2 conv + BN + ReLU, then 3x3/2 max-pool (output at stride 4)."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups so information crosses branches in the next unit."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


@register(width_args=(), aliases=("Shuffle_Block", "ShuffleNetV2_InvertedResidual"), pruning=KEEP_WHOLE,
          example=(Example([32, 2]), Example([16, 1])))
class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018). Stride 1: split channels in half, transform one half, concat,
    shuffle. Stride 2: both branches see the whole input and each yields half the output channels.

    Channels are not width-scaled: ``c_out`` must be even and, for stride 1, equal ``c_in``.
    """

    def __init__(self, c1: int, c2: int, s: int = 1):
        super().__init__()
        if s not in (1, 2) or c2 % 2:
            raise ValueError(f"ShuffleBlock needs stride 1 or 2 and even c_out, got s={s}, c_out={c2}")
        if s == 1 and c1 != c2:
            raise ValueError(f"ShuffleBlock with stride 1 keeps the channel count; got {c1} -> {c2}")
        half = c2 // 2
        self.stride = s
        self.branch1 = _shuffle_bypass(c1, half) if s == 2 else nn.Identity()
        self.branch2 = _shuffle_main(c1 if s == 2 else half, half, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            keep, transform = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(transform)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


def _shuffle_bypass(c_in: int, c_out: int) -> nn.Sequential:
    """Stride-2 left branch: depthwise 3x3/2 (linear), then 1x1 + BN + ReLU."""
    return nn.Sequential(OrderedDict(
        dw_conv=nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False),
        dw_bn=nn.BatchNorm2d(c_in),
        pw_conv=nn.Conv2d(c_in, c_out, 1, bias=False),
        pw_bn=nn.BatchNorm2d(c_out),
        act=nn.ReLU(inplace=True),
    ))


def _shuffle_main(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Right branch: 1x1 + BN + ReLU, depthwise 3x3 (linear), 1x1 + BN + ReLU."""
    return nn.Sequential(OrderedDict(
        pw1_conv=nn.Conv2d(c_in, c_out, 1, bias=False),
        pw1_bn=nn.BatchNorm2d(c_out),
        pw1_act=nn.ReLU(inplace=True),
        dw_conv=nn.Conv2d(c_out, c_out, 3, stride, 1, groups=c_out, bias=False),
        dw_bn=nn.BatchNorm2d(c_out),
        pw2_conv=nn.Conv2d(c_out, c_out, 1, bias=False),
        pw2_bn=nn.BatchNorm2d(c_out),
        pw2_act=nn.ReLU(inplace=True),
    ))


# ------------------------------------------------------------------------------------------------- GhostNet
@register(width_args=(0,), example=[32, 3, 2])
class GhostConv(nn.Module):
    """Ghost module (Han et al. 2020): half the outputs from a real conv, the other half from a cheap
    depthwise conv over those ("ghost" features). ``dw_k=5`` is YOLOv5's choice, GhostNet's paper uses 3."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool | nn.Module = True,
                 dw_k: int = 5):
        super().__init__()
        hidden = c2 // 2
        self.cv1 = Conv(c1, hidden, k, s, None, g, act=act)
        self.cv2 = Conv(hidden, hidden, dw_k, 1, None, hidden, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


@register(width_args=(0, 1), example=(Example([32, 48, 5, 2, True]), Example([16, 32, 3, 1])))
class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: ghost expand, depthwise k x k when striding, optional SE, ghost project (linear).

    Args follow the GhostNet table row ``[c_out, c_mid, k, s, use_se]``; ``c_mid`` defaults to ``c_out // 2``
    (YOLOv5's C3Ghost). The shortcut is identity, or depthwise + 1x1 conv when shape changes.
    """

    def __init__(self, c1: int, c2: int, c_mid: int | None = None, k: int = 3, s: int = 1, use_se: bool = False):
        super().__init__()
        c_mid = c_mid or c2 // 2
        self.ghost1 = GhostConv(c1, c_mid, act=True, dw_k=3)
        self.dw = Conv(c_mid, c_mid, k, s, g=c_mid, act=False) if s == 2 else nn.Identity()
        self.se = (SqueezeExcite(c_mid, round_channels(c_mid / 4, 4), gate=nn.Hardsigmoid()) if use_se
                   else nn.Identity())
        self.ghost2 = GhostConv(c_mid, c2, act=False, dw_k=3)
        if s == 1 and c1 == c2:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(Conv(c1, c1, k, s, g=c1, act=False), Conv(c1, c2, 1, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.shortcut(x)


@register(repeat="inner", example=Example([32], n=2))
class C3Ghost(C3):
    """C3 whose bottlenecks are GhostBottlenecks: the CSP split with ghost features inside (YOLOv5 hub)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, 0, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = nn.Sequential(*(GhostBottleneck(hidden, hidden) for _ in range(n)))


# ---------------------------------------------------------------------------------------- EfficientNet-Lite
@register(width_args=(), example=[32])
class EfficientStem(Conv):
    """EfficientNet-Lite stem: 3x3/2 conv + BN + ReLU6 (Lite replaces swish with ReLU6 for quantisation)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2):
        super().__init__(c1, c2, k, s, act=nn.ReLU6(inplace=True))


@register(width_args=(), aliases=("MBConvBlock",), example=(Example([16, 5, 1, 6, 0.2]), Example([24, 3, 2, 1])))
class MBConv(nn.Module):
    """EfficientNet-Lite MBConv: 1x1 expand (x ``expand``), k x k depthwise, linear 1x1 project, no SE, ReLU6.

    ``drop_connect`` is the per-sample stochastic-depth rate of the residual branch during training; the
    YAML sets it growing linearly with block index (0 -> 0.2 over the network), as EfficientNet does.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, expand: int = 6, drop_connect: float = 0.0):
        super().__init__()
        c_mid = c1 * expand
        self.use_residual = s == 1 and c1 == c2
        self.drop_connect = drop_connect
        self.expand = Conv(c1, c_mid, 1, 1, act=nn.ReLU6(inplace=True)) if expand != 1 else nn.Identity()
        self.dw = Conv(c_mid, c_mid, k, s, g=c_mid, act=nn.ReLU6(inplace=True))
        self.project = Conv(c_mid, c2, 1, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        if not self.use_residual:
            return y
        return x + _drop_path(y, self.drop_connect, self.training)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Zero the residual branch for whole samples with probability ``rate``, rescaling the survivors."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
    return x * mask / keep


# ------------------------------------------------------------------------------------------------- PP-LCNet
@register(width_args=(), aliases=("LC_Block",), example=[32, 5, 2, True, 16])
class DepthSepConv(nn.Module):
    """PP-LCNet block (Cui et al. 2021): depthwise k x k + BN + h-swish, optional SE, pointwise 1x1 + BN +
    h-swish. Args ``[c_out, k, s, use_se, se_reduction]``; the paper puts SE and 5x5 kernels only in the
    last stages, where they pay off on CPUs."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, use_se: bool = False, se_reduction: int = 4):
        super().__init__()
        self.dw = Conv(c1, c1, k, s, g=c1, act=nn.Hardswish(inplace=True))
        self.se = SqueezeExcite(c1, max(c1 // se_reduction, 1), gate=nn.Hardsigmoid()) if use_se else nn.Identity()
        self.pw = Conv(c1, c2, 1, 1, act=nn.Hardswish(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.se(self.dw(x)))


# ------------------------------------------------------------------------------------------- factorised conv
@register(width_args=(0,), example=[32, 3, 2])
class FactorizedConv(nn.Module):
    """k x 1 then 1 x k convolution (Inception-v3 factorisation): the receptive field of k x k for 2k
    instead of k^2 weights per channel pair; one BN + activation at the end since the pair is linear."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__()
        self.conv_v = nn.Conv2d(c1, c2, (k, 1), (s, 1), (k // 2, 0), bias=False)
        self.conv_h = nn.Conv2d(c2, c2, (1, k), (1, s), (0, k // 2), bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = make_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv_h(self.conv_v(x))))


@register(width_args=(0,), example=[16, 3, 1, 1, 1.0, True])
class CrossConv(nn.Module):
    """YOLOv5's cross convolution: 1 x k Conv then k x 1 Conv (each with BN + act), optional residual."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, e: float = 1.0,
                 shortcut: bool = False):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, (1, k), (1, s))
        self.cv2 = Conv(hidden, c2, (k, 1), (s, 1), g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y
