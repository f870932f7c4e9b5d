"""Which parameters train: ``--freeze N | backbone | i j k`` and ``--freeze-schedule alternate:K``, as the
training plug-in :class:`Freezing`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from utils.common.errors import FlagError
from utils.common.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)


def frozen_layer_indices(model: nn.Module, spec: list[str] | None) -> set[int]:
    """``['10']`` -> layers 0..9 (YOLOv5 semantics), ``['backbone']`` -> the YAML's backbone section,
    ``['0', '3', '5']`` -> exactly those layers."""
    if not spec:
        return set()
    if spec == ["backbone"]:
        return set(model.backbone_indices())
    try:
        numbers = [int(x) for x in spec]
    except ValueError:
        raise FlagError(f"--freeze expects N, 'backbone' or layer indices, got {spec}") from None
    n_layers = len(model.model)
    frozen = set(range(numbers[0])) if len(numbers) == 1 else set(numbers)
    beyond = sorted(i for i in frozen if not 0 <= i < n_layers) if len(numbers) > 1 else []
    if beyond:
        raise FlagError(f"--freeze {' '.join(spec)}: the model has layers 0-{n_layers - 1}, not {beyond}")
    if frozen >= set(range(n_layers)):
        raise FlagError(f"--freeze {' '.join(spec)} freezes all {n_layers} layers: nothing would train; freeze "
                        f"fewer (the backbone is layers 0-{len(model.backbone_indices()) - 1})")
    return frozen


def layer_index(param_name: str) -> int | None:
    """``'model.12.cv1.conv.weight'`` -> 12 (None for parameters outside the layer list)."""
    parts = param_name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


def trainable_except(layers: set[int]) -> Callable[[str], bool]:
    return lambda name: layer_index(name) not in layers


def trainable_only(layers: set[int]) -> Callable[[str], bool]:
    return lambda name: layer_index(name) in layers


def apply_trainable(model: nn.Module, trainable: Callable[[str], bool] | None) -> int:
    """Set ``requires_grad`` per parameter and keep BatchNorm of fully frozen modules in eval mode.

    Frozen BN layers in train mode would still update their running statistics, i.e. change the frozen part.
    Returns the number of trainable tensors.
    """
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
        count += param.requires_grad
    return count


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Call after ``model.train()``: BN layers whose parameters are all frozen go back to eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def parse_freeze_schedule(spec: str | None) -> int | None:
    """``'alternate:3'`` -> 3 (cycle length); None when no schedule."""
    if not spec:
        return None
    kind, _, k = spec.partition(":")
    if kind != "alternate" or not k.isdigit() or int(k) < 2:
        raise FlagError(f"--freeze-schedule expects alternate:K with K >= 2, got '{spec}'")
    return int(k)


def alternate_plan(epoch: int, cycle: int, backbone: set[int]) -> tuple[Callable[[str], bool], str]:
    """First epoch of each cycle trains the backbone (head frozen); the other cycle-1 epochs train the head."""
    if epoch % cycle == 0:
        return trainable_only(backbone), "backbone (head frozen)"
    return trainable_except(backbone), "head (backbone frozen)"


class Freezing:
    """Training plug-in: ``--freeze`` layers never train; ``--freeze-schedule alternate:K`` alternates backbone and
    head epochs. Checked as soon as the model is built (a bad ``--freeze`` fails before any data loads) and
    applied at every epoch start, on top of what the task's own plan trains."""

    def __init__(self, freeze: list[str] | None, schedule: str | None):
        self.spec = freeze
        self.cycle = parse_freeze_schedule(schedule)
        self.frozen: set[int] = set()
        self.backbone: set[int] = set()

    def on_model_built(self, trainer: Any) -> None:
        model = de_parallel(trainer.model)
        self.frozen = frozen_layer_indices(model, self.spec)
        self.backbone = set(model.backbone_indices())

    def on_train_epoch_start(self, trainer: Any) -> None:
        trainable: Callable[[str], bool] = trainable_except(self.frozen)
        if self.cycle is not None:
            scheduled, text = alternate_plan(trainer.epoch, self.cycle, self.backbone)
            trainable = _both(trainable, scheduled)
            LOGGER.info("epoch %d trains %s", trainer.epoch, text)
        for name, param in de_parallel(trainer.model).named_parameters():
            if not trainable(name):
                param.requires_grad_(False)


def _both(first: Callable[[str], bool], second: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda name: first(name) and second(name)
