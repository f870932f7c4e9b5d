"""Per-layer INT8 sensitivity of a float detector, measured on real images (``export.py --int8-keep N``).

For each layer of the YAML (``model.<i>``, the Detect head excluded: its convolutions and decoding stay FP32
in the post-training graph anyway) only that layer is quantized the way ONNX Runtime's static QDQ quantizes
it: its inputs and every module output inside it to unsigned 8 bits per tensor with calibrated min/max ranges
(zero included), its convolution weights to signed 8 bits per output channel. The layer's sensitivity is the
error this alone causes at the Detect head's outputs (the logits of every anchor and cell, before decoding):
``||y_q - y||^2 / ||y||^2`` per output level over the images, averaged over the levels, so that the coarse
level (few cells, the large objects) weighs as much as the fine one (16x the cells at stride 8 vs 32).
Ranking the layers by it and keeping the first N in FP32 replaces a fixed rule (the old "stride-32
layers") by what this model, on this data, actually loses.

Simulating each layer in PyTorch takes one forward pass per layer (seconds), where re-quantizing and
re-calibrating the ONNX graph per layer would take minutes each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSensitivity:
    layer: int
    kind: str
    error: float  # relative squared error at the head outputs with only this layer in INT8


def _fake_quant_activation(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-12)
    zero_point = round(-low / scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(dim=tuple(range(1, weight.ndim))).clamp(min=1e-12) / 127.0
    zero_points = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_points, 0, -127, 127)


def _leaves(layer: nn.Module, shared: set[int]) -> list[tuple[str, nn.Module]]:
    """Where ORT would put an output quantizer inside ``layer``: its leaf modules, except that a leaf used in
    several places (v7.0 pickles share one SiLU instance, ``Conv.default_act``, across the whole model) is
    represented by its parents, whose outputs are that activation's outputs: a hook on the shared module itself
    would fire in every layer."""
    points = []
    for name, module in layer.named_modules():
        children = list(module.children())
        own_leaf = not children and not isinstance(module, nn.Identity) and id(module) not in shared
        if own_leaf or any(id(child) in shared for child in children):
            points.append((name, module))
    return points


def shared_modules(model: nn.Module) -> set[int]:
    """ids of modules reachable under more than one name."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return {key for key, count in counts.items() if count > 1}


@contextmanager
def _record_ranges(layers: list[nn.Module], shared: set[int]) -> Iterator[dict[tuple[int, str], list[float]]]:
    """Min/max of every layer input and every leaf output inside ``layers`` while the block runs."""
    ranges: dict[tuple[int, str], list[float]] = {}

    def update(key: tuple[int, str], tensors) -> None:
        for k, t in enumerate(tensors if isinstance(tensors, (list, tuple)) else [tensors]):
            if isinstance(t, torch.Tensor):
                entry = ranges.setdefault((key[0], f"{key[1]}{k}"), [float("inf"), float("-inf")])
                entry[0], entry[1] = min(entry[0], float(t.min())), max(entry[1], float(t.max()))

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, i=index: update((i, "in"), args[0])))
        for name, leaf in _leaves(layer, shared):
            hooks.append(leaf.register_forward_hook(lambda _m, _a, out, i=index, n=name: update((i, f"out:{n}:"), out)))
    try:
        yield ranges
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _quantized_layer(index: int, layer: nn.Module, ranges: dict[tuple[int, str], list[float]],
                     shared: set[int]) -> Iterator[None]:
    """Within the block, ``layer`` computes as ORT's static INT8 would (inputs, outputs, weights)."""

    def quantize(key_prefix: str, tensors):
        if isinstance(tensors, (list, tuple)):
            return type(tensors)(quantize_one(f"{key_prefix}{k}", t) for k, t in enumerate(tensors))
        return quantize_one(f"{key_prefix}0", tensors)

    def quantize_one(key: str, tensor):
        low_high = ranges.get((index, key))
        return _fake_quant_activation(tensor, *low_high) if low_high and isinstance(tensor, torch.Tensor) else tensor

    hooks = [layer.register_forward_pre_hook(lambda _m, args: (quantize("in", args[0]), *tuple(args[1:])))]
    for name, leaf in _leaves(layer, shared):
        hooks.append(leaf.register_forward_hook(lambda _m, _a, out, n=name: quantize(f"out:{n}:", out)))
    saved = {}
    for conv in (m for m in layer.modules() if isinstance(m, nn.Conv2d)):
        saved[conv] = conv.weight.data
        conv.weight.data = _fake_quant_weight(conv.weight.data)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for conv, weight in saved.items():
            conv.weight.data = weight


def _head_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    head = model.model[-1]
    captured: list[torch.Tensor] = []
    hooks = [conv.register_forward_hook(lambda _m, _a, out: captured.append(out)) for conv in head.m]
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def measure_layer_sensitivity(model: nn.Module, images: torch.Tensor) -> list[LayerSensitivity]:
    """Sensitivity of every layer before the Detect head, most sensitive first.

    ``model`` is a fused, eval-mode float detector (``prepare_for_export``); ``images`` real letterboxed
    images at the export size (they calibrate the ranges and measure the error).
    """
    layers = list(model.model[:-1])
    shared = shared_modules(model)
    with _record_ranges(layers, shared) as ranges:
        reference = _head_outputs(model, images)
    results = []
    for index, layer in enumerate(layers):
        with _quantized_layer(index, layer, ranges, shared):
            outputs = _head_outputs(model, images)
        errors = [float(((o - r) ** 2).sum()) / max(float((r ** 2).sum()), 1e-12) for o, r in zip(outputs, reference)]
        results.append(LayerSensitivity(index, type(layer).__name__, sum(errors) / len(errors)))
    return sorted(results, key=lambda s: s.error, reverse=True)


def format_sensitivity(results: list[LayerSensitivity], kept: int) -> str:
    """The ranking as printed by export.py: layer, block type, relative error, and which ones stay FP32."""
    lines = ["INT8 sensitivity (relative squared error at the head with only that layer in INT8):"]
    for rank, item in enumerate(results):
        mark = "  <- kept FP32" if rank < kept else ""
        lines.append(f"  layer {item.layer:3d} {item.kind:12s} {item.error:.3e}{mark}")
    return "\n".join(lines)
