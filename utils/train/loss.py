"""YOLOv5 (v6+/v7.0) detection loss: CIoU box regression, IoU-targeted objectness, BCE classification.

The trainer builds one :class:`ComputeLoss` per model after moving the model to its device, and scales the
hyperparameter gains once with :func:`scale_loss_gains` (kept out of the loss so the gains logged and saved
in checkpoints are the ones actually used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from utils.common.boxes import bbox_iou

# Objectness weight per pyramid level, small strides first. v7.0 uses [4, 1, 0.4] for 3 levels and the
# first nl entries of the 5-level list otherwise (so a 4-level P2 model gets [4, 1, 0.25, 0.06]); we keep
# exactly that so P2/P6 models train like their v7.0 counterparts.
_BALANCE_3 = (4.0, 1.0, 0.4)
_BALANCE_DEFAULT = (4.0, 1.0, 0.25, 0.06, 0.02)

# Neighbour cell offsets (x, y): own cell, left, up, right, down (times the 0.5 grid bias g).
_NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))
_GRID_BIAS = 0.5


def objectness_balance(nl: int) -> list[float]:
    """Per-level objectness weights for a detector with ``nl`` levels (v7.0 table)."""
    if nl == 3:
        return list(_BALANCE_3)
    if not 1 <= nl <= len(_BALANCE_DEFAULT):
        raise ValueError(f"no objectness balance defined for {nl} detection levels")
    return list(_BALANCE_DEFAULT[:nl])


def scale_loss_gains(hyp: Mapping[str, Any], nc: int, nl: int, imgsz: int) -> dict[str, Any]:
    """Return a copy of ``hyp`` with box/cls/obj gains rescaled for the model and image size (v7.0 train.py).

    The hyp files are tuned for 3 levels, 80 classes and 640 px; the per-element mean losses change with
    the number of levels, classes and grid cells, so the gains are rescaled to keep the loss balance.
    """
    scaled = dict(hyp)
    scaled["box"] = hyp["box"] * 3 / nl
    scaled["cls"] = hyp["cls"] * nc / 80 * 3 / nl
    scaled["obj"] = hyp["obj"] * (imgsz / 640) ** 2 * 3 / nl
    return scaled


def smooth_bce_targets(eps: float = 0.0) -> tuple[float, float]:
    """Positive/negative BCE targets with label smoothing ``eps`` (https://arxiv.org/abs/1902.04103)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class _ModulatedBCE(nn.Module):
    """A ``BCEWithLogitsLoss`` (its ``pos_weight`` kept) evaluated per element, re-weighted by a subclass."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float, alpha: float):
        super().__init__()
        self.bce = bce
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = bce.reduction
        self.bce.reduction = "none"


class FocalLoss(_ModulatedBCE):
    """Focal loss (Lin et al. 2017) wrapped around a ``BCEWithLogitsLoss`` so its ``pos_weight`` still applies.

    Down-weights easy examples by ``(1 - p_t)^gamma`` and balances classes with ``alpha``.
    """

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__(bce, gamma, alpha)

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.bce(pred, true)
        prob = pred.sigmoid()
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_factor * (1.0 - p_t) ** self.gamma
        return _reduce(loss, self.reduction)


class VarifocalLoss(_ModulatedBCE):
    """Varifocal loss (Zhang et al. 2021, VarifocalNet) for IoU-valued objectness targets ``q``.

    Positives (q > 0) are weighted by q, so well-localised boxes dominate; negatives by ``alpha * p^gamma``,
    which mutes the many easy background cells, as in focal loss but asymmetrically.
    """

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 2.0, alpha: float = 0.75):
        super().__init__(bce, gamma, alpha)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        positive = (target > 0).to(pred.dtype)
        weight = target * positive + self.alpha * pred.sigmoid().pow(self.gamma) * (1 - positive)
        return _reduce(self.bce(pred, target) * weight, self.reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _anchor_offsets(device: torch.device) -> torch.Tensor:
    return torch.tensor(_NEIGHBOUR_OFFSETS, device=device, dtype=torch.float32) * _GRID_BIAS


def _assign_level(
    targets: torch.Tensor, anchors: torch.Tensor, grid_hw: Sequence[int], anchor_t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match all targets to one pyramid level.

    ``targets`` is ``na x nt x 7`` (image, cls, x, y, w, h, anchor index) in grid units. Keeps the
    (target, anchor) pairs whose width and height ratios are within ``anchor_t``, then adds the two
    neighbouring cells closest to the centre (the v6+ xy range of -0.5..1.5 can reach them), skipping
    neighbours outside the grid. Returns the selected rows and their cell offsets.
    """
    ratio = targets[..., 4:6] / anchors[:, None]
    matched = torch.max(ratio, 1 / ratio).max(2).values < anchor_t
    t = targets[matched]
    gxy = t[:, 2:4]
    gxy_inverse = torch.tensor(grid_hw[::-1], device=t.device, dtype=t.dtype) - gxy
    left, up = ((gxy % 1 < _GRID_BIAS) & (gxy > 1)).T
    right, down = ((gxy_inverse % 1 < _GRID_BIAS) & (gxy_inverse > 1)).T
    use = torch.stack((torch.ones_like(left), left, up, right, down))
    offsets = _anchor_offsets(t.device)
    return t.repeat((len(_NEIGHBOUR_OFFSETS), 1, 1))[use], (torch.zeros_like(gxy)[None] + offsets[:, None])[use]


# per level: class ids, box targets (xy offset in the cell, wh), (image, anchor, gj, gi) indices, anchors
Targets = tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, ...]], list[torch.Tensor]]


