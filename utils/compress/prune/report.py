"""What a pruning run prints: per-layer channels and parameters before/after, totals, what stayed whole."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.common.torch_utils import count_parameters, model_gflops


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    gflops: float


def model_size(model: nn.Module, imgsz: int) -> ModelSize:
    return ModelSize(count_parameters(model), model_gflops(model, imgsz) or 0.0)


def layer_channels(model: nn.Module, imgsz: int = 64) -> list[int | None]:
    """Output channels of each layer in a dry forward (None for layers whose output is not one map)."""
    channels: list[int | None] = [None] * len(model.model)

    def recorder(index: int):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                channels[index] = int(output.shape[1])
        return hook

    hooks = [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(model.model)]
    weight = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.yaml.get("ch", 3), imgsz, imgsz, dtype=weight.dtype, device=weight.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return channels


def format_layer_table(before: nn.Module, after: nn.Module, kept_whole: dict[int, set[str]], imgsz: int = 64) -> str:
    """One row per layer: module, output channels and parameters before -> after, and why a layer stayed whole."""
    c_before, c_after = layer_channels(before, imgsz), layer_channels(after, imgsz)
    lines = [f"{'layer':>5}  {'module':<18} {'channels':>13} {'params':>21}  note"]
    for i, (old, new) in enumerate(zip(before.model, after.model)):
        n_old, n_new = count_parameters(old), count_parameters(new)
        channels = f"{c_before[i]} -> {c_after[i]}" if c_before[i] is not None else "-"
        note = "; ".join(sorted(kept_whole.get(i, ())))
        lines.append(f"{i:>5}  {type(old).__name__:<18} {channels:>13} {n_old:>9,} -> {n_new:>9,}  {note}".rstrip())
    return "\n".join(lines)


def format_totals(before: ModelSize, after: ModelSize, imgsz: int) -> str:
    return (f"parameters {before.parameters:,} -> {after.parameters:,} ({after.parameters / before.parameters:.1%}), "
            f"GFLOPs at {imgsz} {before.gflops:.2f} -> {after.gflops:.2f} ({after.gflops / before.gflops:.1%})")
