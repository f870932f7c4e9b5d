"""Tests for utils/evaluation/metrics.py against independent computations (pure Python AP, pycocotools COCOeval)."""

from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import pytest
import torch

from utils.evaluation.metrics import (
    ConfusionMatrix,
    DetectionMetricsAccumulator,
    ap_per_class,
    classification_accuracy,
    compute_ap,
    fitness,
    match_predictions,
    plot_mc_curve,
    plot_pr_curve,
    smooth,
)

IOUV = torch.linspace(0.5, 0.95, 10)

# ---------------------------------------------------------------------------------------------- matching


def test_match_predictions_most_confident_qualifying_detection_wins():
    # v7.0 dedups on the label after dedup on the detection without re-sorting by IoU, so among the
    # detections that pass a threshold the label goes to the lowest index: with NMS output (sorted by
    # confidence) that is the most confident one, as in COCO.
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0]])
    detections = torch.tensor([
        [0.0, 0.0, 10.0, 9.0, 0.9, 0.0],  # IoU 0.9, most confident
        [0.0, 0.0, 10.0, 10.0, 0.8, 0.0],  # IoU 1.0: only wins where 0.9 is not enough (threshold 0.95)
        [0.0, 0.0, 10.0, 10.0, 0.7, 1.0],  # wrong class, never correct
    ])
    correct = match_predictions(detections, labels, IOUV)
    assert correct.shape == (3, 10) and correct.dtype == torch.bool
    assert correct[0].tolist() == [True] * 9 + [False]
    assert correct[1].tolist() == [False] * 9 + [True]
    assert not correct[2].any()


def test_match_predictions_thresholds():
    labels = torch.tensor([[2.0, 0.0, 0.0, 10.0, 10.0]])
    detections = torch.tensor([[0.0, 0.0, 10.0, 6.2, 0.5, 2.0]])  # IoU 0.62
    correct = match_predictions(detections, labels, IOUV)
    assert correct[0].tolist() == [True, True, True] + [False] * 7


def test_match_predictions_one_to_one_with_two_labels():
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0], [0.0, 20.0, 0.0, 30.0, 10.0]])
    detections = torch.tensor([[20.0, 0.0, 30.0, 10.0, 0.9, 0.0], [0.0, 0.0, 10.0, 8.0, 0.8, 0.0],
                               [0.0, 0.0, 10.0, 10.0, 0.7, 0.0]])
    correct = match_predictions(detections, labels, torch.tensor([0.5]))
    assert correct[:, 0].tolist() == [True, True, False]  # each label matched once; duplicate is a FP


def test_match_predictions_empty():
    assert match_predictions(torch.zeros(0, 6), torch.zeros(2, 5), IOUV).shape == (0, 10)
    assert not match_predictions(torch.ones(3, 6), torch.zeros(0, 5), IOUV).any()


# ---------------------------------------------------------------------------------------------- AP


def _interp(x, xp, fp):
    """Piecewise-linear interpolation for non-decreasing xp, plain Python, np.interp's tie rule.

    Where xp repeats a value (a recall step in the envelope) the LAST point with xp <= x is used, so at
    x = 1 the end sentinel (recall 1, precision 0) wins; this is why v7.0 reports AP 0.995, not 1, for a
    perfect detector.
    """
    last = max(k for k in range(len(xp)) if xp[k] <= x)
    if last == len(xp) - 1:
        return fp[-1]
    return fp[last] + (fp[last + 1] - fp[last]) * (x - xp[last]) / (xp[last + 1] - xp[last])


def _reference_ap(ranked_tp, n_gt):
    """101-point interpolated AP: sentinel-padded monotone precision envelope, trapezoid rule."""
    tp_cum = fp_cum = 0
    recall, precision = [0.0], [1.0]
    for hit in ranked_tp:
        tp_cum += hit
        fp_cum += 1 - hit
        recall.append(tp_cum / n_gt)
        precision.append(tp_cum / (tp_cum + fp_cum))
    recall.append(1.0)
    precision.append(0.0)
    for k in range(len(precision) - 2, -1, -1):
        precision[k] = max(precision[k], precision[k + 1])
    xs = [k / 100 for k in range(101)]
    ys = [_interp(x, recall, precision) for x in xs]
    return sum((ys[k] + ys[k + 1]) / 2 * (xs[k + 1] - xs[k]) for k in range(100))


@pytest.mark.parametrize(("ranked_tp", "n_gt"), [
    ([1, 0, 1, 1, 0], 3),
    ([0, 1, 1, 0, 0, 1, 0], 7),
    ([1, 1, 1], 3),
    ([0, 0, 1], 3),
])
def test_compute_ap_matches_pure_python(ranked_tp, n_gt):
    tp = np.array(ranked_tp, dtype=float)
    recall, precision = np.cumsum(tp) / n_gt, np.cumsum(tp) / np.arange(1, len(tp) + 1)
    ap, _, _ = compute_ap(recall, precision)
    assert ap == pytest.approx(_reference_ap(ranked_tp, n_gt), abs=1e-9)


