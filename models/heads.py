"""Prediction heads. :class:`Detect` keeps YOLOv5 v7.0's attribute names (``nc, no, nl, na, m, anchors,
stride, inplace``) so official checkpoints unpickle into it; it is reachable as ``models.yolo.Detect`` too."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.registry import BuildContext, Example, ModuleSpec, Pruning, out_none, register


def _bind_detect(spec: ModuleSpec, c_in: list[int], args: list, ctx: BuildContext, n: int):
    """``[nc, anchors]`` -> ``(nc, anchors, ch)``; ``anchors: 3`` means 3 placeholder anchors per level."""
    if len(args) < 2:
        raise TypeError(f"Detect expects [nc, anchors], got {args}")
    nc, anchors, *rest = args
    if isinstance(anchors, int):
        anchors = [list(range(anchors * 2))] * len(c_in)
    if len(anchors) != len(c_in):
        raise ValueError(f"Detect has {len(c_in)} inputs but {len(anchors)} anchor levels")
    return [nc, anchors, list(c_in), *rest], 1


@register(c1=False, width_args=(), out=out_none, coupling="head", multi_input=True, bind_fn=_bind_detect,
          pruning=Pruning(fixed_outputs=("m",)), task="detect",
          example=Example(["nc", "anchors"], inputs=(16, 32),
                          symbols={"nc": 3, "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]]}))
class Detect(nn.Module):
    """Per-level 1x1 convs predicting ``na`` anchors x (xywh, objectness, nc classes).

    Training mode returns the raw per-level maps (bs, na, ny, nx, no). Eval mode returns
    ``(decoded, raw)`` where ``decoded`` is (bs, sum(na*ny*nx), no) with xywh in input pixels and sigmoid
    scores, the v7.0 layout. ``anchors`` is a buffer in grid units (pixels / stride) once the model has set
    its strides.
    """

    stride: torch.Tensor | None = None  # set by the model from a dry forward
    export_decoded_only = False  # export wrappers switch this to return only the decoded tensor

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = (),
                 inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.inplace = inplace

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor | tuple[torch.Tensor, list]:
        """Training: raw maps per level; inference: (decoded n x no, raw maps), or only the decoded for export."""
        raw = []
        decoded = []
        for i, conv in enumerate(self.m):
            p = conv(x[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not self.training:
                decoded.append(self._decode(p, i).view(bs, -1, self.no))
        if self.training:
            return raw
        if self.export_decoded_only:
            return torch.cat(decoded, 1)
        return torch.cat(decoded, 1), raw

    def _decode(self, p: torch.Tensor, level: int) -> torch.Tensor:
        """xy = (2*sig - 0.5 + cell) * stride, wh = (2*sig)^2 * anchor, scores = sig (YOLOv5 v6+ decoding)."""
        _, _, ny, nx, _ = p.shape
        grid, anchor_grid = self._make_grid(nx, ny, level, p.dtype, p.device)
        xy, wh, scores = p.sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * self.stride[level]
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, scores), 4)

    def _make_grid(self, nx: int, ny: int, level: int, dtype: torch.dtype, device: torch.device):
        """Cell offsets (minus 0.5, folded from the decoding) and anchors in pixels, both (1, na, ny, nx, 2)."""
        shape = (1, self.na, ny, nx, 2)
        ys = torch.arange(ny, device=device, dtype=dtype)
        xs = torch.arange(nx, device=device, dtype=dtype)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[level] * self.stride[level]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid.to(dtype)

    def initialize_biases(self, class_frequency: torch.Tensor | None = None) -> None:
        """Objectness prior of ~8 objects per 640x640 image, class prior 0.6/nc (or from frequencies)."""
        for conv, s in zip(self.m, self.stride):
            bias = conv.bias.view(self.na, -1)
            bias.data[:, 4] += torch.log(torch.tensor(8 / (640 / float(s)) ** 2))
            if class_frequency is None:
                bias.data[:, 5:] += torch.log(torch.tensor(0.6 / (self.nc - 0.99999)))
            else:
                bias.data[:, 5:] += torch.log(class_frequency / class_frequency.sum())
            conv.bias = nn.Parameter(bias.view(-1), requires_grad=True)
