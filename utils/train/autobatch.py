"""``--batch-size -1`` (YOLOv5's AutoBatch): the largest batch whose training step fills a share of GPU memory.

Memory per step grows close to linearly with the batch, so a few small probe batches (forward and backward) give
a line whose crossing with ``fraction`` of the device's memory is the batch to use. Without CUDA there is no
memory to size against and the batch is v7.0's CPU default, 16.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.common.errors import FlagError
from utils.common.torch_utils import model_input_channels, select_device
from utils.train.config import TrainConfig

LOGGER = logging.getLogger(__name__)

DEFAULT_BATCH = 16
PROBE_BATCHES = (1, 2, 4, 8, 16)
MAX_BATCH = 1024


def resolve_batch_size(cfg: TrainConfig, build_model: Callable[[], nn.Module]) -> TrainConfig:
    """``cfg`` with a real batch size: unchanged unless it asks for AutoBatch (-1); other values < 1 are refused."""
    if cfg.batch_size > 0:
        return cfg
    if cfg.batch_size != -1:
        raise FlagError(f"--batch-size {cfg.batch_size}: give a positive batch size, or -1 for AutoBatch")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise FlagError("--batch-size -1 (AutoBatch) sizes one GPU; with DDP give the total batch size")
    device = select_device(cfg.device)
    if device.type != "cuda":
        LOGGER.info("AutoBatch: no CUDA device, using the CPU default --batch-size %d", DEFAULT_BATCH)
        return dataclasses.replace(cfg, batch_size=DEFAULT_BATCH)
    model = build_model().to(device).train()
    batch = cuda_batch_size(model, cfg.imgsz, device)
    del model
    torch.cuda.empty_cache()
    return dataclasses.replace(cfg, batch_size=batch)


def cuda_batch_size(model: nn.Module, imgsz: int, device: torch.device, fraction: float = 0.6) -> int:
    """Probe a training step at a few batch sizes and pick the batch that uses ``fraction`` of the GPU."""
    total = torch.cuda.get_device_properties(device).total_memory
    measured: list[tuple[int, float]] = []
    for batch in PROBE_BATCHES:
        try:
            measured.append((batch, _step_peak_bytes(model, batch, imgsz, device)))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    batch = batch_for_memory(measured, total * fraction)
    LOGGER.info("AutoBatch: --batch-size %d for %.0f %% of %s's %.1f GB (probed %s)", batch, fraction * 100,
                torch.cuda.get_device_name(device), total / 1e9,
                ", ".join(f"{b}: {m / 1e9:.2f} GB" for b, m in measured))
    return batch


def batch_for_memory(measured: Sequence[tuple[int, float]], budget: float) -> int:
    """The batch where a line fitted through (batch, peak bytes) points reaches ``budget`` bytes.

    Falls back to the default batch when fewer than two probes fit or the line does not rise; the answer is
    clipped to 1 ... ``MAX_BATCH``.
    """
    if len(measured) < 2:
        LOGGER.warning("AutoBatch: too few probe batches fit in memory; using --batch-size %d", DEFAULT_BATCH)
        return DEFAULT_BATCH if not measured else max(1, measured[-1][0])
    batches, peaks = np.array(measured, dtype=float).T
    slope, intercept = np.polyfit(batches, peaks, 1)
    if slope <= 0:
        LOGGER.warning("AutoBatch: memory did not grow with the batch; using --batch-size %d", DEFAULT_BATCH)
        return DEFAULT_BATCH
    return int(np.clip(np.floor((budget - intercept) / slope + 1e-6), 1, MAX_BATCH))  # 1e-6: fit rounding


def _step_peak_bytes(model: nn.Module, batch: int, imgsz: int, device: torch.device) -> float:
    """Peak CUDA memory of one forward and backward pass on a zero batch (BatchNorm statistics restored)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.zeros(batch, model_input_channels(model), imgsz, imgsz, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    _sum_outputs(model(images)).backward()
    torch.cuda.synchronize(device)
    peak = float(torch.cuda.max_memory_allocated(device))
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return peak


def _sum_outputs(outputs: Any) -> torch.Tensor:
    """A scalar that depends on every output tensor (detection maps, classifier logits or heads)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean()
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return sum(_sum_outputs(v) for v in values)