def build_targets(preds: Sequence[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor,
                  anchor_t: float) -> Targets:
    """Assign ground truth to (image, anchor, cell) slots of every level, without looping over targets.

    Args:
        preds: nl raw maps ``bs x na x ny x nx x no`` (only the shapes are used).
        targets: ``n x 6`` (image index, class, cx, cy, w, h), xywh normalised to [0, 1].
        anchors: ``nl x na x 2`` anchor sizes in grid units.
        anchor_t: max allowed width/height ratio between target and anchor.

    Returns per level: class ids, target boxes (xy offset within the cell, wh in grid units), indices
    ``(image, anchor, gj, gi)`` and the matched anchor sizes.
    """
    na, nt = anchors.shape[1], targets.shape[0]
    device = targets.device
    anchor_index = torch.arange(na, device=device, dtype=targets.dtype).view(na, 1).repeat(1, nt)
    targets = torch.cat((targets.repeat(na, 1, 1), anchor_index[..., None]), 2)  # na x nt x 7
    gain = torch.ones(7, device=device, dtype=targets.dtype)
    tcls, tbox, indices, anch = [], [], [], []
    for level, pred in enumerate(preds):
        ny, nx = pred.shape[2], pred.shape[3]
        gain[2:6] = torch.tensor((nx, ny, nx, ny), device=device, dtype=targets.dtype)
        level_anchors = anchors[level].to(device=device, dtype=targets.dtype)
        t, offsets = _assign_level(targets * gain, level_anchors, (ny, nx), anchor_t)
        image, cls = t[:, 0].long(), t[:, 1].long()
        gxy, gwh, anchor_idx = t[:, 2:4], t[:, 4:6], t[:, 6].long()
        gij = (gxy - offsets).long()
        gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
        indices.append((image, anchor_idx, gj, gi))
        tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))
        anch.append(level_anchors[anchor_idx])
        tcls.append(cls)
    return tcls, tbox, indices, anch


