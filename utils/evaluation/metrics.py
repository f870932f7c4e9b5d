"""Detection and classification metrics with YOLOv5 v7.0 semantics, plus their plots.

Validation flow: for every image call :meth:`DetectionMetricsAccumulator.update` with NMS output and
labels in the same pixel space, then :meth:`DetectionMetricsAccumulator.compute` once. Plots use the Agg
backend chosen inside the plotting functions, so importing this module has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from utils.common.boxes import box_iou

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 only has trapz
FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9)  # P, R, mAP@.5, mAP@.5:.95
_CURVE_POINTS = 1000


def _unique_matches(matches: np.ndarray) -> np.ndarray:
    """Reduce (label, detection, iou) candidate rows to one-to-one matches, v7.0 order of operations.

    Rows are sorted by IoU descending, then deduplicated on the detection column, then on the label column
    (np.unique keeps the first occurrence in its own sorted order, which is what v7.0 does).
    """
    if matches.shape[0] > 1:
        matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
        matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
        matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
    return matches


def _float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float32 NumPy view of ``x`` (a copy only where the device or dtype requires one)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.asarray(array, dtype=np.float32)


def match_predictions(detections: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                      iouv: torch.Tensor) -> torch.Tensor:
    """Which detections are true positives at each IoU threshold (v7.0 ``process_batch``).

    Args:
        detections: ``n x 6`` (x1, y1, x2, y2, conf, cls).
        labels: ``m x 5`` (cls, x1, y1, x2, y2) in the same coordinates.
        iouv: IoU thresholds, e.g. ``torch.linspace(0.5, 0.95, 10)``.

    A (label, detection) pair qualifies when the classes agree and IoU >= threshold (v7.0 uses >=). Computed
    in float32 NumPy (the same arithmetic as v7.0's torch code; per image the arrays are tiny and NumPy's
    per-call cost is far below torch's). Returns a bool tensor ``n x len(iouv)`` on ``iouv``'s device.
    """
    detections, labels = _float32(detections), _float32(labels)
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if detections.shape[0] and labels.shape[0]:
        iou = box_iou(labels[:, 1:], detections[:, :4])
        iou[labels[:, 0:1] != detections[:, 5]] = 0.0  # thresholds are >= 0.5, so 0 never qualifies
        for k, threshold in enumerate(iouv.tolist()):
            label_idx, det_idx = np.nonzero(iou >= np.float32(threshold))
            if label_idx.shape[0]:
                matches = np.stack((label_idx, det_idx, iou[label_idx, det_idx]), 1)
                matches = _unique_matches(matches)
                correct[matches[:, 1].astype(int), k] = True
    return torch.from_numpy(correct).to(iouv.device)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box filter covering a fraction ``f`` of the curve, edges padded with the end values (v7.0)."""
    nf = round(len(y) * f * 2) // 2 + 1  # odd number of filter elements
    pad = np.ones(nf // 2)
    padded = np.concatenate((pad * y[0], y, pad * y[-1]), 0)
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """COCO-style 101-point interpolated AP of one class at one IoU threshold.

    Returns AP and the sentinel-padded, monotone precision envelope with its recall axis (for PR plots).
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    ap = float(_trapezoid(np.interp(x, mrec, mpre), x))
    return ap, mpre, mrec


@dataclass
class APResult:
    """Output of :func:`ap_per_class`; per-class arrays are ordered like ``classes``."""

    tp: np.ndarray  # true positives at the best-F1 confidence
    fp: np.ndarray
    p: np.ndarray
    r: np.ndarray
    f1: np.ndarray
    ap: np.ndarray  # n_classes x n_iou
    classes: np.ndarray  # class ids present in the targets
    px: np.ndarray = field(default_factory=lambda: np.linspace(0, 1, _CURVE_POINTS))  # confidence / recall axis
    pr_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, _CURVE_POINTS)))  # precision vs recall
    p_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, _CURVE_POINTS)))  # vs confidence
    r_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, _CURVE_POINTS)))
    f1_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, _CURVE_POINTS)))

    @property
    def map50(self) -> float:
        return float(self.ap[:, 0].mean()) if self.ap.size else 0.0

    @property
    def map(self) -> float:
        return float(self.ap.mean(1).mean()) if self.ap.size else 0.0

    @property
    def mp(self) -> float:
        return float(self.p.mean()) if self.p.size else 0.0

    @property
    def mr(self) -> float:
        return float(self.r.mean()) if self.r.size else 0.0


def ap_per_class(
    tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray, eps: float = 1e-16
) -> APResult:
    """Per-class AP at every IoU threshold plus P/R/F1 at the confidence maximising mean F1 (v7.0).

    Args:
        tp: ``n x n_iou`` bool/0-1 true-positive flags of all detections of the data set.
        conf: ``n`` detection confidences.
        pred_cls: ``n`` predicted classes.
        target_cls: class of every ground-truth object.
    """
    tp = np.asarray(tp, dtype=np.float64)
    if tp.ndim == 1:
        tp = tp[:, None]
    conf, pred_cls, target_cls = (np.asarray(a).reshape(-1) for a in (conf, pred_cls, target_cls))
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, n_labels = np.unique(target_cls, return_counts=True)
    nc = classes.shape[0]
    px = np.linspace(0, 1, _CURVE_POINTS)
    ap, p_curve, r_curve = np.zeros((nc, tp.shape[1])), np.zeros((nc, _CURVE_POINTS)), np.zeros((nc, _CURVE_POINTS))
    pr_curve = np.zeros((nc, _CURVE_POINTS))
    for ci, cls in enumerate(classes):
        is_cls = pred_cls == cls
        if not is_cls.any():
            continue
        tpc = tp[is_cls].cumsum(0)
        fpc = (1 - tp[is_cls]).cumsum(0)
        recall = tpc / (n_labels[ci] + eps)
        precision = tpc / (tpc + fpc)
        # Curves against confidence; np.interp needs increasing x, hence the negation.
        r_curve[ci] = np.interp(-px, -conf[is_cls], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-px, -conf[is_cls], precision[:, 0], left=1)
        for k in range(tp.shape[1]):
            ap[ci, k], mpre, mrec = compute_ap(recall[:, k], precision[:, k])
            if k == 0:
                pr_curve[ci] = np.interp(px, mrec, mpre)

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(smooth(f1_curve.mean(0), 0.1).argmax()) if nc else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_count = (r * n_labels).round()
    fp_count = (tp_count / (p + eps) - tp_count).round()
    return APResult(tp_count, fp_count, p, r, f1, ap, classes.astype(int), px, pr_curve, p_curve, r_curve, f1_curve)


def fitness(metrics: Mapping[str, float] | np.ndarray | Sequence[float]) -> float | np.ndarray:
    """Model selection score 0.1 * mAP@.5 + 0.9 * mAP@.5:.95 (P and R weigh 0, kept for v7.0 layout).

    Accepts the dict from :meth:`DetectionMetricsAccumulator.compute` or an array whose last axis starts with
    (P, R, mAP@.5, mAP@.5:.95); arrays of several rows give one score per row.
    """
    if isinstance(metrics, Mapping):
        values = [metrics.get(key, 0.0) for key in ("P", "R", "mAP50", "mAP50-95")]
        return float(np.dot(values, FITNESS_WEIGHTS))
    arr = np.asarray(metrics, dtype=np.float64)
    score = (arr[..., :4] * np.asarray(FITNESS_WEIGHTS)).sum(-1)
    return float(score) if score.ndim == 0 else score


class DetectionMetricsAccumulator:
    """Collects per-image matching statistics during validation and reduces them to mAP once at the end."""

    def __init__(self, nc: int, iouv: torch.Tensor | None = None):
        self.nc = nc
        self.iouv = torch.linspace(0.5, 0.95, 10) if iouv is None else iouv.cpu()
        self.stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_images = 0

    def update(self, detections: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add one image: ``detections`` n x 6 (xyxy, conf, cls), ``labels`` m x 5 (cls, xyxy).

        Returns the ``n x n_iou`` correctness matrix so callers can reuse it (e.g. for JSON export).
        """
        detections, labels = _float32(detections), _float32(labels)
        correct = match_predictions(detections, labels, self.iouv)
        self.add_stats(correct.numpy(), detections[:, 4], detections[:, 5], labels[:, 0])
        return correct

    def add_stats(self, correct: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray) -> None:
        """Add already-matched statistics of one image (v7.0 ``stats`` tuple layout)."""
        self.n_images += 1
        self.stats.append((np.asarray(correct, bool), np.asarray(conf), np.asarray(pred_cls), np.asarray(target_cls)))

    def _concatenated(self) -> tuple[np.ndarray, ...]:
        if not self.stats:
            return np.zeros((0, len(self.iouv)), bool), np.zeros(0), np.zeros(0), np.zeros(0)
        return tuple(np.concatenate(column, 0) for column in zip(*self.stats, strict=True))

    def compute(self, names: Mapping[int, str] | None = None, plot_dir: str | Path | None = None) -> dict[str, Any]:
        """Reduce to ``{P, R, mAP50, mAP50-95, n_images, n_labels, per_class, result}``.

        Per-class entries exist for every class seen in the labels; the means are over those classes only
        (v7.0). With no true positives at all every metric is 0, as in v7.0 val.py.
        """
        correct, conf, pred_cls, target_cls = self._concatenated()
        n_labels = np.bincount(target_cls.astype(int), minlength=self.nc)
        out: dict[str, Any] = {"P": 0.0, "R": 0.0, "mAP50": 0.0, "mAP50-95": 0.0, "n_images": self.n_images,
                               "n_labels": int(n_labels.sum()), "per_class": {}, "result": None}
        if not (correct.shape[0] and correct.any()):
            return out
        result = ap_per_class(correct, conf, pred_cls, target_cls)
        out.update({"P": result.mp, "R": result.mr, "mAP50": result.map50, "mAP50-95": result.map, "result": result})
        for k, cls in enumerate(result.classes):
            out["per_class"][int(cls)] = {"P": float(result.p[k]), "R": float(result.r[k]),
                                          "AP50": float(result.ap[k, 0]), "AP50-95": float(result.ap[k].mean()),
                                          "n_labels": int(n_labels[cls])}
        if plot_dir is not None:
            self.plot(result, Path(plot_dir), names or {})
        return out

    @staticmethod
    def plot(result: APResult, save_dir: Path, names: Mapping[int, str]) -> None:
        """Write the PR curve and F1/P/R-confidence curves like v7.0 (PR_curve.png, F1_curve.png, ...)."""
        for fn, args in DetectionMetricsAccumulator.plot_jobs(result, save_dir, names):
            fn(*args)

    @staticmethod
    def plot_jobs(result: APResult, save_dir: Path, names: Mapping[int, str]) -> list[tuple[Any, tuple]]:
        """The curve plots as ``(function, args)`` pairs, so that callers can draw them in parallel."""
        save_dir.mkdir(parents=True, exist_ok=True)
        class_names = [names.get(int(c), str(int(c))) for c in result.classes]
        jobs: list[tuple[Any, tuple]] = [
            (plot_pr_curve, (result.px, result.pr_curve, result.ap, save_dir / "PR_curve.png", class_names))]
        curves = ((result.f1_curve, "F1", "F1"), (result.p_curve, "P", "Precision"), (result.r_curve, "R", "Recall"))
        for curve, prefix, label in curves:
            jobs.append((plot_mc_curve, (result.px, curve, save_dir / f"{prefix}_curve.png", class_names,
                                         "Confidence", label)))
        return jobs


class ConfusionMatrix:
    """Detection confusion matrix, rows = predicted class, columns = true class, last row/col = background.

    v7.0 semantics (IoU > ``iou_thres``, detections above ``conf``), except that unmatched detections count
    as background false positives even when an image has no match at all (v7.0 skipped them then).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1))

    def process_batch(self, detections: torch.Tensor | np.ndarray | None, labels: torch.Tensor | np.ndarray) -> None:
        """Add one image: ``detections`` n x 6 (xyxy, conf, cls) or None, ``labels`` m x 5 (cls, xyxy).

        With no detections ``labels`` may also be the 1-D class vector (v7.0 val.py passes that).
        """
        labels = _float32(labels)
        if detections is None or not detections.shape[0]:
            gt_classes = (labels if labels.ndim == 1 else labels.reshape(-1, 5)[:, 0]).astype(int)
            np.add.at(self.matrix, (self.nc, gt_classes), 1)
            return
        labels = labels.reshape(-1, 5)
        gt_classes = labels[:, 0].astype(int)
        detections = _float32(detections)
        detections = detections[detections[:, 4] > self.conf]
        det_classes = detections[:, 5].astype(int)
        matches = np.zeros((0, 3))
        if labels.shape[0] and detections.shape[0]:
            iou = box_iou(labels[:, 1:], detections[:, :4])
            label_idx, det_idx = np.nonzero(iou > self.iou_thres)
            if label_idx.shape[0]:
                matches = self._one_to_one(np.stack((label_idx, det_idx, iou[label_idx, det_idx]), 1))
        matched_labels, matched_dets = matches[:, 0].astype(int), matches[:, 1].astype(int)
        np.add.at(self.matrix, (det_classes[matched_dets], gt_classes[matched_labels]), 1)
        missed = np.setdiff1d(np.arange(len(gt_classes)), matched_labels)
        np.add.at(self.matrix, (self.nc, gt_classes[missed]), 1)
        spurious = np.setdiff1d(np.arange(len(det_classes)), matched_dets)
        np.add.at(self.matrix, (det_classes[spurious], self.nc), 1)

    @staticmethod
    def _one_to_one(matches: np.ndarray) -> np.ndarray:
        """Highest-IoU one-to-one (label, detection) pairs (v7.0 re-sorts before the label dedup here)."""
        if matches.shape[0] > 1:
            matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
            matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
            matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
            matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
        return matches

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class true and false positives (background column excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, save_path: str | Path, names: Sequence[str] = (), normalize: bool = True) -> Path:
        """Save the matrix as a PNG (columns normalised to sum 1 by default) and return its path."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        array = self.matrix / ((self.matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
        array[array < 0.005] = np.nan  # leave near-empty cells blank
        labels = list(names) if len(names) == self.nc else [str(i) for i in range(self.nc)]
        labels = [*labels, "background"]
        fig = Figure(figsize=(12, 9), tight_layout=True)
        ax = fig.subplots()
        image = ax.imshow(array, cmap="Blues", vmin=0.0)
        fig.colorbar(image, ax=ax)
        if self.nc < 30:  # tick labels and cell values become unreadable beyond that
            ax.set_xticks(range(self.nc + 1), labels, rotation=90)
            ax.set_yticks(range(self.nc + 1), labels)
            for (row, col), value in np.ndenumerate(array):
                if not np.isnan(value):
                    ax.text(col, row, f"{value:.2f}" if normalize else f"{value:.0f}", ha="center", va="center",
                            fontsize=8)
        ax.set_xlabel("True")
        ax.set_ylabel("Predicted")
        ax.set_title("Confusion Matrix")
        save_path = Path(save_path)
        save_figure(fig, save_path)
        return save_path


PLOT_DPI = 150  # 1350 x 900 px curves: sharp enough to read, ~3x cheaper to render and encode than 250


def save_figure(fig: Figure, path: Path) -> None:
    """PNG with light zlib compression: encoding at the default level costs more than drawing the plot."""
    fig.savefig(path, dpi=PLOT_DPI, pil_kwargs={"compress_level": 1})


def _new_figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), tight_layout=True)
    return fig, fig.subplots()


