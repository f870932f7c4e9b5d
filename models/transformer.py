"""Transformer blocks for the zoo: ViT-style C3TR, Swin-style C3STR, and BiFPN weighted-fusion nodes.

``TransformerLayer``/``TransformerBlock``/``C3TR`` keep YOLOv5 v7.0's attribute names (``q,k,v,ma,fc1,fc2``,
``conv,linear,tr,c2``) so official C3TR checkpoints load. ``C3STR`` replaces global attention with shifted
window attention (Liu et al. 2021), whose cost grows linearly with the feature-map area, which is what
makes transformer blocks affordable on the P2-P4 levels of a detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import C3, Conv
from models.registry import KEEP_WHOLE, Example, Pruning, register

__all__ = [
    "C3STR",
    "C3TR",
    "BiFPNAdd",
    "SwinBlock",
    "SwinStage",
    "TransformerBlock",
    "TransformerLayer",
    "WindowAttention",
    "shifted_window_mask",
]

MASK_VALUE = -100.0  # additive logit for forbidden pairs: exp(-100) is 0 in fp16/fp32, and no row becomes NaN


class TransformerLayer(nn.Module):
    """Post-residual transformer layer without LayerNorm (YOLOv5's C3TR choice, trains stably from CNN features).

    ``mlp_ratio=1`` is YOLOv5's bias-free c -> c feed-forward; TPH-YOLOv5's published size needs ViT's 4x.
    """

    def __init__(self, c: int, num_heads: int = 4, mlp_ratio: int = 1):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c * mlp_ratio, bias=False)
        self.fc2 = nn.Linear(c * mlp_ratio, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
        return self.fc2(self.fc1(x)) + x


@register(repeat="fixed", pruning=KEEP_WHOLE, example=[32, 4, 2])  # heads split the channels; the reshape uses c2
class TransformerBlock(nn.Module):
    """Global self-attention over all pixels of a map: optional 1x1 Conv to ``c2``, learnable position term."""

    def __init__(self, c1: int, c2: int, num_heads: int = 4, num_layers: int = 1, mlp_ratio: int = 1):
        super().__init__()
        self.conv = Conv(c1, c2) if c1 != c2 else None
        self.linear = nn.Linear(c2, c2)
        self.tr = nn.Sequential(*(TransformerLayer(c2, num_heads, mlp_ratio) for _ in range(num_layers)))
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        b, _, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (h*w, b, c), MultiheadAttention's sequence-first layout
        tokens = self.tr(tokens + self.linear(tokens))
        return tokens.permute(1, 2, 0).reshape(b, self.c2, h, w)


@register(repeat="inner", example=Example([32], n=2))
class C3TR(C3):
    """C3 with a TransformerBlock (4 heads, ``n`` layers) in place of the bottleneck stack (TPH-YOLOv5).

    The first six arguments are YOLOv5 v7.0's, so its C3TR rows and checkpoints keep working.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 mlp_ratio: int = 1):
        super().__init__(c1, c2, n, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = TransformerBlock(hidden, hidden, 4, n, mlp_ratio)


# ----------------------------------------------------------------------------------------------------- Swin
def _relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table for every pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(b, H, W, c) with H, W multiples of ``window`` -> (b * nW, window*window, c)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, valid_h: int, valid_w: int, window: int, shift: int,
                        device: torch.device | None = None) -> torch.Tensor | None:
    """(nW, N, N) additive mask for a padded ``h x w`` map rolled by ``-shift``; None when nothing is masked.

    Labels are assigned on the unrolled map and rolled with the data: the first ``shift`` rows/columns wrap
    around to sit next to the last ones inside the last window, where they are not neighbours. Pad
    tokens (beyond ``valid_h x valid_w``) are a region of their own, so real tokens never attend to padding.
    Built in forward because the feature size (and so the padding) changes with the input image.
    """
    if shift == 0 and (h, w) == (valid_h, valid_w):
        return None
    rows = _region_labels(h, shift, device)
    cols = _region_labels(w, shift, device)
    labels = rows[:, None] * 2 + cols[None, :]  # unique id per (row band, column band)
    pad = (torch.arange(h, device=device)[:, None] >= valid_h) | (torch.arange(w, device=device)[None, :] >= valid_w)
    labels = torch.where(pad, torch.full_like(labels, -1), labels)
    labels = torch.roll(labels, (-shift, -shift), (0, 1))
    windows = window_partition(labels[None, :, :, None].float(), window).squeeze(-1)  # (nW, N)
    different = windows[:, :, None] != windows[:, None, :]
    return different.float() * MASK_VALUE


def _region_labels(size: int, shift: int, device: torch.device | None) -> torch.Tensor:
    """Band id along one axis of the unrolled map: the first ``shift`` positions wrap to the far end."""
    labels = torch.zeros(size, dtype=torch.long, device=device)
    labels[:shift] = 1
    return labels


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with Swin's learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (bw, heads, n, n)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        logits = logits + bias.permute(2, 0, 1).unsqueeze(0).to(logits.dtype)
        if mask is not None:
            n_windows = mask.shape[0]
            logits = logits.view(bw // n_windows, n_windows, self.num_heads, n, n)
            logits = (logits + mask[None, :, None].to(logits.dtype)).view(bw, self.num_heads, n, n)
        attention = logits.softmax(-1, dtype=torch.float32).to(v.dtype)  # fp32 normalisation keeps fp16 accurate
        return self.proj((attention @ v).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Swin transformer block on a (b, c, h, w) map: LN, (shifted) window attention, LN, MLP, both residual.

    The map is padded right/bottom to a multiple of the window and cropped back afterwards, so any
    feature size works (seed 004's C3STR fix for detection inputs that are not multiples of 8).
    """

    def __init__(self, dim: int, num_heads: int, window: int = 8, shift: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window), got {shift} for window {window}")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        tokens = x.permute(0, 2, 3, 1)  # (b, h, w, c)
        tokens = tokens + self._attend(self.norm1(tokens), h, w)
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.permute(0, 3, 1, 2).contiguous()

    def _attend(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        win = self.window
        pad_h, pad_w = (-h) % win, (-w) % win
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        shift = self.shift if min(hp, wp) > win else 0  # one window covers the map: nothing to shift
        if shift:
            x = torch.roll(x, (-shift, -shift), (1, 2))
        mask = shifted_window_mask(hp, wp, h, w, win, shift, x.device)
        out = window_reverse(self.attn(window_partition(x, win), mask), win, hp, wp)
        if shift:
            out = torch.roll(out, (shift, shift), (1, 2))
        return out[:, :h, :w]


class SwinStage(nn.Module):
    """``num_layers`` Swin blocks alternating regular and half-window-shifted windows."""

    def __init__(self, c1: int, c2: int, num_heads: int, num_layers: int, window: int = 8):
        super().__init__()
        self.conv = Conv(c1, c2) if c1 != c2 else None
        self.blocks = nn.Sequential(*(SwinBlock(c2, num_heads, window, 0 if i % 2 == 0 else window // 2)
                                      for i in range(num_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        return self.blocks(x)


@register(repeat="inner", pruning=Pruning(whole=("m",)), example=Example([64], n=2))  # Swin: LayerNorm, heads
class C3STR(C3):
    """C3 with a Swin stage (window 8, shifted every other block) as the bottleneck stack (seed 004's C3STR).

    Heads = hidden channels // 32 (Swin's 32 channels per head), at least 1.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 window: int = 8):
        super().__init__(c1, c2, n, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = SwinStage(hidden, hidden, max(hidden // 32, 1), n, window)


# ---------------------------------------------------------------------------------------------------- BiFPN
def _out_bifpn(c_in: list[int], args: list) -> int:
    return args[1] if len(args) > 1 and args[1] else c_in[0]


@register(width_args=(0,), out=_out_bifpn, multi_input=True, aliases=("BiFPN_Add2", "BiFPN_Add3"),
          pruning=Pruning(scalar_params=("w",)), example=Example([32], inputs=(16, 16)))
class BiFPNAdd(nn.Module):
    """EfficientDet's fast normalised fusion: ``Conv(sum_i w_i x_i / (sum_i w_i + eps))`` with ``w = relu(w')``.

    One learnable scalar per input lets the network learn how much each resolution matters, at the cost of
    n parameters, instead of concatenating (which doubles the next conv). Inputs must share channels and
    size; ``c2`` defaults to that channel count.
    """

    def __init__(self, c1: list[int], c2: int | None = None, eps: float = 1e-4):
        super().__init__()
        if len(set(c1)) != 1:
            raise ValueError(f"BiFPNAdd inputs must have equal channels, got {c1}")
        self.w = nn.Parameter(torch.ones(len(c1)))
        self.eps = eps
        self.conv = Conv(c1[0], c2 or c1[0], 1, 1)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        weights = F.relu(self.w)
        weights = weights / (weights.sum() + self.eps)
        return self.conv(sum(wi * xi for wi, xi in zip(weights, x)))
