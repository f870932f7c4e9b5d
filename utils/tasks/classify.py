"""Classification task for the shared training loop: single- and multi-head classifiers.

The loss is a per-head cross-entropy (with label smoothing) over the labelled samples only (target -1 = the
image has no label for that head, as in multi-source data), combined by fixed weights (``--head-weights`` or
the data YAML's ``weight:`` per head) or by learned uncertainty weights (``--head-balance uncertainty``).

``--heads-mode sequential`` trains the heads one after another (the seed's recommendation for unbalanced,
multi-source data): the epochs are split into one phase per head; phase 1 trains head 1 and the shared
backbone, every later phase freezes the backbone and trains only its head; ``--finetune-epochs N`` appends N
joint epochs at lr x 0.1 (HybridNets' final round).
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from utils.common.errors import FlagError
from utils.tasks.base import EpochPlan
from utils.train.config import TrainConfig

LOGGER = logging.getLogger(__name__)

NOMINAL_BATCH = 64  # the engine accumulates gradients to 64 images; the loss is scaled to match (see criterion)

__all__ = ["ClassifyTask", "masked_head_losses", "predict_images", "recalibrate_batchnorm", "sequential_phase",
           "validate_classifier", "write_predictions_csv"]


# ---------------------------------------------------------------------------------------------- loss
def as_head_dict(preds: torch.Tensor | dict[str, torch.Tensor], heads: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Single-head models return a tensor; name it after the only head so all code sees ``{head: logits}``."""
    return preds if isinstance(preds, dict) else {heads[0]["name"]: preds}


