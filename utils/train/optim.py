"""Optimizer, learning-rate schedule and warm-up, shared by every task."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

NOMINAL_BATCH = 64  # default hyp 'nbs': gradients are accumulated to this batch size, as YOLOv5 does


def parameter_groups(model: nn.Module) -> tuple[list, list, list]:
    """(weights with decay, norm-layer weights without decay, biases without decay)."""
    decayed, norm_weights, biases = [], [], []
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(param)
            elif isinstance(module, norm_types):
                norm_weights.append(param)
            else:
                decayed.append(param)
    return decayed, norm_weights, biases


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov) / Adam / AdamW with three groups; group 0 holds the biases (warm-up starts them high)."""
    decayed, norm_weights, biases = parameter_groups(model)
    if name in {"SGD", "SAM"}:
        optimizer = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        optimizer = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"optimizer '{name}' not supported; use SGD, Adam, AdamW or SAM")
    optimizer.add_param_group({"params": decayed, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    return optimizer


def lr_lambda(epochs: int, lrf: float, cosine: bool) -> Callable[[int], float]:
    """Multiplier of lr0 per epoch: linear or cosine from 1 down to ``lrf``."""
    if cosine:
        return lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


def scheduled_factor(lf: Callable[[int], float], epoch: int) -> float:
    """The lr multiplier epoch ``epoch`` trains at after warm-up: ``lf(epoch - 1)`` (epoch 0: ``lf(0)``).

    YOLOv5 v7.0 sets its LambdaLR back to ``last_epoch = start_epoch - 1`` after building it and steps it at
    each epoch end, so every epoch runs one step behind ``lf``: epoch 4 of 30 at ``lf(3)``, the last epoch at
    ``lf(28)``. We keep the lag so the same recipe follows the same schedule (warm-up still aims at
    ``lf(epoch)``, as in v7.0).
    """
    return lf(max(epoch - 1, 0))


def warmup_step(optimizer: torch.optim.Optimizer, iteration: int, warmup_iters: int, epoch_factor: float, hyp: dict,
                batch_size: int) -> int:
    """Ramp lrs (biases down from ``warmup_bias_lr``, others up from 0) and momentum; returns accumulation."""
    nominal = hyp.get("nbs", NOMINAL_BATCH)
    xi = [0, warmup_iters]
    accumulate = max(1, int(np.interp(iteration, xi, [1, nominal / batch_size]).round()))
    for j, group in enumerate(optimizer.param_groups):
        start = hyp["warmup_bias_lr"] if j == 0 else 0.0
        group["lr"] = float(np.interp(iteration, xi, [start, group["initial_lr"] * epoch_factor]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(iteration, xi, [hyp["warmup_momentum"], hyp["momentum"]]))
    return accumulate


class SAM:
    """Sharpness-Aware Minimization (Foret et al. 2021) around a base optimizer.

    Step 1 moves the weights to ``w + rho * g / ||g||`` (the local worst case), the caller recomputes the loss
    and gradients there, step 2 restores ``w`` and applies the base update with those gradients.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05):
        self.base, self.rho = base, rho
        self._originals: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def perturb(self) -> None:
        params = [p for g in self.base.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2) + 1e-12
        for p in params:
            self._originals[p] = p.detach().clone()
            p.add_(p.grad * (self.rho / norm))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (exactly; subtracting the offset again would leave rounding error)."""
        for p, original in self._originals.items():
            p.copy_(original)
        self._originals.clear()
