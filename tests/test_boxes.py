"""Tests for utils/common/boxes.py: conversions, IoU family against hand-computed values, NMS against brute force."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from utils.common.boxes import (
    bbox_iou,
    box_ioa,
    box_iou,
    clip_boxes,
    non_max_suppression,
    scale_boxes,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)

# ---------------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("as_numpy", [False, True])
def test_xywh_xyxy_round_trip(as_numpy):
    generator = torch.Generator().manual_seed(0)
    xywh = torch.rand(50, 4, generator=generator) * 100 + 1
    boxes = xywh.numpy() if as_numpy else xywh
    back = xyxy2xywh(xywh2xyxy(boxes))
    np.testing.assert_allclose(np.asarray(back), xywh.numpy(), rtol=1e-5, atol=1e-4)
    assert type(back) is type(boxes)


def test_xywh2xyxy_values_and_no_mutation():
    box = torch.tensor([[10.0, 20.0, 4.0, 6.0]])
    original = box.clone()
    assert xywh2xyxy(box).tolist() == [[8.0, 17.0, 12.0, 23.0]]
    assert torch.equal(box, original)


def test_normalised_round_trip_with_padding():
    labels = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.1, 0.1]])
    pixels = xywhn2xyxy(labels, w=200, h=100, padw=3, padh=7)
    np.testing.assert_allclose(pixels[0], [80 + 3, 30 + 7, 120 + 3, 70 + 7])
    pixels[:, [0, 2]] -= 3
    pixels[:, [1, 3]] -= 7
    np.testing.assert_allclose(xyxy2xywhn(pixels, w=200, h=100), labels, atol=1e-12)


def test_xyxy2xywhn_clip():
    boxes = np.array([[-10.0, -5.0, 50.0, 120.0]])
    out = xyxy2xywhn(boxes, w=100, h=100, clip=True)
    np.testing.assert_allclose(out, [[0.25, 0.5, 0.5, 1.0]])
    assert boxes[0, 0] == -10.0  # input untouched


def test_clip_boxes_torch_and_numpy():
    boxes = torch.tensor([[-1.0, -2.0, 300.0, 50.0]])
    clip_boxes(boxes, (40, 200))
    assert boxes.tolist() == [[0.0, 0.0, 200.0, 40.0]]
    arr = np.array([[-1.0, -2.0, 300.0, 50.0]])
    assert clip_boxes(arr, (40, 200)).tolist() == [[0.0, 0.0, 200.0, 40.0]]


@pytest.mark.parametrize("img0_shape", [(300, 500), (500, 300), (640, 640)])
def test_scale_boxes_inverts_letterbox(img0_shape):
    img1_shape = (640, 640)
    h0, w0 = img0_shape
    gain = min(img1_shape[0] / h0, img1_shape[1] / w0)
    pad_w, pad_h = (img1_shape[1] - w0 * gain) / 2, (img1_shape[0] - h0 * gain) / 2
    original = torch.tensor([[10.0, 20.0, 100.0, 200.0], [0.0, 0.0, w0, h0]])
    letterboxed = original * gain + torch.tensor([pad_w, pad_h, pad_w, pad_h])
    restored = scale_boxes(img1_shape, letterboxed.clone(), img0_shape)
    torch.testing.assert_close(restored, original, atol=1e-3, rtol=0)
    with_ratio_pad = scale_boxes(img1_shape, letterboxed.clone(), img0_shape, ratio_pad=((gain, gain), (pad_w, pad_h)))
    torch.testing.assert_close(with_ratio_pad, original, atol=1e-3, rtol=0)


def test_scale_boxes_clips_to_original():
    out = scale_boxes((640, 640), torch.tensor([[-50.0, 0.0, 700.0, 640.0]]), (640, 640))
    assert out.tolist() == [[0.0, 0.0, 640.0, 640.0]]


# ---------------------------------------------------------------------------------------------- IoU family


def _reference_ious(b1, b2):
    """Plain-Python IoU, GIoU, DIoU, CIoU, EIoU of two xyxy boxes (the formulas from the papers)."""
    w1, h1, w2, h2 = b1[2] - b1[0], b1[3] - b1[1], b2[2] - b2[0], b2[3] - b2[1]
    inter = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0])) * max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]))
    union = w1 * h1 + w2 * h2 - inter
    iou = inter / union
    cw = max(b1[2], b2[2]) - min(b1[0], b2[0])
    ch = max(b1[3], b2[3]) - min(b1[1], b2[1])
    giou = iou - (cw * ch - union) / (cw * ch)
    rho2 = ((b1[0] + b1[2]) / 2 - (b2[0] + b2[2]) / 2) ** 2 + ((b1[1] + b1[3]) / 2 - (b2[1] + b2[3]) / 2) ** 2
    c2 = cw**2 + ch**2
    diou = iou - rho2 / c2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v / (1 - iou + v)
    ciou = diou - alpha * v
    eiou = iou - rho2 / c2 - (w1 - w2) ** 2 / cw**2 - (h1 - h2) ** 2 / ch**2
    return {"iou": iou, "giou": giou, "diou": diou, "ciou": ciou, "eiou": eiou}


BOX_PAIRS = [
    ((0.0, 0.0, 4.0, 2.0), (1.0, 1.0, 5.0, 4.0)),
    ((10.0, 10.0, 30.0, 50.0), (12.0, 5.0, 40.0, 45.0)),
    ((0.0, 0.0, 1.0, 1.0), (3.0, 3.0, 5.0, 6.0)),  # disjoint: IoU 0, penalties still informative
]


@pytest.mark.parametrize("iou_type", ["iou", "giou", "diou", "ciou", "eiou"])
@pytest.mark.parametrize("pair", BOX_PAIRS)
def test_bbox_iou_matches_hand_computation(iou_type, pair):
    b1, b2 = pair
    expected = _reference_ious(b1, b2)[iou_type]
    t1, t2 = torch.tensor([b1], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64)
    got_xyxy = bbox_iou(t1, t2, xywh=False, iou_type=iou_type)
    got_xywh = bbox_iou(xyxy2xywh(t1), xyxy2xywh(t2), xywh=True, iou_type=iou_type)
    assert got_xyxy.shape == (1,)
    assert got_xyxy.item() == pytest.approx(expected, abs=1e-6)
    assert got_xywh.item() == pytest.approx(expected, abs=1e-6)


def test_bbox_iou_broadcasts_and_agrees_with_box_iou():
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(6, 2, generator=generator) * 50
    boxes = torch.cat((xy, xy + torch.rand(6, 2, generator=generator) * 30 + 1), 1)
    pairwise = box_iou(boxes[:2], boxes)
    broadcast = bbox_iou(boxes[:2, None], boxes[None], xywh=False)
    torch.testing.assert_close(broadcast, pairwise, atol=1e-5, rtol=0)


def test_ciou_alpha_has_no_gradient():
    pred = torch.tensor([[1.0, 1.0, 3.0, 2.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1.5, 1.2, 2.0, 3.0]], dtype=torch.float64)
    bbox_iou(pred, target, iou_type="ciou").sum().backward()
    # Same expression with alpha frozen as a Python float must give the same gradient.
    ref = _reference_ious(xywh2xyxy(pred.detach())[0].tolist(), xywh2xyxy(target)[0].tolist())
    iou_value = ref["iou"]
    w1, h1, w2, h2 = 3.0, 2.0, 2.0, 3.0
    v_value = 4 / math.pi**2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2
    alpha = v_value / (1 - iou_value + v_value)
    pred2 = pred.detach().clone().requires_grad_(True)
    diou = bbox_iou(pred2, target, iou_type="diou")
    v = 4 / math.pi**2 * (torch.atan(target[:, 2] / target[:, 3]) - torch.atan(pred2[:, 2] / pred2[:, 3])) ** 2
    (diou - alpha * v).sum().backward()
    torch.testing.assert_close(pred.grad, pred2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("iou_type", ["iou", "giou", "diou", "ciou", "eiou"])
def test_identical_boxes_give_one(iou_type):
    generator = torch.Generator().manual_seed(2)
    boxes = torch.cat((torch.rand(200, 2, generator=generator), torch.rand(200, 2, generator=generator) * 8), 1)
    out = bbox_iou(boxes, boxes.clone(), xywh=True, iou_type=iou_type)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.ones(200), atol=1e-5, rtol=0)


def test_bbox_iou_rejects_unknown_type():
    with pytest.raises(ValueError, match="iou_type"):
        bbox_iou(torch.zeros(1, 4), torch.zeros(1, 4), iou_type="siou")


def test_box_ioa():
    box = np.array([0.0, 0.0, 10.0, 10.0])
    others = np.array([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 5.0, 5.0], [20.0, 20.0, 30.0, 30.0]])
    np.testing.assert_allclose(box_ioa(box, others), [0.25, 1.0, 0.0], atol=1e-6)
    pairwise = box_ioa(torch.tensor(others), torch.tensor(others))
    assert pairwise.shape == (3, 3)
    torch.testing.assert_close(pairwise.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- NMS


def _python_iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _brute_force_nms(pred, conf_thres, iou_thres, agnostic=False, max_det=300):
    """Reference: best class per box, then greedy suppression within each class (or across, if agnostic)."""
    rows = []
    for x, y, w, h, obj, *cls_probs in pred.tolist():
        if obj <= conf_thres:
            continue
        scores = [p * obj for p in cls_probs]
        best = max(range(len(scores)), key=lambda k: scores[k])
        if scores[best] > conf_thres:
            rows.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2, scores[best], float(best)])
    rows.sort(key=lambda r: -r[4])
    kept = []
    for row in rows:
        if all(_python_iou(row, k) <= iou_thres for k in kept if agnostic or k[5] == row[5]):
            kept.append(row)
    return kept[:max_det]


def _random_predictions(seed, bs=3, n=200, nc=4):
    rng = random.Random(seed)
    pred = torch.zeros(bs, n, 5 + nc)
    for b in range(bs):
        for i in range(n):
            pred[b, i, :4] = torch.tensor([rng.uniform(0, 320), rng.uniform(0, 320), rng.uniform(8, 80),
                                           rng.uniform(8, 80)])
            pred[b, i, 4:] = torch.tensor([rng.random() for _ in range(1 + nc)])
    return pred


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_nms_matches_brute_force(seed, agnostic):
    pred = _random_predictions(seed)
    output = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.45, agnostic=agnostic)
    assert len(output) == pred.shape[0]
    for image_pred, det in zip(pred, output, strict=True):
        expected = torch.tensor(_brute_force_nms(image_pred, 0.3, 0.45, agnostic)).view(-1, 6)
        assert det.shape == expected.shape
        torch.testing.assert_close(det, expected, atol=1e-4, rtol=1e-5)


def test_nms_many_boxes_class_by_class_matches_brute_force():
    """Above _PER_CLASS_NMS_FROM candidates NMS runs one class at a time: same boxes, same score order."""
    pred = _random_predictions(2, bs=1, n=1400, nc=3)
    det = non_max_suppression(pred, conf_thres=0.01, iou_thres=0.45, max_det=5000)[0]
    expected = torch.tensor(_brute_force_nms(pred[0], 0.01, 0.45, max_det=5000)).view(-1, 6)
    assert len(expected) > 300 and det.shape == expected.shape
    torch.testing.assert_close(det, expected, atol=1e-4, rtol=1e-5)


def test_nms_multi_label_keeps_every_class_above_threshold():
    # One box, classes 0 and 2 above threshold after multiplying by objectness 0.9.
    pred = torch.tensor([[[50.0, 50.0, 20.0, 20.0, 0.9, 0.8, 0.1, 0.5]]])
    multi = non_max_suppression(pred, conf_thres=0.25, multi_label=True)[0]
    assert sorted(multi[:, 5].tolist()) == [0.0, 2.0]
    torch.testing.assert_close(multi[:, 4], torch.tensor([0.72, 0.45]))
    single = non_max_suppression(pred, conf_thres=0.25, multi_label=False)[0]
    assert single[:, 5].tolist() == [0.0]
    torch.testing.assert_close(single[0, :4], torch.tensor([40.0, 40.0, 60.0, 60.0]))


def test_nms_multi_label_ignored_for_single_class():
    pred = torch.tensor([[[50.0, 50.0, 20.0, 20.0, 0.9, 0.8]]])
    out = non_max_suppression(pred, conf_thres=0.25, multi_label=True)[0]
    assert out.shape == (1, 6)


def test_nms_max_det_keeps_most_confident():
    n = 50
    pred = torch.zeros(1, n, 6)
    pred[0, :, 0] = torch.arange(n) * 100.0 + 50  # far apart: nothing is suppressed
    pred[0, :, 1] = 50
    pred[0, :, 2:4] = 20
    pred[0, :, 4] = torch.linspace(0.3, 0.99, n)
    pred[0, :, 5] = 1.0
    out = non_max_suppression(pred, conf_thres=0.25, max_det=5)[0]
    assert out.shape == (5, 6)
    torch.testing.assert_close(out[:, 4], torch.linspace(0.3, 0.99, n).flip(0)[:5])


def test_nms_classes_filter_and_class_awareness():
    # Two identical boxes, different classes: class-aware NMS keeps both, agnostic keeps one.
    pred = torch.tensor([[[50.0, 50.0, 20.0, 20.0, 0.9, 0.9, 0.0], [50.0, 50.0, 20.0, 20.0, 0.8, 0.0, 0.9]]])
    assert non_max_suppression(pred)[0].shape[0] == 2
    assert non_max_suppression(pred, agnostic=True)[0].shape[0] == 1
    only_one = non_max_suppression(pred, classes=[1])[0]
    assert only_one[:, 5].tolist() == [1.0]


def test_nms_empty_and_tuple_input():
    pred = torch.rand(2, 10, 7) * 0.1  # every objectness below 0.25
    out = non_max_suppression((pred, None))
    assert [o.shape for o in out] == [(0, 6), (0, 6)]