def masked_head_losses(preds: dict[str, torch.Tensor], targets: torch.Tensor, head_names: Sequence[str],
                       label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head mean cross-entropy over the samples labelled for that head; returns ``(losses, has_labels)``.

    A head with no labelled sample in the batch contributes an exact 0 that is still connected to the graph
    (so every parameter keeps a gradient, of zero, and distributed training stays in step).
    """
    losses, active = [], []
    for k, name in enumerate(head_names):
        logits, target = preds[name], targets[:, k]
        labelled = target >= 0
        if labelled.any():
            losses.append(F.cross_entropy(logits[labelled].float(), target[labelled], label_smoothing=label_smoothing))
            active.append(True)
        else:
            losses.append(logits.sum() * 0.0)
            active.append(False)
    return torch.stack(losses), torch.tensor(active, device=targets.device)


# ---------------------------------------------------------------------------------------------- sequential plan
def sequential_phase(epoch: int, epochs: int, n_heads: int, finetune_epochs: int = 0) -> int:
    """Head index trained at ``epoch`` in sequential mode, or -1 during the final joint fine-tune.

    The epochs before the fine-tune are split as evenly as possible, earlier phases taking the remainder
    (head 1 also trains the backbone, so it benefits most from extra epochs).
    """
    main = epochs - finetune_epochs
    if main < n_heads:
        raise FlagError(f"--heads-mode sequential needs at least one epoch per head: {epochs} epochs - "
                         f"{finetune_epochs} fine-tune < {n_heads} heads")
    if epoch >= main:
        return -1
    base, extra = divmod(main, n_heads)
    bounds = np.cumsum([base + (k < extra) for k in range(n_heads)])
    return int(np.searchsorted(bounds, epoch, side="right"))


# ---------------------------------------------------------------------------------------------- BatchNorm
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, batches: int, device: torch.device | str) -> int:
    """Re-estimate every BatchNorm's running statistics as a plain average over ``batches`` training batches.

    "Precise BN" (Wu & Johnson, 2021). With YOLOv5's BN momentum of 0.03 the running statistics trail the
    weights by ~30 steps; early in training (and whenever Adam moves weights quickly) the eval-mode network
    then differs from the train-mode one and validation, or a backbone frozen in eval mode, sees wrong
    features. Averaging fresh statistics for the current weights removes that lag. Returns batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or loader is None or batches < 1:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches below
    model.train()
    used = 0
    try:
        with torch.no_grad():
            for images, _, _ in loader:
                if used >= batches:
                    break
                model(images.to(device).float() / 255)
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


# ---------------------------------------------------------------------------------------------- validation
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


# ---------------------------------------------------------------------------------------------- prediction
def predict_images(model: nn.Module, paths: Sequence[str | Path], imgsz: int, heads: Sequence[dict] | None = None,
                   device: torch.device | str | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
    """Classify image files (centre crop, as in validation); one row per image with each head's top class.

    Row keys: ``path``, then per head ``<head>`` (class name), ``<head>_index`` and ``<head>_conf`` (softmax).
    """
    from utils.data.classify import read_image

    images = ((str(p), read_image(str(p))) for p in paths)
    return classify_images(model, images, imgsz, heads, device, batch_size)


def classify_images(model: nn.Module, images: Iterable[tuple[str, np.ndarray]], imgsz: int,
                    heads: Sequence[dict] | None = None, device: torch.device | str | None = None,
                    batch_size: int = 32) -> list[dict[str, Any]]:
    """:func:`predict_images` for already decoded ``(name, BGR image)`` pairs (detect.py's frames)."""
    from models.classify import heads_of
    from utils.data.classify import center_crop, to_chw_tensor

    heads = list(heads or heads_of(model))
    if device is None:
        device = next(model.parameters()).device if isinstance(model, nn.Module) else getattr(model, "device", "cpu")
    rows: list[dict[str, Any]] = []
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    pending = iter(images)
    try:
        while chunk := list(itertools.islice(pending, batch_size)):
            batch = torch.stack([to_chw_tensor(center_crop(image, imgsz)) for _, image in chunk])
            with torch.no_grad():
                preds = as_head_dict(model(batch.to(device).float() / 255), heads)
            rows += _prediction_rows([name for name, _ in chunk], preds, heads)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return rows


def _prediction_rows(paths: list[str], preds: dict[str, torch.Tensor], heads: Sequence[dict]) -> list[dict]:
    rows = [{"path": p} for p in paths]
    for head in heads:
        probs = preds[head["name"]].float().softmax(1)
        conf, index = probs.max(1)
        for row, c, i in zip(rows, conf.tolist(), index.tolist()):
            row[head["name"]] = head["names"][i]
            row[f"{head['name']}_index"] = i
            row[f"{head['name']}_conf"] = round(c, 5)
    return rows


def write_predictions_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`predict_images` rows as CSV (header from the first row's keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- the task
class ClassifyTask:
    """Everything classification-specific that :func:`utils.train.engine.fit` delegates."""

    name = "classify"

    def __init__(self, cfg: TrainConfig, fitness_key: str = "mean/top1", bn_recalibration_batches: int = 8):
        from utils.data.classify import load_classify_data

        self.cfg = cfg
        self.data = load_classify_data(cfg.data)
        self.heads = self.data.heads
        self.head_names = [h["name"] for h in self.heads]
        self.loss_names = tuple(self.head_names)
        self.fitness_key = fitness_key
        self.bn_recalibration_batches = bn_recalibration_batches
        self.train_loader = None
        self.head_weights = self._head_weights()
        if cfg.heads_mode == "sequential" and len(self.heads) > 1:  # refuse too few epochs before training starts
            sequential_phase(0, cfg.epochs, len(self.heads), cfg.finetune_epochs)
        self.active_heads: list[int] = list(range(len(self.heads)))
        self.hyp: dict[str, Any] = {}
        self.save_dir = Path(cfg.project) / cfg.name
        self.device = torch.device("cpu")
        self.imgsz = cfg.imgsz
        self.model: nn.Module | None = None

    def _head_weights(self) -> torch.Tensor:
        weights = self.cfg.head_weights or self.data.head_weights or [1.0] * len(self.heads)
        if len(weights) != len(self.heads):
            raise FlagError(f"--head-weights: {len(weights)} values for {len(self.heads)} heads {self.head_names}")
        return torch.tensor(weights, dtype=torch.float32)

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        """From --cfg and/or --weights; a detector checkpoint seeds the backbone of a --cfg classifier."""
        from models.classify import ClassificationModel, transfer_from_detector
        from models.yaml_config import load_model_yaml
        from utils.weights.checkpoint import load_checkpoint, transfer_weights

        cfg = self.cfg
        if not cfg.cfg and not cfg.weights:
            raise FlagError("give --cfg (a classifier YAML, e.g. yolov5n-mcls-s.yaml) and/or --weights")
        source = load_checkpoint(cfg.weights).model if cfg.weights else None
        is_detector = source is not None and hasattr(source.model[-1], "anchors")
        if is_detector and not cfg.cfg:
            raise FlagError(f"{cfg.weights} is a detector: give --cfg with a classifier YAML to train on top of it")
        model_yaml = load_model_yaml(cfg.cfg if cfg.cfg else source.yaml)
        if cfg.head_balance == "uncertainty":
            model_yaml["head_balance"] = "uncertainty"
        self._check_head_count(model_yaml)
        model = ClassificationModel(model_yaml, heads=self.heads)
        if is_detector:
            transfer_from_detector(model, cfg.weights)
        elif source is not None:
            transfer_weights(model, source.state_dict(), cfg.weights)
        self._set_dropout(model, float(self.hyp.get("dropout", 0.0)))
        self.model = model
        return model

    def _check_head_count(self, model_yaml: dict) -> None:
        from models.classify import is_classifier_config
        from models.yaml_config import ModelConfigError

        if not is_classifier_config(model_yaml):
            raise ModelConfigError(f"{self.cfg.cfg or self.cfg.weights}: not a classifier (last layer must be "
                                   f"Classify or MultiHeadClassify)")
        rows = (model_yaml.get("backbone") or []) + (model_yaml.get("head") or [])
        if rows[-1][2] == "Classify" and len(self.heads) > 1:
            raise ModelConfigError(f"the data has {len(self.heads)} heads {self.head_names} but the model YAML has "
                                   f"one Classify head: use a multi-head YAML such as models/cls/yolov5n-mcls-s.yaml")

    @staticmethod
    def _set_dropout(model: nn.Module, p: float) -> None:
        """hyp ``dropout`` sets every head dropout (v7.0's --dropout)."""
        for module in model.model[-1].modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    # ---------------------------------------------------------------- data
    def build_loaders(self, model: nn.Module) -> tuple[DataLoader, DataLoader | None]:
        from utils.data.classify import create_classify_loader, split_samples

        cfg = self.cfg
        cache = "ram" if cfg.cache else None
        train_samples, _ = split_samples(self.data, "train", prefix="train: ")
        train_loader, self.train_dataset = create_classify_loader(
            train_samples, self.imgsz, cfg.batch_size, augment=True, hyp=self.hyp, workers=cfg.workers,
            shuffle=True, seed=cfg.seed, cache=cache)
        self.train_loader = train_loader
        self._log_label_counts(self.train_dataset, "train")
        val_split = "val" if self.data.sources["val"] else "test"
        val_loader = None
        if self.data.sources[val_split]:
            val_samples, _ = split_samples(self.data, val_split, prefix=f"{val_split}: ")
            val_loader, val_dataset = create_classify_loader(
                val_samples, self.imgsz, cfg.batch_size * 2, augment=False, workers=cfg.workers, cache=cache)
            self._log_label_counts(val_dataset, val_split)
        return train_loader, val_loader

    def _log_label_counts(self, dataset, split: str) -> None:
        counts = dataset.label_counts([len(h["names"]) for h in self.heads])
        for head, per_class in zip(self.heads, counts):
            text = ", ".join(f"{n} {c}" for n, c in zip(head["names"], per_class.tolist()))
            LOGGER.info("%s: %d images; head %s: %s", split, len(dataset), head["name"], text)

    def preprocess(self, batch: tuple, device: torch.device) -> dict[str, Any]:
        images, targets, paths = batch
        self.device = device
        images = images.to(device, non_blocking=True).float() / 255
        return {"images": images, "targets": targets.to(device), "paths": paths, "n": images.shape[0]}

    # ---------------------------------------------------------------- loss / metrics
    def criterion(self, model: nn.Module) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
        """Weighted (or uncertainty-balanced) sum of the masked per-head losses of the heads now training.

        The sum is scaled by ``n / 64``: the engine accumulates gradients over 64 images, so one optimiser step
        follows the mean loss over those 64 images whatever --batch-size is.
        """
        balancer = getattr(model, "head_balance", None)
        smoothing = float(self.hyp.get("label_smoothing", 0.0))

        def loss_fn(preds, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            preds = as_head_dict(preds, self.heads)
            losses, has_labels = masked_head_losses(preds, batch["targets"], self.head_names, smoothing)
            training = torch.zeros_like(has_labels)
            training[self.active_heads] = True
            active = has_labels & training
            if balancer is not None and len(self.active_heads) > 1:
                total = balancer(losses, active)
            else:
                total = (losses * self.head_weights.to(losses.device) * active).sum()
            return total * batch["n"] / NOMINAL_BATCH, losses.detach()

        return loss_fn

    def distill_criterion(self, model: nn.Module) -> Callable[[Any, Any, dict[str, Any]], tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
        """``--teacher``: temperature-scaled KL per head (utils/compress/distill.py), weighted like the task's head
        losses and only for the heads trained now; the teacher's heads are taken in order. Returns ``(loss x n / 64,
        as the task's loss, batch-mean value to log)``."""
        from utils.compress.distill import classification_distill_loss

        temperature = float(self.cfg.distill_temperature)

        def criterion(preds, teacher_preds, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            student = as_head_dict(preds, self.heads)
            teacher = list(teacher_preds.values()) if isinstance(teacher_preds, dict) else [teacher_preds]
            weights = [float(w) if k in self.active_heads else 0.0 for k, w in enumerate(self.head_weights.tolist())]
            loss = classification_distill_loss(student, teacher, weights, temperature)
            return loss * batch["n"] / NOMINAL_BATCH, loss

        return criterion

    def validate(self, model: nn.Module, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Precise-BN recalibration of ``model`` (the EMA, which is then saved) on training batches, then metrics."""
        recalibrate_batchnorm(model, self.train_loader, self.bn_recalibration_batches, self.device)
        metrics = validate_classifier(model, loader, self.heads, self.device, save_dir, plots)
        LOGGER.info("\n%s", format_classifier_results(metrics, self.heads))
        self.last_validation = metrics
        return scalar_metrics(metrics)

    def final_validation(self, weights: Path, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        from utils.weights.checkpoint import load_checkpoint

        model = load_checkpoint(weights).model.to(self.device)
        return self.validate(model, loader, save_dir, plots)

    def fitness(self, metrics: dict[str, float]) -> float:
        """``mean/top1`` by default (``fitness_key`` picks another metric, e.g. ``color/top1``)."""
        return float(metrics.get(self.fitness_key, 0.0))

    def epoch_plan(self, epoch: int, epochs: int) -> EpochPlan:
        if self.cfg.heads_mode != "sequential" or len(self.heads) == 1 or self.model is None:
            self.active_heads = list(range(len(self.heads)))
            return EpochPlan()
        phase = sequential_phase(epoch, epochs, len(self.heads), self.cfg.finetune_epochs)
        if phase < 0:
            self.active_heads = list(range(len(self.heads)))
            return EpochPlan(None, 0.1, "all heads + backbone (joint fine-tune, lr x 0.1)")
        self.active_heads = [phase]
        if phase == 1 and sequential_phase(epoch - 1, epochs, len(self.heads), self.cfg.finetune_epochs) == 0:
            # the backbone is about to be frozen in eval mode: give it statistics that match its final weights
            recalibrate_batchnorm(self.model, self.train_loader, self.bn_recalibration_batches, self.device)
        prefixes = [self.model.head_prefix(phase)]
        text = f"head {self.head_names[phase]} only (backbone frozen)"
        if phase == 0:
            prefixes += self.model.shared_prefixes()
            text = f"head {self.head_names[0]} + backbone"
        return EpochPlan(_prefix_filter(tuple(prefixes)), 1.0, text)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"task": "classify", "imgsz": self.imgsz, "data": str(self.cfg.data), "heads": self.heads,
                "heads_mode": self.cfg.heads_mode}


def _prefix_filter(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda name: name.startswith(prefixes)
