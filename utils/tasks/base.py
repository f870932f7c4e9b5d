"""The contract between a task (detection, classification) and everything that uses one.

A task is built from a data YAML and :class:`TaskOptions` (:func:`utils.tasks.build_task`); it owns what differs
between tasks: its loaders (training, validation, calibration, a scoring sample), how a batch becomes a loss,
how a model is validated and summarised, and which number is better. The training loop
(:class:`utils.train.engine.Trainer`) calls only what :class:`Task` declares; so do val.py, the pruning tools
(adaptive BatchNorm, candidate scores, validation before fine-tuning), export's INT8 calibration and
``--evolve``. Training configs never reach a task: train.py turns its flags into :class:`TaskOptions` and a
:class:`ModelSource`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class TaskOptions:
    """What a task needs besides the model and the data YAML (train.py's flag names; defaults are v7.0's)."""

    imgsz: int = 640
    batch_size: int = 16
    workers: int = 2
    seed: int = 0
    single_cls: bool = False
    cache: str | None = None
    rect: bool = False  # rectangular training batches
    image_weights: bool = False
    multi_scale: bool = False
    autoanchor: bool = True
    plots: bool = True
    save_dir: Path = Path("runs/task")
    # classification
    heads_mode: str = "joint"
    head_weights: tuple[float, ...] | None = None
    finetune_epochs: int = 0
    epochs: int = 0  # sequential heads split the epochs between the heads
    distill_temperature: float = 4.0


@dataclass(frozen=True)
class ModelSource:
    """Where a training model comes from: a model YAML and/or a checkpoint, with train.py's size overrides."""

    cfg: str = ""
    weights: str = ""
    nc: int | None = None
    depth_multiple: float | None = None
    width_multiple: float | None = None
    head_balance: str = "none"  # classifiers: "uncertainty" learns the per-head loss weights


@dataclass(frozen=True)
class EvalSettings:
    """How a tool scores a model as it is (val.py's flags; the pruning tools use the defaults)."""

    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    half: bool = False
    augment: bool = False  # test-time augmentation, detectors only
    plots: bool = False
    save_dir: Path | None = None
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    cocoeval: bool = False  # detectors: also score with pycocotools (implies save_json)
    streams: int | None = None  # batches in flight (1: plain per-batch latency, val.py --task speed)
    progress: bool = True
    device: torch.device | str | None = None  # where an artifact's backend puts its outputs (classifiers)


@dataclass(frozen=True)
class ModelInfo:
    """What a task needs to know of a model or an exported artifact: its task, classes, stride."""

    task: str
    names: list[str]
    stride: int = 32
    nc: int | None = None  # detectors: classes predicted
    heads: list[dict[str, Any]] | None = None  # classifiers: [{name, names}, ...]


@dataclass
class EpochPlan:
    """What an epoch trains: ``trainable(name)`` picks parameters (None = all), ``lr_scale`` scales lr."""

    trainable: Callable[[str], bool] | None = None
    lr_scale: float = 1.0
    description: str = ""


LossFn = Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
DistillFn = Callable[[Any, Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


class Task(Protocol):
    name: str  # "detect" | "classify"
    loss_names: tuple[str, ...]  # columns of the per-epoch loss in results.csv and the progress bar
    headline_metrics: tuple[str, ...]  # the metrics --evolve records and summary() prints
    hyp: dict[str, Any]  # hyperparameters (set by the trainer; loss gains, augmentation)
    save_dir: Path  # plots and label files go here
    yaml_file: str  # the data YAML, resolved (for messages)

    # ------------------------------------------------------------------ model
    def build_model(self, source: ModelSource) -> nn.Module:
        """Training model from a YAML and/or checkpoint, with the data's names and pretrained weights."""

    def check_model(self, info: ModelInfo, source: str) -> None:
        """Refuse a model trained on other data (other class count or heads), naming ``source``; afterwards the
        loaders below are built for this model (its stride)."""

    def check_settings(self, settings: EvalSettings) -> None:
        """Refuse evaluation settings the task cannot honour (before any data loads)."""

    def has_split(self, split: str) -> bool:
        """Whether the data YAML names images for ``split`` (train, val, test)."""

    def input_size(self, imgsz: int) -> int:
        """The image size the loaders use for a requested one (detectors round up to the stride, logged)."""

    # ------------------------------------------------------------------ data
    def build_loaders(self, model: nn.Module) -> tuple[DataLoader, DataLoader | None]:
        """Training loader (augmented, shuffled) and validation loader (None without a validation split)."""

    def val_loader(self, split: str = "val", batch_size: int | None = None, rect: bool = True) -> DataLoader:
        """A split scored as validation scores it (v7.0's rectangular batches unless ``rect`` is False)."""

    def calibration_batches(self, count: int) -> list[torch.Tensor]:
        """``count`` uint8 training batches, augmented as in training: adaptive BatchNorm and QAT calibration."""

    def sample_batches(self, images: int) -> list[Any]:
        """Whole batches of a seeded random sample of the validation split covering ``images`` images."""

    def calibration_files(self, split: str = "train") -> list[Path]:
        """Image files of ``split`` in the order the loaders list them (INT8 calibration of exports)."""

    def calibration_image(self, file: str | Path, imgsz: tuple[int, int]) -> torch.Tensor:
        """One image prepared as the validation loader prepares it (RGB CHW float in [0, 1])."""

    def preprocess(self, batch: Any, device: torch.device) -> dict[str, Any]:
        """Collated batch -> dict with at least 'images' (float, on device) and 'n' (batch size)."""

    # ------------------------------------------------------------------ loss
    def criterion(self, model: nn.Module) -> LossFn:
        """``loss_fn(preds, batch) -> (loss to backpropagate, detached loss items matching loss_names)``."""

    def distill_criterion(self, model: nn.Module) -> DistillFn:
        """``--teacher``: ``fn(student preds, teacher's raw preds, batch) -> (loss to add, value to log)``, the
        loss on the task loss's scale (see utils/compress/distill.py)."""

    def epoch_plan(self, epoch: int, epochs: int) -> EpochPlan:
        """Which parameters the task trains this epoch (sequential heads); freezing flags come on top."""

    # ------------------------------------------------------------------ evaluation
    def validate(self, model: nn.Module, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Validation during training (the EMA model, in eval mode): metrics (and validation losses) for
        results.csv, logged as a table."""

    def evaluate(self, model: Any, loader: Any, settings: EvalSettings | None = None) -> dict[str, Any]:
        """Metrics of ``model`` as it is (a module, or an exported artifact's backend) on ``loader``."""

    def final_validation(self, weights: Path, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Validation of a saved checkpoint (best.pt at the end of training)."""

    def score(self, model: nn.Module, batches: Sequence[Any]) -> float:
        """A quick fitness on a few batches (pruning candidates): higher is better."""

    def fitness(self, metrics: dict[str, float]) -> float:
        """Single number to maximise: decides best.pt, early stopping and --evolve."""

    def summary(self, metrics: dict[str, float]) -> str:
        """One line with the headline metrics."""

    def report(self, metrics: dict[str, Any], verbose: bool = False) -> str:
        """The metrics table val.py prints."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """Plain data every checkpoint of this task records (task, image size, data, heads...)."""