class ComputeLoss:
    """YOLOv5 v7.0 detection loss bound to a model's Detect layer (``model.model[-1]``).

    ``hyp`` must hold already-scaled gains (see :func:`scale_loss_gains`) plus ``cls_pw, obj_pw, anchor_t,
    fl_gamma``; optional ``label_smoothing`` (0), ``iou_type`` ('ciou') and ``vfl`` (False, Varifocal
    objectness). Anchors are read from the Detect layer on every call so AutoAnchor updates are seen.
    """

    def __init__(self, model: Any, hyp: Mapping[str, Any]):
        det = model.model[-1]
        self.det = det
        self.hyp = dict(hyp)
        self.na, self.nc, self.nl = det.na, det.nc, det.nl
        self.gr = float(getattr(model, "gr", 1.0))
        self.iou_type = self.hyp.get("iou_type", "ciou")
        self.balance = objectness_balance(self.nl)
        self.cp, self.cn = smooth_bce_targets(self.hyp.get("label_smoothing", 0.0))
        self.cls_loss, self.obj_loss = self._make_criteria()

    def _make_criteria(self) -> tuple[nn.Module, nn.Module]:
        """BCE criteria with positive weights, wrapped in focal / varifocal variants when configured."""
        cls_loss: nn.Module = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(self.hyp["cls_pw"])]))
        obj_loss: nn.Module = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(self.hyp["obj_pw"])]))
        gamma = float(self.hyp.get("fl_gamma", 0.0))
        if gamma > 0:
            cls_loss, obj_loss = FocalLoss(cls_loss, gamma), FocalLoss(obj_loss, gamma)
        if self.hyp.get("vfl", False):
            obj_loss = VarifocalLoss(nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(self.hyp["obj_pw"])])))
        return cls_loss, obj_loss

    def build_targets(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> Targets:
        """Target assignment for ``preds`` with this model's anchors (see module-level :func:`build_targets`)."""
        anchors = self.det.anchors.detach().to(targets.device)
        return build_targets(preds, targets, anchors, float(self.hyp["anchor_t"]))

    def __call__(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(total * batch_size, [box, obj, cls] detached)``; total is a 0-dim tensor."""
        device = preds[0].device
        self.cls_loss.to(device)
        self.obj_loss.to(device)
        targets = targets.to(device=device, dtype=torch.float32)
        tcls, tbox, indices, anchors = self.build_targets(preds, targets)
        zero = torch.zeros((), device=device)
        lbox, lobj, lcls = zero, zero, zero
        for level, pred in enumerate(preds):
            pred = pred.float()
            tobj = torch.zeros(pred.shape[:4], device=device)
            if indices[level][0].shape[0]:
                box_loss, cls_loss, iou = self._positive_losses(pred, tcls[level], tbox[level], indices[level],
                                                                anchors[level])
                lbox = lbox + box_loss
                lcls = lcls + cls_loss
                tobj[indices[level]] = iou
            lobj = lobj + self.obj_loss(pred[..., 4], tobj) * self.balance[level]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        batch_size = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch_size, torch.stack((lbox, lobj, lcls)).detach()

    def _positive_losses(
        self,
        pred: torch.Tensor,
        tcls: torch.Tensor,
        tbox: torch.Tensor,
        index: tuple[torch.Tensor, ...],
        anchors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box and class loss of the assigned slots, plus their objectness targets (IoU, no gradient)."""
        pxy, pwh, _, pcls = pred[index].split((2, 2, 1, self.nc), 1)
        pxy = pxy.sigmoid() * 2 - 0.5
        pwh = (pwh.sigmoid() * 2) ** 2 * anchors
        iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox, xywh=True, iou_type=self.iou_type)
        box_loss = (1.0 - iou).mean()
        obj_target = iou.detach().clamp(0)
        if self.gr < 1:
            obj_target = (1.0 - self.gr) + self.gr * obj_target
        cls_loss = torch.zeros((), device=pred.device)
        if self.nc > 1:  # single-class models learn the class through objectness alone
            cls_target = torch.full_like(pcls, self.cn)
            cls_target[torch.arange(tcls.shape[0], device=pred.device), tcls] = self.cp
            cls_loss = self.cls_loss(pcls, cls_target)
        return box_loss, cls_loss, obj_target
