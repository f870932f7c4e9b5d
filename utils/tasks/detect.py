"""Detection: YOLO data, the YOLOv5 loss, mAP validation with v7.0 semantics."""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utils.common.errors import CheckpointError, FlagError, UserError
from utils.common.flags import check_img_size
from utils.evaluation.detection import ValidationOptions, format_results, validate_detector
from utils.evaluation.metrics import fitness as detection_fitness
from utils.tasks.base import DistillFn, EpochPlan, EvalSettings, LossFn, ModelInfo, ModelSource, TaskOptions
from utils.train.loss import ComputeLoss, scale_loss_gains

LOGGER = logging.getLogger(__name__)

SCORE_CONF_THRES = 0.01  # pruning candidates: a broken candidate's thousands of near-zero boxes would make NMS slow


class DetectTask:
    """Everything detection-specific that the trainer and the tools delegate."""

    name = "detect"
    loss_names = ("box", "obj", "cls")
    headline_metrics = ("P", "R", "mAP50", "mAP50-95")

    def __init__(self, data: str | Path | dict, options: TaskOptions):
        from utils.data import load_data_config

        self.options = options
        self.data_file = str(data)
        self.data = load_data_config(data)
        self.yaml_file = str(self.data["yaml_file"])
        self.data_nc = int(self.data["nc"])  # label rows with class ids beyond it are dropped (and reported)
        self.nc = 1 if options.single_cls else self.data_nc
        self.names = ["item"] if options.single_cls else list(self.data["names"])
        self.hyp: dict[str, Any] = {}
        self.save_dir = options.save_dir
        self.imgsz, self.stride = options.imgsz, 32
        self.device = torch.device("cpu")
        self.batches_to_plot = 3  # first training batches saved as train_batch{0,1,2}.jpg

    # ---------------------------------------------------------------- model
    def build_model(self, source: ModelSource) -> nn.Module:
        from models.yolo import DetectionModel
        from utils.weights.checkpoint import load_checkpoint, transfer_weights

        if not source.cfg and not source.weights:
            raise FlagError("give --cfg (a model YAML) and/or --weights (a checkpoint)")
        sizes = {"nc": source.nc or self.nc, "depth_multiple": source.depth_multiple,
                 "width_multiple": source.width_multiple}
        if source.weights and Path(source.weights).suffix == ".pth":
            from utils.weights.pretrained import arch_from_file_name, load_torchvision_backbone

            model = DetectionModel(source.cfg, **sizes)
            load_torchvision_backbone(model, source.weights, arch_from_file_name(source.weights))
        elif source.weights:
            loaded = load_checkpoint(source.weights).model
            if getattr(loaded, "quantization", None):
                raise UserError(f"--weights {source.weights} is a quantization-aware-trained checkpoint; continue its "
                                "run with --resume (its last.pt), or start from the float checkpoint it came from")
            model = DetectionModel(source.cfg or loaded.yaml, **sizes)
            transfer_weights(model, loaded.state_dict(), source.weights, exclude=("anchor",) if source.cfg else ())
        else:
            model = DetectionModel(source.cfg, **sizes)
        model.names = self.names
        model.gr = 1.0
        return model

    def check_model(self, info: ModelInfo, source: str) -> None:
        """A detector trained on other data is refused (YOLOv5 v7.0 refuses it too) instead of being scored
        against labels whose ids mean other classes; with ``single_cls`` every class is one and any model fits."""
        self.stride = max(int(info.stride), 32)
        if self.options.single_cls:
            return
        if info.nc is not None and info.nc != self.data_nc:
            yaml_file = self.data["yaml_file"]
            raise CheckpointError(f"{source} predicts {info.nc} classes but {yaml_file} has {self.data_nc} (nc: "
                                  f"{self.data_nc}): it was trained on other data. Pass the --data it was trained "
                                  "on, or --single-cls to score boxes whatever their class")
        model_names = [str(n) for n in info.names or []]
        if model_names and model_names != self.names:
            LOGGER.info("class names from %s (the model calls them %s)", self.data["yaml_file"], ", ".join(model_names))

    def check_settings(self, settings: EvalSettings) -> None:
        """Every evaluation setting applies to detectors."""

    def has_split(self, split: str) -> bool:
        return bool(self.data.get(split))

    def input_size(self, imgsz: int) -> int:
        self.imgsz = check_img_size(imgsz, self.stride)
        return self.imgsz

    # ---------------------------------------------------------------- data
    def build_loaders(self, model: nn.Module) -> tuple[DataLoader, DataLoader | None]:
        """Training and validation loaders at the training size; checks the anchors against the labels."""
        self.stride = max(int(model.stride.max()), 32)
        self.imgsz = check_img_size(self.options.imgsz, self.stride, floor=2 * self.stride)
        train_loader, self.train_dataset = self.build_train_loader()
        val_loader = self.val_loader(batch_size=self.options.batch_size * 2) if self.data.get("val") else None
        self._check_anchors(model)
        # v7.0 then rounds the whole model through float16 ("pre-reduce anchor precision"), so its training
        # starts from float16-representable weights: the same seed gives the same start here. (v7.0 copies its
        # EMA just before this rounding; the copy's weight in the average is 5e-4 after the first update.)
        model.half().float()
        self._report_data()
        return train_loader, val_loader

    def build_train_loader(self) -> tuple[DataLoader, Dataset]:
        """(loader, data set) of the augmented training split, at ``self.imgsz`` and ``self.stride``; a split
        without a single box stops training here, before the first epoch (a val split without one only warns)."""
        from utils.data import create_dataloader

        opts = self.options
        return create_dataloader(
            self.data["train"], self.imgsz, opts.batch_size, self.stride, hyp=self.hyp, augment=True,
            cache=opts.cache, rect=opts.rect, workers=opts.workers, shuffle=not opts.rect, seed=opts.seed,
            single_cls=opts.single_cls, image_weights=opts.image_weights, prefix="train: ", nc=self.data_nc,
            require_labels=True)

    def val_loader(self, split: str = "val", batch_size: int | None = None, rect: bool = True) -> DataLoader:
        """v7.0's validation batches: rectangular with pad 0.5 (``rect``), else square and unpadded."""
        from utils.data import create_dataloader

        opts = self.options
        loader, _ = create_dataloader(
            self.data[split], self.imgsz, batch_size or opts.batch_size, self.stride, hyp=self.hyp or None,
            augment=False, cache=opts.cache, pad=0.5 if rect else 0.0, rect=rect, workers=opts.workers,
            shuffle=False, seed=opts.seed, single_cls=opts.single_cls, prefix=f"{split}: ", nc=self.data_nc)
        return loader

    def calibration_batches(self, count: int) -> list[torch.Tensor]:
        """Mosaic-augmented training batches: plain letterboxed images give other BatchNorm statistics than the
        model was trained with, and re-estimating on them cost the unpruned fixture a third of its score."""
        from utils.data import create_dataloader
        from utils.train.config import DEFAULT_HYP, load_hyp

        opts = self.options
        loader, _ = create_dataloader(self.data["train"], self.imgsz, opts.batch_size, self.stride,
                                      hyp=load_hyp(DEFAULT_HYP), augment=True, shuffle=True, seed=opts.seed,
                                      workers=opts.workers, nc=self.data_nc, prefix="calibration: ")
        return [batch[0] for batch in itertools.islice(loader, count)]

    def sample_batches(self, images: int) -> list[Any]:
        """A seeded random sample, not the first files: sorted names put whole classes first (NEU-DET)."""
        from utils.data import create_dataloader

        opts = self.options
        loader, _ = create_dataloader(self.data["val"], self.imgsz, opts.batch_size, self.stride, augment=False,
                                      shuffle=True, seed=opts.seed, workers=opts.workers, nc=self.data_nc,
                                      prefix="score: ")
        return first_batches(loader, images)

    def calibration_files(self, split: str = "train") -> list[Path]:
        from utils.data import list_image_files

        return sorted(Path(p) for p in list_image_files(self.data.get(split) or self.data["val"]))

    def calibration_image(self, file: str | Path, imgsz: tuple[int, int]) -> torch.Tensor:
        from utils.export.common import letterbox_tensor

        return letterbox_tensor(file, imgsz)

    def _report_data(self) -> None:
        """Data-set report in the log and labels.png in the run folder, before the first epoch."""
        from utils.common.plots import plot_label_stats
        from utils.data.report import dataset_report, format_report

        LOGGER.info("\n%s", format_report(dataset_report(self.data_file, self.imgsz)))
        if self.options.plots:
            plot_label_stats(self.train_dataset.labels, self.names, self.save_dir / "labels.png")

    def _check_anchors(self, model: nn.Module) -> None:
        if not self.options.autoanchor:
            return
        from utils.train.autoanchor import check_anchors

        check_anchors(self.train_dataset, model, thr=self.hyp["anchor_t"], imgsz=self.imgsz)

    def preprocess(self, batch: tuple, device: torch.device) -> dict[str, Any]:
        images, targets, paths, _ = batch
        self.device = device
        if self.batches_to_plot and self.options.plots:
            from utils.common.plots import plot_batch

            index = 3 - self.batches_to_plot
            plot_batch(images.numpy(), targets.numpy(), self.names, self.save_dir / f"train_batch{index}.jpg")
            self.batches_to_plot -= 1
        images = images.to(device, non_blocking=True).float() / 255
        if self.options.multi_scale:
            images = self._random_rescale(images)
        return {"images": images, "targets": targets.to(device), "paths": paths, "n": images.shape[0],
                "n_instances": targets.shape[0]}

    def _random_rescale(self, images: torch.Tensor) -> torch.Tensor:
        """--multi-scale: a random size in [0.5, 1.5] x imgsz, rounded to the stride."""
        size = random.randrange(int(self.imgsz * 0.5), int(self.imgsz * 1.5) + self.stride) // self.stride
        size *= self.stride
        factor = size / max(images.shape[2:])
        if factor == 1:
            return images
        shape = [math.ceil(x * factor / self.stride) * self.stride for x in images.shape[2:]]
        return nn.functional.interpolate(images, size=shape, mode="bilinear", align_corners=False)

    # ---------------------------------------------------------------- loss
    def _loss(self, model: nn.Module) -> ComputeLoss:
        gains = scale_loss_gains(self.hyp, self.nc, model.model[-1].nl, self.imgsz)
        return ComputeLoss(model, gains)

    def criterion(self, model: nn.Module) -> LossFn:
        compute = self._loss(model)
        return lambda preds, batch: compute(preds, batch["targets"])

    def distill_criterion(self, model: nn.Module) -> DistillFn:
        """``--teacher``: output distillation with this model's loss gains and level balance
        (utils/compress/distill.py); returns ``(loss x batch size, as the YOLOv5 loss, per-image value to log)``."""
        from utils.compress.distill import detection_distill_loss
        from utils.train.loss import objectness_balance

        head = model.model[-1]
        gains, balance = scale_loss_gains(self.hyp, head.nc, head.nl, self.imgsz), objectness_balance(head.nl)

        def criterion(preds, teacher_preds, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            loss = detection_distill_loss(preds, teacher_preds, gains, balance, head.nc)
            return loss * preds[0].shape[0], loss

        return criterion

    def epoch_plan(self, epoch: int, epochs: int) -> EpochPlan:
        return EpochPlan()  # every layer; --freeze / --freeze-schedule are training plug-ins (utils/train/freeze.py)

    # ---------------------------------------------------------------- evaluation
    def validate(self, model: nn.Module, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Validate a Conv+BN-fused copy (the EMA model itself keeps training-time structure).

        Returns P, R, mAP50, mAP50-95 and the training loss on the validation batches (``val/box`` ...).
        """
        fused = deepcopy(model).fuse() if hasattr(model, "fuse") else model
        options = ValidationOptions(single_cls=self.options.single_cls, plots=plots, save_dir=save_dir,
                                    names=self.names, compute_loss=self._loss(fused) if self.hyp else None)
        metrics = validate_detector(fused, loader, self.nc, options)
        LOGGER.info("\n%s", format_results(metrics, self.names, verbose=plots))
        result = {k: metrics[k] for k in self.headline_metrics}
        result.update({f"val/{name}": value for name, value in zip(self.loss_names, metrics.get("val_loss", ()))})
        return result

    def evaluate(self, model: Any, loader: Any, settings: EvalSettings | None = None) -> dict[str, Any]:
        settings = settings or EvalSettings()
        options = ValidationOptions(conf_thres=settings.conf_thres, iou_thres=settings.iou_thres,
                                    max_det=settings.max_det, single_cls=self.options.single_cls,
                                    half=settings.half, augment=settings.augment, plots=settings.plots,
                                    save_dir=settings.save_dir, save_txt=settings.save_txt,
                                    save_conf=settings.save_conf, save_json=settings.save_json or settings.cocoeval,
                                    names=self.names, streams=settings.streams, progress=settings.progress)
        metrics = validate_detector(model, loader, self.nc, options)
        if settings.cocoeval:
            from utils.evaluation.coco_eval import cocoeval_cross_check

            metrics["cocoeval"] = cocoeval_cross_check(loader.dataset, metrics["predictions_json"], self.nc)
        return metrics

    def final_validation(self, weights: Path, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        from utils.weights.checkpoint import load_checkpoint

        model = load_checkpoint(weights).model.to(self.device)
        return self.validate(model, loader, save_dir, plots)

    def score(self, model: nn.Module, batches: Sequence[Any]) -> float:
        quiet = EvalSettings(conf_thres=SCORE_CONF_THRES, progress=False)
        return self.fitness(self.evaluate(model, batches, quiet))

    def fitness(self, metrics: dict[str, float]) -> float:
        return float(detection_fitness(metrics))

    def summary(self, metrics: dict[str, float]) -> str:
        return f"mAP@.5 {metrics['mAP50']:.4f}, mAP@.5:.95 {metrics['mAP50-95']:.4f}"

    def report(self, metrics: dict[str, Any], verbose: bool = False) -> str:
        """v7.0's table; per class when asked or when there are 2-49 classes, as v7.0's val.py prints it."""
        return format_results(metrics, self.names, verbose or 1 < self.nc < 50)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"task": "detect", "imgsz": self.imgsz, "data": self.data_file}


def first_batches(loader: Any, images: int) -> list[Any]:
    """Whole batches from the start of ``loader`` until ``images`` images are covered (a fixed sample)."""
    batches, seen = [], 0
    for batch in loader:
        batches.append(batch)
        seen += len(batch[0])
        if seen >= images:
            break
    return batches
