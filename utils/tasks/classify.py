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

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from utils.common.errors import CheckpointError, FlagError
from utils.common.torch_utils import recalibrate_batchnorm
from utils.evaluation.classification import format_classifier_results, scalar_metrics, validate_classifier
from utils.tasks.base import DistillFn, EpochPlan, EvalSettings, LossFn, ModelInfo, ModelSource, TaskOptions
from utils.tasks.detect import first_batches

LOGGER = logging.getLogger(__name__)

NOMINAL_BATCH = 64  # the engine accumulates gradients to 64 images; the loss is scaled to match (see criterion)

__all__ = ["ClassifyTask", "masked_head_losses", "sequential_phase"]


# ---------------------------------------------------------------------------------------------- loss
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




# ---------------------------------------------------------------------------------------------- weights
# ---------------------------------------------------------------------------------------------- the task
class ClassifyTask:
    """Everything classification-specific that the trainer and the tools delegate."""

    name = "classify"

    def __init__(self, data: str | Path | dict, options: TaskOptions, fitness_key: str = "mean/top1",
                 bn_recalibration_batches: int = 8):
        from utils.data.classify import load_classify_data

        self.options = options
        self.data_file = str(data)
        self.data = load_classify_data(data)
        self.yaml_file = str(self.data.yaml_file)
        self.heads = self.data.heads
        self.eval_heads = self.heads  # a model checked by check_model reports under its own head names
        self.head_names = [h["name"] for h in self.heads]
        self.loss_names = tuple(self.head_names)
        self.headline_metrics = ("mean/top1", *(f"{name}/top1" for name in self.head_names))
        self.fitness_key = fitness_key
        self.bn_recalibration_batches = bn_recalibration_batches
        self.train_loader = None
        self.head_weights = self._head_weights()
        if options.heads_mode == "sequential" and len(self.heads) > 1:  # refuse too few epochs before training
            sequential_phase(0, options.epochs, len(self.heads), options.finetune_epochs)
        self.active_heads: list[int] = list(range(len(self.heads)))
        self.hyp: dict[str, Any] = {}
        self.save_dir = options.save_dir
        self.device = torch.device("cpu")
        self.imgsz = options.imgsz
        self.model: nn.Module | None = None

    def _head_weights(self) -> torch.Tensor:
        weights = self.options.head_weights or self.data.head_weights or [1.0] * len(self.heads)
        if len(weights) != len(self.heads):
            raise FlagError(f"--head-weights: {len(weights)} values for {len(self.heads)} heads {self.head_names}")
        return torch.tensor(weights, dtype=torch.float32)

    # ---------------------------------------------------------------- model
    def build_model(self, source: ModelSource) -> nn.Module:
        """From --cfg and/or --weights; a detector checkpoint seeds the backbone of a --cfg classifier."""
        from models.registry import task_of
        from models.yaml_config import load_model_yaml
        from models.yolo import ClassificationModel
        from utils.weights.checkpoint import load_checkpoint, transfer_from_detector, transfer_weights

        if not source.cfg and not source.weights:
            raise FlagError("give --cfg (a classifier YAML, e.g. yolov5n-mcls-s.yaml) and/or --weights")
        loaded = load_checkpoint(source.weights).model if source.weights else None
        is_detector = loaded is not None and task_of(loaded) == "detect"
        if is_detector and not source.cfg:
            raise FlagError(f"{source.weights} is a detector: give --cfg with a classifier YAML to train on top of it")
        model_yaml = load_model_yaml(source.cfg if source.cfg else loaded.yaml)
        if source.head_balance == "uncertainty":
            model_yaml["head_balance"] = "uncertainty"
        self._check_head_count(model_yaml, source)
        model = ClassificationModel(model_yaml, heads=self.heads)
        if is_detector:
            transfer_from_detector(model, source.weights)
        elif loaded is not None:
            transfer_weights(model, loaded.state_dict(), source.weights)
        self._set_dropout(model, float(self.hyp.get("dropout", 0.0)))
        self.model = model
        return model

    def _check_head_count(self, model_yaml: dict, source: ModelSource) -> None:
        from models.registry import task_of
        from models.yaml_config import ModelConfigError

        if task_of(model_yaml) != "classify":
            raise ModelConfigError(f"{source.cfg or source.weights}: not a classifier (last layer must be Classify or "
                                   "MultiHeadClassify)")
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

    def check_model(self, info: ModelInfo, source: str) -> None:
        """A classifier is scored only on data with its heads and class counts (else ids would mean other
        classes); its own head names are kept for the report."""
        model_shape = [(h["name"], len(h["names"])) for h in info.heads or []]
        data_shape = [(h["name"], len(h["names"])) for h in self.heads]
        if model_shape and [n for _, n in model_shape] != [n for _, n in data_shape]:
            raise CheckpointError(f"{source} classifies {model_shape} (head, classes) but {self.data.yaml_file} has "
                                  f"{data_shape}: it was trained on other data; pass the --data it was trained on")
        self.eval_heads = list(info.heads or self.heads)

    def check_settings(self, settings: EvalSettings) -> None:
        if settings.augment:
            raise FlagError("--augment (test-time augmentation) is for detectors; this is a classifier")

    def has_split(self, split: str) -> bool:
        return bool(self.data.sources.get(split))

    def input_size(self, imgsz: int) -> int:
        """Any size: images are centre-cropped to it and the head pools globally."""
        self.imgsz = imgsz
        return imgsz

    # ---------------------------------------------------------------- data
    def build_loaders(self, model: nn.Module) -> tuple[DataLoader, DataLoader | None]:
        from utils.data.classify import create_classify_loader, split_samples

        opts = self.options
        cache = "ram" if opts.cache else None
        train_samples, _ = split_samples(self.data, "train", prefix="train: ")
        train_loader, self.train_dataset = create_classify_loader(
            train_samples, self.imgsz, opts.batch_size, augment=True, hyp=self.hyp, workers=opts.workers,
            shuffle=True, seed=opts.seed, cache=cache)
        self.train_loader = train_loader
        self._log_label_counts(self.train_dataset, "train")
        val_split = "val" if self.data.sources["val"] else "test"
        val_loader = None
        if self.data.sources[val_split]:
            val_samples, _ = split_samples(self.data, val_split, prefix=f"{val_split}: ")
            val_loader, val_dataset = create_classify_loader(
                val_samples, self.imgsz, opts.batch_size * 2, augment=False, workers=opts.workers, cache=cache)
            self._log_label_counts(val_dataset, val_split)
        return train_loader, val_loader

    def _log_label_counts(self, dataset, split: str) -> None:
        counts = dataset.label_counts([len(h["names"]) for h in self.heads])
        for head, per_class in zip(self.heads, counts):
            text = ", ".join(f"{n} {c}" for n, c in zip(head["names"], per_class.tolist()))
            LOGGER.info("%s: %d images; head %s: %s", split, len(dataset), head["name"], text)

    def val_loader(self, split: str = "val", batch_size: int | None = None, rect: bool = True) -> DataLoader:
        """Centre-cropped images of ``split`` (``rect`` does not apply to classifiers)."""
        from utils.data.classify import create_split_loader

        opts = self.options
        loader, _ = create_split_loader(self.data, split, self.imgsz, batch_size or opts.batch_size,
                                        workers=opts.workers)
        return loader

    def calibration_batches(self, count: int) -> list[torch.Tensor]:
        """Training images as validation prepares them (centre crop), in file order."""
        from utils.data.classify import create_split_loader

        opts = self.options
        loader, _ = create_split_loader(self.data, "train", self.imgsz, opts.batch_size, workers=opts.workers,
                                        seed=opts.seed)
        return [batch[0] for batch in itertools.islice(loader, count)]

    def sample_batches(self, images: int) -> list[Any]:
        from utils.data.classify import create_split_loader

        opts = self.options
        loader, _ = create_split_loader(self.data, "val", self.imgsz, opts.batch_size, workers=opts.workers,
                                        seed=opts.seed, shuffle=True)
        return first_batches(loader, images)

    def calibration_files(self, split: str = "train") -> list[Path]:
        """The split's images as the trainer lists them (the validation split when ``split`` has none)."""
        from utils.data.classify import split_samples

        samples, _ = split_samples(self.data, split if self.data.sources.get(split) else "val", verify=False)
        return sorted(Path(path) for path, _ in samples)

    def calibration_image(self, file: str | Path, imgsz: tuple[int, int]) -> torch.Tensor:
        from utils.export.common import center_crop_tensor

        return center_crop_tensor(file, imgsz)

    def preprocess(self, batch: tuple, device: torch.device) -> dict[str, Any]:
        images, targets, paths = batch
        self.device = device
        images = images.to(device, non_blocking=True).float() / 255
        return {"images": images, "targets": targets.to(device), "paths": paths, "n": images.shape[0]}

    # ---------------------------------------------------------------- loss
    def criterion(self, model: nn.Module) -> LossFn:
        """Weighted (or uncertainty-balanced) sum of the masked per-head losses of the heads now training.

        The sum is scaled by ``n / 64``: the engine accumulates gradients over 64 images, so one optimiser step
        follows the mean loss over those 64 images whatever --batch-size is.
        """
        from models.classify import as_head_dict

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

    def distill_criterion(self, model: nn.Module) -> DistillFn:
        """``--teacher``: temperature-scaled KL per head (utils/compress/distill.py), weighted like the task's head
        losses and only for the heads trained now; the teacher's heads are taken in order. Returns ``(loss x n / 64,
        as the task's loss, batch-mean value to log)``."""
        from models.classify import as_head_dict
        from utils.compress.distill import classification_distill_loss

        temperature = float(self.options.distill_temperature)

        def criterion(preds, teacher_preds, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            student = as_head_dict(preds, self.heads)
            teacher = list(teacher_preds.values()) if isinstance(teacher_preds, dict) else [teacher_preds]
            weights = [float(w) if k in self.active_heads else 0.0 for k, w in enumerate(self.head_weights.tolist())]
            loss = classification_distill_loss(student, teacher, weights, temperature)
            return loss * batch["n"] / NOMINAL_BATCH, loss

        return criterion

    def epoch_plan(self, epoch: int, epochs: int) -> EpochPlan:
        opts = self.options
        if opts.heads_mode != "sequential" or len(self.heads) == 1 or self.model is None:
            self.active_heads = list(range(len(self.heads)))
            return EpochPlan()
        phase = sequential_phase(epoch, epochs, len(self.heads), opts.finetune_epochs)
        if phase < 0:
            self.active_heads = list(range(len(self.heads)))
            return EpochPlan(None, 0.1, "all heads + backbone (joint fine-tune, lr x 0.1)")
        self.active_heads = [phase]
        if phase == 1 and sequential_phase(epoch - 1, epochs, len(self.heads), opts.finetune_epochs) == 0:
            # the backbone is about to be frozen in eval mode: give it statistics that match its final weights
            self._recalibrate(self.model)
        prefixes = [self.model.head_prefix(phase)]
        text = f"head {self.head_names[phase]} only (backbone frozen)"
        if phase == 0:
            prefixes += self.model.shared_prefixes()
            text = f"head {self.head_names[0]} + backbone"
        return EpochPlan(_prefix_filter(tuple(prefixes)), 1.0, text)

    def _recalibrate(self, model: nn.Module) -> int:
        """Precise BN on the next training batches (see :func:`utils.common.torch_utils.recalibrate_batchnorm`)."""
        if self.train_loader is None:
            return 0
        images = (batch[0] for batch in self.train_loader)
        return recalibrate_batchnorm(model, images, self.bn_recalibration_batches, self.device)

    # ---------------------------------------------------------------- evaluation
    def validate(self, model: nn.Module, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Precise-BN recalibration of ``model`` (the EMA, which is then saved) on training batches, then metrics."""
        self._recalibrate(model)
        metrics = validate_classifier(model, loader, self.heads, self.device, save_dir, plots)
        LOGGER.info("\n%s", format_classifier_results(metrics, self.heads))
        self.last_validation = metrics
        return scalar_metrics(metrics)

    def evaluate(self, model: Any, loader: Any, settings: EvalSettings | None = None) -> dict[str, Any]:
        """Top-1/top-5 per head of a module or an exported artifact's backend."""
        from utils.export.backend import BackendModule

        settings = settings or EvalSettings()
        self.check_settings(settings)
        if not isinstance(model, nn.Module):
            model = BackendModule(model)
        return validate_classifier(model, loader, self.eval_heads, settings.device, settings.save_dir,
                                   settings.plots, settings.half)

    def final_validation(self, weights: Path, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        from utils.weights.checkpoint import load_checkpoint

        model = load_checkpoint(weights).model.to(self.device)
        return self.validate(model, loader, save_dir, plots)

    def score(self, model: nn.Module, batches: Sequence[Any]) -> float:
        return validate_classifier(model, batches, self.eval_heads)["mean/top1"]

    def fitness(self, metrics: dict[str, float]) -> float:
        """``mean/top1`` by default (``fitness_key`` picks another metric, e.g. ``color/top1``)."""
        return float(metrics.get(self.fitness_key, 0.0))

    def summary(self, metrics: dict[str, float]) -> str:
        return f"mean top-1 {metrics['mean/top1']:.4f}"

    def report(self, metrics: dict[str, Any], verbose: bool = False) -> str:
        return format_classifier_results(metrics, self.eval_heads)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"task": "classify", "imgsz": self.imgsz, "data": self.data_file, "heads": self.heads,
                "heads_mode": self.options.heads_mode}


def _prefix_filter(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda name: name.startswith(prefixes)
