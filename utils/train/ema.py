"""Exponential moving average of model weights (Polyak averaging with a warm-up ramp, as YOLOv5)."""

from __future__ import annotations

import math
from copy import deepcopy

import torch
from torch import nn

from utils.common.torch_utils import de_parallel


class ModelEMA:
    """Keeps ``ema = d * ema + (1 - d) * model`` for every float tensor of the state dict.

    ``d = decay * (1 - exp(-updates / tau))`` ramps from 0 so that early, poor weights are forgotten fast.
    Buffers (BN statistics) are averaged too. The EMA model is what gets validated and saved.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_max, self.tau = decay, tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self) -> float:
        return self.decay_max * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay()
        source = de_parallel(model).state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"state_dict": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])
