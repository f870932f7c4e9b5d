"""Tests for utils/train/loss.py with a stand-in Detect layer (v5 P3-P5 anchors), independent of models/."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from utils.train.loss import (
    ComputeLoss,
    VarifocalLoss,
    build_targets,
    objectness_balance,
    scale_loss_gains,
    smooth_bce_targets,
)

STRIDES = (8, 16, 32)
V5_ANCHORS_PX = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
IMG = 256  # grids 32, 16, 8
NC = 3
HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}


def make_model(nc=NC):
    stride = torch.tensor(STRIDES, dtype=torch.float32)
    anchors = torch.tensor(V5_ANCHORS_PX, dtype=torch.float32).view(3, 3, 2) / stride.view(-1, 1, 1)
    det = types.SimpleNamespace(na=3, nl=3, nc=nc, anchors=anchors, stride=stride)
    return types.SimpleNamespace(model=[det])


def make_preds(bs=2, nc=NC, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, IMG // s, IMG // s, 5 + nc, generator=generator).requires_grad_(requires_grad)
            for s in STRIDES]


def single_target(cx_grid, cy_grid, w_px, h_px, image=0, cls=1):
    """One target given by its centre in P3 grid units and its size in pixels."""
    grid = IMG / STRIDES[0]
    return torch.tensor([[image, cls, cx_grid / grid, cy_grid / grid, w_px / IMG, h_px / IMG]])


def _slots(indices):
    b, a, gj, gi = indices
    return sorted(zip(b.tolist(), a.tolist(), gj.tolist(), gi.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------- assignment


def test_target_near_cell_corner_selects_three_cells_and_filters_anchor():
    model = make_model()
    # 8x8 px at P3 = 1x1 grid cells: anchor 2 (33x23 px = 4.125 x 2.875 cells) has ratio 4.125 > 4 and is
    # excluded; anchors 0 and 1 pass. Centre (10.3, 20.2): fractional parts < 0.5, so the left and upper
    # neighbours are added. P4/P5 anchors are all > 4x the target, so those levels get nothing.
    targets = single_target(10.3, 20.2, 8, 8)
    tcls, tbox, indices, anch = build_targets(make_preds(), targets, model.model[-1].anchors, 4.0)
    expected = sorted((0, a, gj, gi) for a in (0, 1) for gj, gi in ((20, 10), (20, 9), (19, 10)))
    assert _slots(indices[0]) == expected
    assert all(len(idx[0]) == 0 for idx in indices[1:])
    assert tcls[0].tolist() == [1] * 6
    # tbox xy is the centre relative to the assigned cell, wh in grid units.
    by_cell = {(gj, gi): box.tolist() for gj, gi, box in zip(indices[0][2].tolist(), indices[0][3].tolist(),
                                                             tbox[0], strict=True)}
    assert by_cell[(20, 10)] == pytest.approx([0.3, 0.2, 1.0, 1.0], abs=1e-4)
    assert by_cell[(20, 9)] == pytest.approx([1.3, 0.2, 1.0, 1.0], abs=1e-4)
    assert by_cell[(19, 10)] == pytest.approx([0.3, 1.2, 1.0, 1.0], abs=1e-4)
    for a, anchor in zip(indices[0][1].tolist(), anch[0], strict=True):
        torch.testing.assert_close(anchor, model.model[-1].anchors[0, a])


def test_right_and_down_neighbours_and_grid_border():
    model = make_model()
    targets = single_target(10.7, 20.8, 16, 24)  # fractions > 0.5 -> right and lower neighbours
    _, tbox, indices, _ = build_targets(make_preds(), targets, model.model[-1].anchors, 4.0)
    cells = {(gj, gi) for _, _, gj, gi in _slots(indices[0])}
    assert cells == {(20, 10), (20, 11), (21, 10)}
    assert tbox[0][:, :2].min() >= -0.5 - 1e-6 and tbox[0][:, :2].max() <= 1.5 + 1e-6
    # Centre in the first cell: no neighbour to the left / above exists.
    _, _, indices, _ = build_targets(make_preds(), single_target(0.3, 0.2, 16, 24), model.model[-1].anchors, 4.0)
    assert {(gj, gi) for _, _, gj, gi in _slots(indices[0])} == {(0, 0)}


def test_anchor_threshold_controls_matching():
    model = make_model()
    targets = single_target(10.5, 10.5, 8, 8)
    _, _, strict, _ = build_targets(make_preds(), targets, model.model[-1].anchors, 1.5)
    _, _, loose, _ = build_targets(make_preds(), targets, model.model[-1].anchors, 4.0)
    assert len(strict[0][0]) < len(loose[0][0])
    ratios = torch.tensor([[8 / 10, 8 / 13], [8 / 16, 8 / 30], [8 / 33, 8 / 23]])
    allowed = (torch.max(ratios, 1 / ratios).max(1).values < 1.5).sum().item()
    assert len(set(strict[0][1].tolist())) == allowed


def test_batched_assignment_equals_union_of_single_assignments():
    model = make_model()
    generator = torch.Generator().manual_seed(3)
    n = 12
    targets = torch.cat((torch.randint(0, 2, (n, 1), generator=generator).float(),
                         torch.randint(0, NC, (n, 1), generator=generator).float(),
                         torch.rand(n, 2, generator=generator) * 0.9 + 0.05,
                         torch.rand(n, 2, generator=generator) * 0.5 + 0.02), 1)
    preds = make_preds()
    _, _, batched, _ = build_targets(preds, targets, model.model[-1].anchors, 4.0)
    for level in range(3):
        union = []
        for row in targets:
            _, _, single, _ = build_targets(preds, row[None], model.model[-1].anchors, 4.0)
            union += _slots(single[level])
        assert _slots(batched[level]) == sorted(union)


def test_no_targets():
    model = make_model()
    tcls, tbox, indices, anch = build_targets(make_preds(), torch.zeros(0, 6), model.model[-1].anchors, 4.0)
    assert all(len(t) == 0 for t in tcls) and all(b.shape == (0, 4) for b in tbox)
    assert all(len(i) == 4 and len(i[0]) == 0 for i in indices) and all(a.shape == (0, 2) for a in anch)
    loss, items = ComputeLoss(model, HYP)(make_preds(), torch.zeros(0, 6))
    assert torch.isfinite(loss) and items[0] == 0 and items[2] == 0 and items[1] > 0


# ---------------------------------------------------------------------------------------------- loss values


def _random_targets(seed=5, n=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.cat((torch.randint(0, 2, (n, 1), generator=generator).float(),
                      torch.randint(0, NC, (n, 1), generator=generator).float(),
                      torch.rand(n, 2, generator=generator) * 0.8 + 0.1,
                      torch.rand(n, 2, generator=generator) * 0.3 + 0.03), 1)


def test_loss_finite_and_backward():
    model = make_model()
    preds = make_preds(requires_grad=True)
    loss, items = ComputeLoss(model, scale_loss_gains(HYP, NC, 3, IMG))(preds, _random_targets())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert items.shape == (3,) and not items.requires_grad and torch.all(items > 0)
    torch.testing.assert_close(loss.detach(), items.sum() * 2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in preds)
    assert preds[0].grad.abs().sum() > 0


def _logit(p):
    return math.log(p / (1 - p))


def _perfect_preds(model, targets):
    """Raw maps that decode exactly to the assigned targets, confident objectness and class."""
    preds = [torch.full((2, 3, IMG // s, IMG // s, 5 + NC), -12.0) for s in STRIDES]
    tcls, tbox, indices, anch = build_targets(preds, targets, model.model[-1].anchors, 4.0)
    for level, pred in enumerate(preds):
        xy = ((tbox[level][:, :2] + 0.5) / 2).clamp(1e-4, 1 - 1e-4)
        wh = ((tbox[level][:, 2:] / anch[level]).sqrt() / 2).clamp(1e-4, 1 - 1e-4)
        values = torch.full((len(tcls[level]), 5 + NC), -12.0)
        values[:, :4] = torch.logit(torch.cat((xy, wh), 1))
        values[:, 4] = 12.0
        values[torch.arange(len(tcls[level])), 5 + tcls[level]] = 12.0
        pred[indices[level]] = values
    return preds


def test_perfect_predictions_beat_random():
    model = make_model()
    targets = _random_targets()
    loss_fn = ComputeLoss(model, HYP)
    perfect, perfect_items = loss_fn(_perfect_preds(model, targets), targets)
    random_loss, _ = loss_fn(make_preds(), targets)
    assert perfect < random_loss
    assert perfect_items[0] < 1e-3  # decoded boxes equal the targets: IoU 1


def test_label_smoothing_targets_used_for_class_loss():
    assert smooth_bce_targets(0.0) == (1.0, 0.0)
    assert smooth_bce_targets(0.1) == pytest.approx((0.95, 0.05))
    model = make_model()
    hyp = {**HYP, "label_smoothing": 0.2}
    preds, targets = make_preds(), single_target(10.3, 20.2, 8, 8, cls=2)
    loss_fn = ComputeLoss(model, hyp)
    _, items = loss_fn(preds, targets)
    _, _, indices, _ = loss_fn.build_targets(preds, targets)
    pcls = preds[0][indices[0]][:, 5:]
    expected_targets = torch.full_like(pcls, 0.1)
    expected_targets[:, 2] = 0.9
    expected = F.binary_cross_entropy_with_logits(pcls, expected_targets) * hyp["cls"]
    torch.testing.assert_close(items[2], expected)


def test_single_class_model_has_no_class_loss():
    model = make_model(nc=1)
    targets = single_target(10.3, 20.2, 8, 8, cls=0)
    _, items = ComputeLoss(model, HYP)(make_preds(nc=1), targets)
    assert items[2] == 0 and items[0] > 0


@pytest.mark.parametrize("iou_type", ["iou", "giou", "diou", "ciou", "eiou"])
def test_iou_types_run(iou_type):
    loss, items = ComputeLoss(make_model(), {**HYP, "iou_type": iou_type})(make_preds(), _random_targets())
    assert torch.isfinite(loss) and items[0] > 0


def test_focal_loss_reduces_objectness_loss():
    model = make_model()
    preds, targets = make_preds(), _random_targets()
    _, plain = ComputeLoss(model, HYP)(preds, targets)
    _, focal = ComputeLoss(model, {**HYP, "fl_gamma": 1.5})(preds, targets)
    assert torch.isfinite(focal).all()
    assert focal[1] < plain[1] and focal[2] < plain[2]
    torch.testing.assert_close(focal[0], plain[0])  # box loss is unaffected


def test_varifocal_formula_and_integration():
    pred = torch.tensor([0.5, -1.0, 2.0])
    target = torch.tensor([0.8, 0.0, 0.0])
    loss = VarifocalLoss(torch.nn.BCEWithLogitsLoss(reduction="sum"))(pred, target)
    p = torch.sigmoid(pred)
    expected = (-0.8 * (0.8 * torch.log(p[0]) + 0.2 * torch.log(1 - p[0]))
                - 0.75 * p[1] ** 2 * torch.log(1 - p[1]) - 0.75 * p[2] ** 2 * torch.log(1 - p[2]))
    torch.testing.assert_close(loss, expected)
    model = make_model()
    preds = make_preds(requires_grad=True)
    total, items = ComputeLoss(model, {**HYP, "vfl": True})(preds, _random_targets())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(preds[1].grad).all()
    _, plain = ComputeLoss(model, HYP)(preds, _random_targets())
    assert items[1] < plain[1]  # easy negatives are muted by alpha * p^gamma


def test_gain_ratio_from_model():
    model = make_model()
    model.gr = 0.0  # objectness target 1 for every positive regardless of IoU
    assert ComputeLoss(model, HYP).gr == 0.0
    assert ComputeLoss(make_model(), HYP).gr == 1.0


def test_scale_loss_gains_and_balance():
    hyp = dict(HYP)
    scaled = scale_loss_gains(hyp, nc=20, nl=4, imgsz=320)
    assert hyp == HYP  # input untouched
    assert scaled["box"] == pytest.approx(0.05 * 3 / 4)
    assert scaled["cls"] == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert scaled["obj"] == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert scaled["anchor_t"] == 4.0
    assert objectness_balance(3) == [4.0, 1.0, 0.4]
    assert objectness_balance(4) == [4.0, 1.0, 0.25, 0.06]
    assert objectness_balance(5) == [4.0, 1.0, 0.25, 0.06, 0.02]
    with pytest.raises(ValueError):
        objectness_balance(6)