def test_perfect_ranking_gives_v7_ap_0995():
    # Last trapezoid of the 101-point grid averages precision 1 and the end sentinel 0 (v7.0 behaviour).
    ap, _, _ = compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))
    assert ap == pytest.approx(0.995)


def test_ap_per_class_known_ranking():
    # Class 0: 3 labels, detections ranked TP, FP, TP. Class 1: 2 labels, one TP. Class 2: no detections.
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    pred_cls = np.array([0, 0, 0, 1])
    tp = np.array([[1, 1], [0, 0], [1, 0], [1, 1]], dtype=bool)
    target_cls = np.array([0, 0, 0, 1, 1, 2])
    order = [3, 0, 2, 1]  # shuffled input order must not matter
    result = ap_per_class(tp[order], conf[order], pred_cls[order], target_cls)
    assert result.classes.tolist() == [0, 1, 2]
    assert result.ap.shape == (3, 2)
    assert result.ap[0, 0] == pytest.approx(_reference_ap([1, 0, 1], 3))
    assert result.ap[0, 1] == pytest.approx(_reference_ap([1, 0, 0], 3))
    assert result.ap[1, 0] == pytest.approx(_reference_ap([1], 2))
    assert result.ap[2].tolist() == [0.0, 0.0]
    assert result.map50 == pytest.approx(result.ap[:, 0].mean())
    assert result.map == pytest.approx(result.ap.mean())
    assert result.p.shape == result.r.shape == result.f1.shape == (3,)
    assert result.p_curve.shape == (3, 1000)


def test_ap_per_class_p_r_at_best_f1():
    # Single class, all detections correct: P=R=1 up to the lowest confidence, so best-F1 P and R are 1.
    conf = np.linspace(0.95, 0.5, 10)
    result = ap_per_class(np.ones((10, 1), bool), conf, np.zeros(10), np.zeros(10))
    assert result.p[0] == pytest.approx(1.0) and result.r[0] == pytest.approx(1.0, abs=1e-6)
    assert result.tp[0] == 10 and result.fp[0] == 0
    assert result.ap[0, 0] == pytest.approx(0.995)


def test_smooth():
    y = np.array([0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(smooth(y, 0.3), [0, 0, 1, 1, 1, 0, 0])  # nf = 3
    ramp = np.linspace(0, 1, 1000)
    out = smooth(ramp, 0.1)  # nf = 101, edges padded with the end values
    assert out.shape == ramp.shape
    np.testing.assert_allclose(out[500], ramp[450:551].mean())
    assert out[0] == pytest.approx((51 * 0 + ramp[1:51].sum()) / 101)
    np.testing.assert_allclose(smooth(np.full(50, 0.7), 0.1), 0.7)


# ---------------------------------------------------------------------------------------------- COCO cross-check


def _synthetic_dataset(seed=0, n_images=30, nc=3, miss_rate=0.15, jitter=0.12):
    """Ground truth and noisy detections (jittered boxes, missed/misclassified objects, false positives).

    All objects are large, so COCO's 'all' area range with maxDets 100 sees every box.
    """
    rng = random.Random(seed)
    gts, dets = {}, {}
    for image in range(n_images):
        gts[image], dets[image] = [], []
        for _ in range(rng.randint(1, 6)):
            cls = rng.randrange(nc)
            x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 400), rng.uniform(100, 230), rng.uniform(100, 230)
            gts[image].append((cls, x, y, x + w, y + h))
            if rng.random() >= miss_rate:
                noise = [rng.gauss(0, jitter) * s for s in (w, h, w, h)]
                box = (x + noise[0], y + noise[1], x + w + noise[2], y + h + noise[3])
                wrong = rng.random() < miss_rate
                dets[image].append((*box, rng.uniform(0.2, 1.0), (cls + 1) % nc if wrong else cls))
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 400), rng.uniform(0, 400)
            dets[image].append((x, y, x + rng.uniform(100, 200), y + rng.uniform(100, 200), rng.uniform(0.05, 0.8),
                                rng.randrange(nc)))
    return gts, dets


def _evaluate_ours(gts, dets, nc):
    """Our pipeline; detections sorted by confidence per image, as NMS returns them."""
    accumulator = DetectionMetricsAccumulator(nc)
    for image in gts:
        detections = sorted(dets[image], key=lambda d: -d[4])
        accumulator.update(torch.tensor(detections).view(-1, 6), torch.tensor(gts[image]).view(-1, 5))
    return accumulator.compute()


