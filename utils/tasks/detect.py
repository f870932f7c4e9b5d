"""Detection task for the shared training loop: YOLO data, YOLOv5 loss, mAP validation."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utils.common.errors import FlagError
from utils.common.flags import check_img_size
from utils.evaluation.detection import ValidationOptions, format_results, validate_detector
from utils.evaluation.metrics import fitness as detection_fitness
from utils.tasks.base import EpochPlan
from utils.train.config import TrainConfig
from utils.train.freeze import alternate_plan, parse_freeze_schedule
from utils.train.loss import ComputeLoss, scale_loss_gains

LOGGER = logging.getLogger(__name__)


class DetectTask:
    """Everything detection-specific that the trainer delegates."""

    name = "detect"
    loss_names = ("box", "obj", "cls")

    def __init__(self, cfg: TrainConfig):
        from utils.data import load_data_config

        self.cfg = cfg
        self.data = load_data_config(cfg.data)
        self.data_nc = int(self.data["nc"])  # label rows with class ids beyond it are dropped (and reported)
        self.nc = 1 if cfg.single_cls else self.data_nc
        self.names = ["item"] if cfg.single_cls else list(self.data["names"])
        self.hyp: dict[str, Any] = {}
        self.save_dir = Path(cfg.project) / cfg.name
        self.cycle = parse_freeze_schedule(cfg.freeze_schedule)
        self.backbone: set[int] = set()
        self.device = torch.device("cpu")
        self.batches_to_plot = 3  # first training batches saved as train_batch{0,1,2}.jpg

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        from models.yolo import DetectionModel
        from utils.weights.checkpoint import load_checkpoint, transfer_weights

        cfg = self.cfg
        if not cfg.cfg and not cfg.weights:
            raise FlagError("give --cfg (a model YAML) and/or --weights (a checkpoint)")
        sizes = {"nc": cfg.nc or self.nc, "depth_multiple": cfg.depth_multiple, "width_multiple": cfg.width_multiple}
        if cfg.weights and Path(cfg.weights).suffix == ".pth":
            model = DetectionModel(cfg.cfg, **sizes)
            from utils.weights.pretrained import arch_from_file_name, load_torchvision_backbone

            load_torchvision_backbone(model, cfg.weights, arch_from_file_name(cfg.weights))
        elif cfg.weights:
            source = load_checkpoint(cfg.weights).model
            if getattr(source, "quantization", None):
                from utils.common.errors import UserError

                raise UserError(f"--weights {cfg.weights} is a quantization-aware-trained checkpoint; continue its run "
                                "with --resume (its last.pt), or start from the float checkpoint it came from")
            model = DetectionModel(cfg.cfg or source.yaml, **sizes)
            transfer_weights(model, source.state_dict(), cfg.weights, exclude=("anchor",) if cfg.cfg else ())
        else:
            model = DetectionModel(cfg.cfg, **sizes)
        model.names = self.names
        model.gr = 1.0
        self.backbone = set(model.backbone_indices())
        return model

    # ---------------------------------------------------------------- data
    def build_loaders(self, model: nn.Module) -> tuple[DataLoader, DataLoader | None]:
        from utils.data import create_dataloader

        cfg, hyp = self.cfg, self.hyp
        stride = max(int(model.stride.max()), 32)
        self.imgsz = check_img_size(cfg.imgsz, stride, floor=2 * stride)
        self.stride = stride
        train_loader, self.train_dataset = self.build_train_loader()
        val_loader = None
        if self.data.get("val"):
            val_loader, _ = create_dataloader(
                self.data["val"], self.imgsz, cfg.batch_size * 2, stride, hyp=hyp, augment=False,
                cache=cfg.cache, pad=0.5, rect=True, workers=cfg.workers, shuffle=False, seed=cfg.seed,
                single_cls=cfg.single_cls, prefix="val: ", nc=self.data_nc)
        self._check_anchors(model)
        # v7.0 then rounds the whole model through float16 ("pre-reduce anchor precision"), so its training
        # starts from float16-representable weights: the same seed gives the same start here. (v7.0 copies its
        # EMA just before this rounding; the copy's weight in the average is 5e-4 after the first update.)
        model.half().float()
        self._report_data()
        return train_loader, val_loader

    def build_train_loader(self) -> tuple[DataLoader, Dataset]:
        """(loader, data set) of the augmented training split, at ``self.imgsz`` and ``self.stride``."""
        from utils.data import create_dataloader

        cfg = self.cfg
        return create_dataloader(
            self.data["train"], self.imgsz, cfg.batch_size, self.stride, hyp=self.hyp, augment=True, cache=cfg.cache,
            rect=cfg.rect, workers=cfg.workers, shuffle=not cfg.rect, seed=cfg.seed, single_cls=cfg.single_cls,
            image_weights=cfg.image_weights, prefix="train: ", nc=self.data_nc)

    def _report_data(self) -> None:
        """Data-set report in the log and labels.png in the run folder, before the first epoch."""
        from utils.common.plots import plot_label_stats
        from utils.data.report import dataset_report, format_report

        LOGGER.info("\n%s", format_report(dataset_report(self.cfg.data, self.imgsz)))
        if not self.cfg.noplots:
            plot_label_stats(self.train_dataset.labels, self.names, self.save_dir / "labels.png")

    def _check_anchors(self, model: nn.Module) -> None:
        if self.cfg.noautoanchor:
            return
        from utils.train.autoanchor import check_anchors

        check_anchors(self.train_dataset, model, thr=self.hyp["anchor_t"], imgsz=self.imgsz)

    def preprocess(self, batch: tuple, device: torch.device) -> dict[str, Any]:
        images, targets, paths, _ = batch
        self.device = device
        if self.batches_to_plot and not self.cfg.noplots:
            from utils.common.plots import plot_batch

            index = 3 - self.batches_to_plot
            plot_batch(images.numpy(), targets.numpy(), self.names, self.save_dir / f"train_batch{index}.jpg")
            self.batches_to_plot -= 1
        images = images.to(device, non_blocking=True).float() / 255
        if self.cfg.multi_scale:
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

    # ---------------------------------------------------------------- loss / metrics
    def _loss(self, model: nn.Module) -> ComputeLoss:
        gains = scale_loss_gains(self.hyp, self.nc, model.model[-1].nl, self.imgsz)
        return ComputeLoss(model, gains)

    def criterion(self, model: nn.Module) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
        compute = self._loss(model)
        return lambda preds, batch: compute(preds, batch["targets"])

    def distill_criterion(self, model: nn.Module) -> Callable[[Any, Any, dict[str, Any]], tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
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

    def validate(self, model: nn.Module, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Validate a Conv+BN-fused copy (the EMA model itself keeps training-time structure).

        Returns P, R, mAP50, mAP50-95 and the training loss on the validation batches (``val/box`` ...).
        """
        fused = deepcopy(model).fuse() if hasattr(model, "fuse") else model
        options = ValidationOptions(single_cls=self.cfg.single_cls, plots=plots, save_dir=save_dir,
                                    names=self.names, compute_loss=self._loss(fused) if self.hyp else None)
        metrics = validate_detector(fused, loader, self.nc, options)
        LOGGER.info("\n%s", format_results(metrics, self.names, verbose=plots))
        result = {k: metrics[k] for k in ("P", "R", "mAP50", "mAP50-95")}
        result.update({f"val/{name}": value for name, value in zip(self.loss_names, metrics.get("val_loss", ()))})
        return result

    def final_validation(self, weights: Path, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        from utils.weights.checkpoint import load_checkpoint

        model = load_checkpoint(weights).model.to(self.device)
        return self.validate(model, loader, save_dir, plots)

    def fitness(self, metrics: dict[str, float]) -> float:
        return float(detection_fitness(metrics))

    def epoch_plan(self, epoch: int, epochs: int) -> EpochPlan:
        if self.cycle is None:
            return EpochPlan()
        trainable, text = alternate_plan(epoch, self.cycle, self.backbone)
        return EpochPlan(trainable=trainable, description=text)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"task": "detect", "imgsz": self.imgsz, "data": str(self.cfg.data)}
