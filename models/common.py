"""YOLOv5 core blocks, each registered with how its YAML row is bound.

Class and attribute names (``conv/bn/act``, ``cv1..cv4``, ``m``, ``add``, ``d``) are those of YOLOv5 v7.0, so
official checkpoints unpickle into these classes and their ``forward`` works from the restored attributes.
The registry itself lives in :mod:`models.registry` and is re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.activations import make_activation
from models.registry import (
    KEEP_WHOLE,
    REGISTRY,
    BuildContext,
    Example,
    ModuleSpec,
    make_divisible,
    out_same,
    out_sum,
    register,
    register_external,
)

__all__ = [
    "C3",
    "REGISTRY",
    "SPP",
    "SPPF",
    "Bottleneck",
    "BottleneckCSP",
    "BuildContext",
    "Concat",
    "Contract",
    "Conv",
    "DWConv",
    "Expand",
    "Focus",
    "ModuleSpec",
    "autopad",
    "make_divisible",
    "register",
]


def autopad(k: int | list[int], p: int | list[int] | None = None, d: int = 1) -> int | list[int]:
    """'Same' padding for odd kernels (with dilation ``d``) when ``p`` is not given."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def resolve_act(act: bool | nn.Module) -> nn.Module:
    """``True`` -> the model's activation, a module -> itself, anything else -> Identity."""
    if act is True:
        return make_activation()
    return act if isinstance(act, nn.Module) else nn.Identity()


@register(repeat="outer", example=[32, 3, 2])
class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation, the unit every YOLOv5 block is made of."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, d: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@register(repeat="outer", coupling="tied", example=[16, 3, 1])  # tied when c2 == c1, as YOLOv5 uses it
class DWConv(Conv):
    """Depthwise convolution: groups = gcd(c1, c2)."""

    def __init__(self, c1: int, c2: int, k=1, s=1, d: int = 1, act: bool | nn.Module = True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


@register(repeat="outer", example=[32, 3])
class Focus(nn.Module):
    """Space-to-depth (2x2 pixels -> 4 channels) followed by a Conv; the v1-v5 stem before the 6x6 conv."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(space_to_depth(x))


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """Focus ordering: (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)."""
    return torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1)


@register(repeat="outer", example=(Example([16]), Example([32, False])))
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 expand, residual add when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


@register(repeat="inner", example=Example([32], n=2))
class BottleneckCSP(nn.Module):
    """Cross Stage Partial bottleneck (CSPNet): one path through ``n`` Bottlenecks, one bypass, BN over both."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = nn.Conv2d(c1, hidden, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, 1, bias=False)
        self.cv4 = Conv(2 * hidden, c2, 1, 1)
        self.bn = nn.BatchNorm2d(2 * hidden)
        self.act = make_activation()
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.cv3(self.m(self.cv1(x)))
        bypass = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((main, bypass), 1))))


@register(repeat="inner", example=Example([32], n=2))
class C3(nn.Module):
    """CSP bottleneck with three Convs (YOLOv5 v4+): cheaper than BottleneckCSP, no separate BN."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@register(repeat="outer", example=[32, [3, 5]])
class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP): parallel max-pools of several kernel sizes, concatenated."""

    def __init__(self, c1: int, c2: int, k: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], 1))


@register(repeat="outer", example=[32, 5])
class SPPF(nn.Module):
    """SPP-Fast: three chained k x k max-pools equal SPP(k, 2k-1, 3k-2) at a fraction of the cost."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


@register(c1=False, width_args=(), out=out_sum, coupling="concat", multi_input=True,
          example=Example([1], inputs=(8, 16)))
class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


def _out_contract(c_in, args) -> int:
    return c_in[0] * args[0] ** 2


def _out_expand(c_in, args) -> int:
    return c_in[0] // args[0] ** 2


@register(c1=False, width_args=(), out=_out_contract, coupling="rearrange", pruning=KEEP_WHOLE, example=[2])
class Contract(nn.Module):
    """Space-to-depth by ``gain``: (b, c, h, w) -> (b, c*g*g, h/g, w/g)."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.gain
        x = x.view(b, c, h // g, g, w // g, g).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * g * g, h // g, w // g)


@register(c1=False, width_args=(), out=_out_expand, coupling="rearrange", pruning=KEEP_WHOLE, example=[2])
class Expand(nn.Module):
    """Depth-to-space by ``gain``, the inverse of :class:`Contract`."""

    def __init__(self, gain: int = 2):
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.gain
        x = x.view(b, g, g, c // g**2, h, w).permute(0, 3, 4, 1, 5, 2).contiguous()
        return x.view(b, c // g**2, h * g, w * g)


def _bind_batchnorm(spec: ModuleSpec, c_in: list[int], args: list, ctx: BuildContext, n: int):
    return [c_in[0]], 1


register_external(nn.Upsample, name="nn.Upsample", aliases=("Upsample",), c1=False, width_args=(),
                  out=out_same, coupling="tied", example=[None, 2, "nearest"])
register_external(nn.BatchNorm2d, name="nn.BatchNorm2d", aliases=("BatchNorm2d",), out=out_same,
                  coupling="tied", bind_fn=_bind_batchnorm, example=[])
register_external(nn.MaxPool2d, name="nn.MaxPool2d", aliases=("MaxPool2d",), c1=False, width_args=(),
                  out=out_same, coupling="tied", example=[3, 1, 1])
register_external(nn.Identity, name="nn.Identity", aliases=("Identity",), c1=False, width_args=(),
                  out=out_same, coupling="tied", example=[])