def _coco_eval(gts, dets, nc):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image, labels in gts.items():
        images.append({"id": image, "width": 640, "height": 640})
        for cls, x1, y1, x2, y2 in labels:
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": cls, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for x1, y1, x2, y2, conf, cls in dets[image]:
            results.append({"image_id": image, "category_id": cls, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": conf})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations,
                           "categories": [{"id": k, "name": str(k)} for k in range(nc)]}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, 2]  # iou x recall x class, area 'all', maxDets 100
    recall = evaluator.eval["recall"][:, :, 0, 2]  # iou x class: highest recall reached
    return precision.mean(1).T, recall.T, precision  # every class has labels, so no -1 entries


@pytest.mark.parametrize("seed", [0, 1])
def test_map50_agrees_with_pycocotools_when_every_object_is_found(seed):
    # Small jitter and no misses: recall reaches 1 at IoU 0.5 for every class, so the only differences
    # are COCO's step envelope + plain mean vs v7.0's linear interpolation + trapezoid, and matching order.
    nc = 3
    gts, dets = _synthetic_dataset(seed=seed, nc=nc, miss_rate=0.0, jitter=0.03)
    metrics = _evaluate_ours(gts, dets, nc)
    coco_ap, coco_recall, _ = _coco_eval(gts, dets, nc)
    assert np.all(coco_recall[:, 0] == 1.0)
    np.testing.assert_allclose(metrics["result"].ap[:, 0], coco_ap[:, 0], atol=1e-2)
    assert metrics["mAP50"] == pytest.approx(coco_ap[:, 0].mean(), abs=1e-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map50_vs_pycocotools_with_missed_objects(seed):
    # With missed objects v7.0's AP is higher than COCO's: its envelope ends with the sentinel point
    # (recall 1, precision 0) and np.interp draws a straight line to it from the last detection, whose
    # precision is the final one (all detections of the class counted). That credits the triangle
    # 0.5 * p_final * (1 - max_recall), which COCO counts as 0. Adding it to COCO's AP, the two agree
    # like in the no-miss case.
    nc = 3
    gts, dets = _synthetic_dataset(seed=seed, nc=nc)
    metrics = _evaluate_ours(gts, dets, nc)
    ours = metrics["result"].ap  # class x 10 IoU thresholds
    coco_ap, coco_recall, _ = _coco_eval(gts, dets, nc)
    n_labels = np.bincount([g[0] for labels in gts.values() for g in labels], minlength=nc)[:, None]
    n_dets = np.bincount([d[5] for image_dets in dets.values() for d in image_dets], minlength=nc)[:, None]
    p_final = coco_recall * n_labels / n_dets
    triangle = 0.5 * p_final * (1 - coco_recall)
    assert np.all(coco_recall[:, 0] < 1) and np.all(ours[:, 0] > coco_ap[:, 0])
    np.testing.assert_allclose(ours, coco_ap + triangle, atol=1e-2)  # every IoU threshold, so mAP50-95 too
    assert metrics["mAP50-95"] == pytest.approx((coco_ap + triangle).mean(), abs=5e-3)


# ---------------------------------------------------------------------------------------------- accumulator


def test_accumulator_perfect_and_empty():
    accumulator = DetectionMetricsAccumulator(nc=2)
    labels = torch.tensor([[0.0, 10, 10, 50, 50], [1.0, 100, 100, 150, 170]])
    detections = torch.cat((labels[:, 1:], torch.tensor([[0.9], [0.8]]), labels[:, :1]), 1)
    correct = accumulator.update(detections, labels)
    assert correct.all()
    accumulator.update(torch.zeros(0, 6), torch.tensor([[1.0, 0, 0, 20, 20]]))  # missed object
    metrics = accumulator.compute()
    assert metrics["n_images"] == 2 and metrics["n_labels"] == 3
    assert metrics["per_class"][0]["AP50"] == pytest.approx(0.995)
    assert metrics["per_class"][1]["R"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["per_class"][1]["n_labels"] == 2
    assert fitness(metrics) == pytest.approx(0.1 * metrics["mAP50"] + 0.9 * metrics["mAP50-95"])
    empty = DetectionMetricsAccumulator(nc=2).compute()
    assert empty["mAP50"] == 0.0 and empty["per_class"] == {}


def test_accumulator_plots(tmp_path):
    gts, dets = _synthetic_dataset(n_images=5)
    accumulator = DetectionMetricsAccumulator(3)
    for image in gts:
        accumulator.update(torch.tensor(dets[image]).view(-1, 6), torch.tensor(gts[image]).view(-1, 5))
    accumulator.compute(names={0: "a", 1: "b", 2: "c"}, plot_dir=tmp_path)
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_fitness_array_and_rows():
    assert fitness([0.5, 0.5, 0.6, 0.4]) == pytest.approx(0.06 + 0.36)
    np.testing.assert_allclose(fitness(np.array([[1, 1, 1, 1], [0, 0, 0.5, 0.0]])), [1.0, 0.05])


# ---------------------------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_counts(tmp_path):
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0.0, 0, 0, 10, 10], [1.0, 20, 20, 30, 30], [1.0, 50, 50, 60, 60]])
    detections = torch.tensor([
        [0.0, 0.0, 10.0, 10.0, 0.9, 0.0],  # correct class 0
        [20.0, 20.0, 30.0, 30.0, 0.8, 0.0],  # label 1 predicted as 0
        [80.0, 80.0, 90.0, 90.0, 0.7, 1.0],  # false positive -> background column
        [50.0, 50.0, 60.0, 60.0, 0.1, 1.0],  # below conf: label 2 is missed -> background row
    ])
    cm.process_batch(detections, labels)
    expected = np.array([[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    cm.process_batch(None, torch.tensor([[0.0, 0, 0, 5, 5]]))
    assert cm.matrix[2, 0] == 1
    cm.process_batch(None, torch.tensor([0.0]))  # v7.0 style: class vector only
    assert cm.matrix[2, 0] == 2
    cm.matrix[2, 0] = 1
    # Unmatched detections count as false positives even if nothing in the image matched.
    cm.process_batch(torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.9, 1.0]]), torch.zeros(0, 5))
    assert cm.matrix[1, 2] == 2
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 2]
    path = cm.plot(tmp_path / "confusion_matrix.png", names=["a", "b"])
    assert path.stat().st_size > 1000


