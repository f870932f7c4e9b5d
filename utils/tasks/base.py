"""The contract between the training loop and a task.

:func:`utils.train.engine.fit` owns everything tasks share (device, AMP, EMA, accumulation, warmup, schedule,
freezing, checkpoints, resume, early stop, logging). A task supplies only what differs: its model, its data,
how a batch becomes a loss, how a model is validated, and which number decides ``best.pt``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class EpochPlan:
    """What an epoch trains: ``trainable(name)`` picks parameters (None = all), ``lr_scale`` scales lr."""

    trainable: Callable[[str], bool] | None = None
    lr_scale: float = 1.0
    description: str = ""


class Task(Protocol):
    name: str  # "detect" | "classify"
    loss_names: tuple[str, ...]  # columns of the per-epoch loss in results.csv and the progress bar

    def build_model(self) -> nn.Module:
        """Model from --cfg/--weights, with names set and pretrained weights transferred."""

    def build_loaders(self, model: nn.Module) -> tuple[DataLoader, DataLoader | None]:
        """Training loader (augmented, shuffled) and validation loader (None with --noval and no val set)."""

    def preprocess(self, batch: Any, device: torch.device) -> dict[str, Any]:
        """Collated batch -> dict with at least 'images' (float, on device) and 'n' (batch size)."""

    def criterion(self, model: nn.Module) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
        """``loss_fn(preds, batch) -> (loss to backpropagate, detached loss items matching loss_names)``."""

    def validate(self, model: nn.Module, loader: DataLoader, save_dir: Path, plots: bool) -> dict[str, float]:
        """Metrics of ``model`` (already in eval mode) on ``loader``; keys become results.csv columns."""

    def fitness(self, metrics: dict[str, float]) -> float:
        """Single number to maximise: decides best.pt and early stopping."""

    def epoch_plan(self, epoch: int, epochs: int) -> EpochPlan:
        """Which parameters train this epoch (freezing schedules, sequential heads)."""

    def distill_criterion(self, model: nn.Module) -> Callable[[Any, Any, dict[str, Any]], tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
        """``--teacher``: ``fn(student preds, teacher's raw preds, batch) -> (loss to add, value to log)``, the
        loss on the task loss's scale (see utils/compress/distill.py)."""