def plot_pr_curve(px: np.ndarray, py: np.ndarray, ap: np.ndarray, save_path: str | Path,
                  names: Sequence[str] = ()) -> Path:
    """Precision-recall curve per class (``py``: n_classes x len(px)) and their mean, AP@0.5 in the legend."""
    fig, ax = _new_figure()
    py = np.asarray(py)
    show_legend = 0 < len(names) < 21
    for k, curve in enumerate(py):
        label = f"{names[k]} {ap[k, 0]:.3f}" if show_legend and k < len(names) else None
        ax.plot(px, curve, linewidth=1, label=label, color="grey" if label is None else None)
    if py.shape[0]:
        ax.plot(px, py.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    _finish_axes(ax, "Recall", "Precision", "Precision-Recall Curve")
    save_path = Path(save_path)
    save_figure(fig, save_path)
    return save_path


def plot_mc_curve(px: np.ndarray, py: np.ndarray, save_path: str | Path, names: Sequence[str] = (),
                  xlabel: str = "Confidence", ylabel: str = "Metric") -> Path:
    """Metric-vs-confidence curve per class plus the smoothed class mean with its maximum marked."""
    fig, ax = _new_figure()
    py = np.asarray(py)
    show_legend = 0 < len(names) < 21
    for k, curve in enumerate(py):
        label = names[k] if show_legend and k < len(names) else None
        ax.plot(px, curve, linewidth=1, label=label, color="grey" if label is None else None)
    if py.shape[0]:
        mean = smooth(py.mean(0), 0.05)
        best = int(mean.argmax())
        ax.plot(px, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {px[best]:.3f}")
    _finish_axes(ax, xlabel, ylabel, f"{ylabel}-{xlabel} Curve")
    save_path = Path(save_path)
    save_figure(fig, save_path)
    return save_path


def _finish_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")


def classification_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy over samples whose target is not -1 (multi-head data sets mark missing labels so).

    ``k`` larger than the number of classes is clamped. With no labelled sample every accuracy is 0.0.
    Returns ``{"top1": ..., "top5": ...}`` as fractions in [0, 1].
    """
    labelled = targets != -1
    logits, targets = logits[labelled], targets[labelled]
    if not targets.numel():
        return {f"top{k}": 0.0 for k in topk}
    max_k = min(max(topk), logits.shape[-1])
    hits = logits.topk(max_k, dim=1).indices == targets.view(-1, 1)  # n x max_k, at most one True per row
    return {f"top{k}": float(hits[:, : min(k, max_k)].any(1).float().mean()) for k in topk}
