"""What the pruning tools need from a data set: calibration images, a quick score, and the full validation.

EagleEye (Li et al., ECCV 2020) scores hundreds of pruned candidates, so the images are loaded once and kept
as tensors: ``calibration`` (training batches, for detectors with their mosaic augmentation) re-estimates
BatchNorm statistics, ``score`` ranks a candidate on a fixed, seeded sample of the validation split,
``validate`` gives the numbers printed before fine-tuning.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from utils.evaluation.metrics import fitness as detection_fitness

LOGGER = logging.getLogger(__name__)


@dataclass
class PruneData:
    calibration: list[torch.Tensor]  # uint8 image batches for BatchNorm re-estimation
    score: Callable[[nn.Module], float]  # higher is better, on a fixed validation subset
    validate: Callable[[nn.Module], dict[str, float]]  # the whole validation split
    summary: Callable[[dict[str, float]], str]  # one line: the headline metrics
    score_files: list[str]  # the validation images ``score`` uses (a seeded sample of the split)


def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Adaptive BatchNorm: running statistics re-estimated as a plain mean over ``batches`` (train-mode forward).

    A pruned network's surviving channels see different inputs than before, so the trained running statistics
    no longer fit; EagleEye shows that a candidate's accuracy after this step predicts its accuracy after
    fine-tuning, while its accuracy before it does not.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    model.train()
    try:
        with torch.no_grad():
            for images in batches:
                model(images.to(device).float() / 255)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)


def prune_data(model: nn.Module, data: str, imgsz: int, batch_size: int, calibration_batches: int,
               score_images: int, workers: int = 2, seed: int = 0) -> PruneData:
    """Detection or classification data for ``model`` (chosen by its head)."""
    if hasattr(model.model[-1], "anchors"):
        return _detection_data(model, data, imgsz, batch_size, calibration_batches, score_images, workers, seed)
    return _classification_data(model, data, imgsz, batch_size, calibration_batches, score_images, workers, seed)


def _detection_data(model: nn.Module, data: str, imgsz: int, batch_size: int, calibration_batches: int,
                    score_images: int, workers: int, seed: int) -> PruneData:
    from utils.data import create_dataloader, load_data_config
    from utils.evaluation.detection import ValidationOptions, format_results, validate_detector
    from utils.train.config import DEFAULT_HYP, load_hyp

    cfg = load_data_config(data)
    nc, names = int(cfg["nc"]), list(cfg["names"])
    stride = max(int(model.stride.max()), 32)
    # the training augmentation (mosaic): plain letterboxed images give other statistics than the model was
    # trained with, and re-estimating on them cost the unpruned fixture a third of its score (0.309 -> 0.217)
    train_loader, _ = create_dataloader(cfg["train"], imgsz, batch_size, stride, hyp=load_hyp(DEFAULT_HYP),
                                        augment=True, shuffle=True, seed=seed, workers=workers, nc=nc,
                                        prefix="calibration: ")
    calibration = [batch[0] for batch in itertools.islice(train_loader, calibration_batches)]
    val_loader, _ = create_dataloader(cfg["val"], imgsz, batch_size, stride, augment=False, rect=True, pad=0.5,
                                      workers=workers, nc=nc, prefix="val: ")
    # a seeded random sample, not the first files: sorted names put whole classes first (NEU-DET: crazing only)
    score_loader, _ = create_dataloader(cfg["val"], imgsz, batch_size, stride, augment=False, shuffle=True,
                                        seed=seed, workers=workers, nc=nc, prefix="score: ")
    subset = _first_images(score_loader, score_images)
    # a raised confidence floor: a broken candidate's thousands of near-zero boxes would make NMS the bottleneck
    quiet = ValidationOptions(conf_thres=0.01, names=names, progress=False)

    def score(candidate: nn.Module) -> float:
        return float(detection_fitness(validate_detector(candidate, subset, nc, quiet)))

    def validate(candidate: nn.Module) -> dict[str, float]:
        metrics = validate_detector(candidate, val_loader, nc, ValidationOptions(names=names))
        LOGGER.info("\n%s", format_results(metrics, names, verbose=1 < nc < 50))
        return {k: float(metrics[k]) for k in ("P", "R", "mAP50", "mAP50-95")}

    def summary(metrics: dict[str, float]) -> str:
        return f"mAP@.5 {metrics['mAP50']:.4f}, mAP@.5:.95 {metrics['mAP50-95']:.4f}"

    return PruneData(calibration, score, validate, summary, _files(subset, score_images))


def _files(batches: list, count: int) -> list[str]:
    return [str(path) for batch in batches for path in batch[2]][:count]


def _first_images(loader: Any, count: int) -> list:
    """Whole batches from the start of ``loader`` until ``count`` images are covered (a fixed scoring subset)."""
    batches, seen = [], 0
    for batch in loader:
        batches.append(batch)
        seen += len(batch[0])
        if seen >= count:
            break
    return batches


def _classification_data(model: nn.Module, data: str, imgsz: int, batch_size: int, calibration_batches: int,
                         score_images: int, workers: int, seed: int) -> PruneData:
    from models.classify import heads_of
    from utils.data.classify import create_split_loader
    from utils.tasks.classify import format_classifier_results, scalar_metrics, validate_classifier

    heads = heads_of(model)
    train_loader, _ = create_split_loader(data, "train", imgsz, batch_size, workers=workers, seed=seed)
    calibration = [batch[0] for batch in itertools.islice(train_loader, calibration_batches)]
    val_loader, _ = create_split_loader(data, "val", imgsz, batch_size, workers=workers)
    score_loader, _ = create_split_loader(data, "val", imgsz, batch_size, workers=workers, seed=seed, shuffle=True)
    subset = _first_images(score_loader, score_images)

    def score(candidate: nn.Module) -> float:
        return validate_classifier(candidate, subset, heads)["mean/top1"]

    def validate(candidate: nn.Module) -> dict[str, float]:
        metrics = validate_classifier(candidate, val_loader, heads)
        LOGGER.info("\n%s", format_classifier_results(metrics, heads))
        return scalar_metrics(metrics)

    def summary(metrics: dict[str, float]) -> str:
        return f"mean top-1 {metrics['mean/top1']:.4f}"

    return PruneData(calibration, score, validate, summary, _files(subset, score_images))