def test_plot_functions_write_png(tmp_path):
    px = np.linspace(0, 1, 1000)
    py = np.stack((px, 1 - px))
    plot_pr_curve(px, py, np.array([[0.5] * 10, [0.4] * 10]), tmp_path / "pr.png", names=["a", "b"])
    plot_mc_curve(px, py, tmp_path / "f1.png", names=["a", "b"], ylabel="F1")
    assert (tmp_path / "pr.png").exists() and (tmp_path / "f1.png").exists()


# ---------------------------------------------------------------------------------------------- classification


def test_classification_accuracy_with_missing_labels():
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    targets = torch.tensor([0, 1, 2, -1])  # last one has no label
    acc = classification_accuracy(logits, targets, topk=(1, 2, 5))
    assert acc["top1"] == pytest.approx(1 / 3)
    assert acc["top2"] == pytest.approx(2 / 3)
    assert acc["top5"] == pytest.approx(1.0)  # k clamped to the 3 classes
    assert classification_accuracy(logits, torch.full((4,), -1)) == {"top1": 0.0, "top5": 0.0}


def _v7_process_batch(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> np.ndarray:
    """YOLOv5 v7.0's val.py matching written out with torchvision's box_iou, for comparison."""
    from torchvision.ops import box_iou as tv_box_iou

    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    iou = tv_box_iou(labels[:, 1:], detections[:, :4])
    correct_class = labels[:, 0:1] == detections[:, 5]
    for i in range(len(iouv)):
        x = torch.where((iou >= iouv[i]) & correct_class)
        if x[0].shape[0]:
            matches = torch.cat((torch.stack(x, 1), iou[x[0], x[1]][:, None]), 1).numpy()
            if x[0].shape[0] > 1:
                matches = matches[matches[:, 2].argsort()[::-1]]
                matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
                matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
            correct[matches[:, 1].astype(int), i] = True
    return correct


@pytest.mark.parametrize("seed", range(5))
def test_match_predictions_equals_v7_torch_matching_on_random_scenes(seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=gen) * 100
    labels = torch.cat((torch.randint(0, 3, (12, 1), generator=gen).float(), centres - 8, centres + 8), 1)
    # detections: jittered copies of the labels (several per label) plus noise boxes, random classes
    jitter = labels[torch.randint(0, 12, (60,), generator=gen), 1:] + torch.randn(60, 4, generator=gen) * 2.5
    noise_xy = torch.rand(20, 2, generator=gen) * 100
    boxes = torch.cat((jitter, torch.cat((noise_xy, noise_xy + 10), 1)))
    conf = torch.rand(80, 1, generator=gen)
    cls = torch.randint(0, 3, (80, 1), generator=gen).float()
    detections = torch.cat((boxes, conf, cls), 1)[conf.view(-1).argsort(descending=True)]
    ours = match_predictions(detections, labels, IOUV).numpy()
    assert ours.any() and not ours.all()
    np.testing.assert_array_equal(ours, _v7_process_batch(detections, labels, IOUV))
    np.testing.assert_array_equal(match_predictions(detections.numpy(), labels.numpy(), IOUV).numpy(), ours)
