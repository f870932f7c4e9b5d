"""Attention blocks for the zoo: SE, CBAM and selective-kernel attention.

All three re-weight a feature map without changing its shape, so they register with ``out=same`` and
``coupling="tied"``: the pruning tools must shrink their channels together with the layer that feeds them.
A YAML row names the channel count for readability (``[-1, 1, CBAM, [1024]]``); it is scaled by
``width_multiple`` like any channel argument and must then equal the input channels.
"""

from __future__ import annotations

import torch
from torch import nn

from models.registry import KEEP_WHOLE, out_same, register

__all__ = ["CBAM", "SE", "ChannelAttention", "SKAttention", "SpatialAttention", "SqueezeExcite"]


def _check_same_channels(block: str, c1: int, c2: int | None) -> None:
    """Attention cannot change the channel count; a mismatching YAML argument is a config mistake."""
    if c2 is not None and c2 != c1:
        raise ValueError(f"{block} keeps its input's {c1} channels; the YAML asks for {c2}")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool, bottleneck of 1x1 convs, per-channel gate.

    The building block the backbones use with their own widths and gates (MobileNetV3 and GhostNet gate with
    a hard sigmoid); attribute names ``fc1``/``fc2`` follow torchvision so pretrained weights map by name.
    """

    def __init__(self, channels: int, squeeze_channels: int, gate: nn.Module | None = None,
                 act: nn.Module | None = None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act if act is not None else nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate if gate is not None else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


@register(width_args=(0,), out=out_same, coupling="tied", example=[16])
class SE(SqueezeExcite):
    """YAML-level SE: ``[-1, 1, SE, [c, reduction]]`` with a sigmoid gate and ``c // reduction`` (min 8) squeeze."""

    def __init__(self, c1: int, c2: int | None = None, reduction: int = 16):
        _check_same_channels("SE", c1, c2)
        super().__init__(c1, max(c1 // reduction, 8))


class ChannelAttention(nn.Module):
    """CBAM's channel branch: one shared MLP over both the average- and the max-pooled descriptor."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        peak = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """CBAM's spatial branch: a k x k conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptor = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
        return torch.sigmoid(self.conv(descriptor))


@register(width_args=(0,), out=out_same, coupling="tied", pruning=KEEP_WHOLE, example=[16])  # spatial gate: mean
class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel gate, then spatial gate.

    Bias-free MLP with reduction 16 and a 7x7 spatial conv, the layout TPH-YOLOv5 used (seed 004), so the
    P2-CBAM models' parameter counts are comparable.
    """

    def __init__(self, c1: int, c2: int | None = None, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        _check_same_channels("CBAM", c1, c2)
        self.channel_attention = ChannelAttention(c1, reduction)
        self.spatial_attention = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)


@register(width_args=(0,), out=out_same, coupling="tied", pruning=KEEP_WHOLE, example=[16])  # grouped convs, LayerNorm
class SKAttention(nn.Module):
    """Selective-kernel attention (Li et al. 2019, SKNet): branches with different receptive fields are
    fused by a softmax over branches, computed per channel from the pooled sum.

    Defaults follow the paper (two grouped 3x3 branches, dilation 1 and 2 = receptive fields 3 and 5,
    32 groups, reduction 16, at least 32 hidden units) rather than the popular dense (1, 3, 5, 7) variant,
    which costs 84 c^2 weights (22 M at 512 channels) for a single attention layer. The squeeze FC is
    normalised with LayerNorm instead of the paper's BatchNorm, which cannot train on one pooled vector at
    batch size 1.
    """

    def __init__(self, c1: int, c2: int | None = None, dilations: tuple[int, ...] = (1, 2), groups: int = 32,
                 reduction: int = 16, min_hidden: int = 32):
        super().__init__()
        _check_same_channels("SKAttention", c1, c2)
        groups = _largest_divisor_at_most(c1, groups)
        self.branches = nn.ModuleList(_sk_branch(c1, d, groups) for d in dilations)
        hidden = max(c1 // reduction, min_hidden)
        self.squeeze = nn.Sequential(nn.Linear(c1, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU(inplace=True))
        self.select = nn.ModuleList(nn.Linear(hidden, c1) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Branches are concatenated and spatially flattened, so no tensor has more than 4 axes: NCNN has no fifth.
        features = torch.cat([branch(x) for branch in self.branches], 1).flatten(2)  # (b, k*c, h*w)
        features = features.unflatten(1, (len(self.branches), -1))  # (b, k, c, h*w)
        z = self.squeeze(features.sum(1).mean(2))  # (b, hidden)
        weights = torch.stack([fc(z) for fc in self.select], 1).softmax(1)  # (b, k, c), softmax over branches
        return (weights[..., None] * features).sum(1).unflatten(2, x.shape[2:])


def _sk_branch(channels: int, dilation: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, dilation, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """Grouped convs need groups | channels; small test widths fall back to the largest divisor <= limit."""
    return max(g for g in range(1, min(n, limit) + 1) if n % g == 0)
