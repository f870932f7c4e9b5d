"""Classifier validation: top-1/top-5 accuracy, per-class accuracy, loss and confusion matrix per head."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.classify import as_head_dict


def validate_classifier(model: nn.Module, loader: Iterable, heads: Sequence[dict],
                        device: torch.device | str | None = None, save_dir: Path | None = None, plots: bool = False,
                        half: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy, per-class accuracy, loss and confusion matrix per head over ``loader``.

    ``loader`` yields ``(uint8 images, targets (b, n_heads), paths)``; samples with target -1 for a head are not
    counted for that head. Returns float metrics under ``'<head>/top1'``, ``'<head>/top5'`` (heads with >= 5
    classes), ``'<head>/loss'``, ``'mean/top1'``, plus ``'per_class'`` and ``'confusion'`` (rows = true class,
    columns = predicted) keyed by head. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    names = [h["name"] for h in heads]
    confusion = {h["name"]: np.zeros((len(h["names"]),) * 2, dtype=np.int64) for h in heads}
    top5_hits = dict.fromkeys(names, 0)
    loss_sum = dict.fromkeys(names, 0.0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, targets, _ in loader:
                images = images.to(device).float() / 255
                preds = as_head_dict(model(images.half() if half else images), heads)
                _accumulate(preds, targets.to(device), names, confusion, top5_hits, loss_sum)
    finally:
        model.train(was_training)
    return _summarise(heads, confusion, top5_hits, loss_sum, save_dir if plots else None)


def _accumulate(preds: dict, targets: torch.Tensor, names: list[str], confusion: dict, top5_hits: dict,
                loss_sum: dict) -> None:
    for k, name in enumerate(names):
        target = targets[:, k]
        labelled = target >= 0
        if not labelled.any():
            continue
        logits, target = preds[name][labelled].float(), target[labelled]
        loss_sum[name] += float(F.cross_entropy(logits, target, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top5_hits[name] += int((top == target[:, None]).any(1).sum())
        np.add.at(confusion[name], (target.cpu().numpy(), top[:, 0].cpu().numpy()), 1)


def _summarise(heads: Sequence[dict], confusion: dict, top5_hits: dict, loss_sum: dict,
               plot_dir: Path | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"per_class": {}, "confusion": confusion}
    top1s = []
    for head in heads:
        name, matrix = head["name"], confusion[head["name"]]
        seen = max(int(matrix.sum()), 1)
        metrics[f"{name}/top1"] = float(np.trace(matrix)) / seen
        if len(head["names"]) >= 5:
            metrics[f"{name}/top5"] = top5_hits[name] / seen
        metrics[f"{name}/loss"] = loss_sum[name] / seen
        per_class = np.diag(matrix) / np.maximum(matrix.sum(1), 1)
        metrics["per_class"][name] = [float(v) for v in per_class]
        top1s.append(metrics[f"{name}/top1"])
        if plot_dir is not None:
            plot_confusion(matrix, head["names"], Path(plot_dir) / f"confusion_matrix_{name}.png", name)
    metrics["mean/top1"] = float(np.mean(top1s))
    return metrics


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The float entries of :func:`validate_classifier`'s result (what results.csv and fitness use)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def format_classifier_results(metrics: dict[str, Any], heads: Sequence[dict]) -> str:
    """A per-head table: images, top-1, top-5, then per-class accuracy."""
    lines = [f"{'head':>12} {'classes':>8} {'images':>7} {'top1':>7} {'top5':>7}"]
    for head in heads:
        name = head["name"]
        images = int(metrics["confusion"][name].sum())
        top5 = metrics.get(f"{name}/top5")
        lines.append(f"{name:>12} {len(head['names']):>8} {images:>7} {metrics[f'{name}/top1']:>7.3f} "
                     f"{top5 if top5 is not None else float('nan'):>7.3f}")
        for cls, acc, count in zip(head["names"], metrics["per_class"][name], metrics["confusion"][name].sum(1)):
            lines.append(f"{'':>12} {cls[:20]:>20} {int(count):>7} {acc:>7.3f}")
    lines.append(f"{'mean':>12} {'':>8} {'':>7} {metrics['mean/top1']:>7.3f}")
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) as a PNG; uses matplotlib's object API only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    normalised = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig = Figure(figsize=(max(4, 0.6 * n + 2), max(3.5, 0.55 * n + 1.5)), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for (row, col), value in np.ndenumerate(normalised):
            if matrix[row, col]:
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.5 else "black")
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(f"Confusion matrix {title}".strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
