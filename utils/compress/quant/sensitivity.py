"""Per-layer INT8 sensitivity of a float detector, measured on real images (``export.py --int8-keep N``).

Every layer of the YAML before the Detect head (``model.<i>``; the head's convolutions and decoding stay FP32
in the post-training graph anyway) is quantized the way ONNX Runtime's static QDQ quantizes it: its inputs and
every module output inside it to unsigned 8 bits per tensor with calibrated min/max ranges (zero included), its
convolution weights to signed 8 bits per output channel. A layer's sensitivity is how much the error of that
fully quantized model falls when only this layer is left in floating point (leave-one-out: errors compound
through the later layers, which a one-layer-at-a-time measure misses; on the fixture it ranked the stem first
and keeping its top 3 in FP32 lost more mAP than keeping none). The error is measured at the Detect head's
outputs after their sigmoid (box offsets, objectness and class scores of every anchor and cell, as decoding
and NMS see them): ``||y_q - y||^2 / ||y||^2`` per output level over the images, averaged over the levels, so
that the coarse level (few cells, the large objects) weighs as much as the fine one (16x the cells at stride 8
vs 32). Keeping the N highest in FP32 replaces a fixed rule (the old "stride-32 layers") by what this model,
on this data, actually loses.

Simulating each layer in PyTorch takes one forward pass per layer (seconds), where re-quantizing and
re-calibrating the ONNX graph per layer would take minutes each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
    hooks = [conv.register_forward_hook(lambda _m, _a, out: captured.append(out.sigmoid())) for conv in head.m]
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
    images at the export size (they calibrate the ranges and measure the error). A layer's sensitivity is how
    much the error of the fully quantized model falls when that layer alone stays in floating point.
    """
    layers = list(model.model[:-1])
    shared = shared_modules(model)
    with _record_ranges(layers, shared) as ranges:
        reference = _head_outputs(model, images)
    full = _error(_outputs_with(model, images, layers, ranges, shared, skip=None), reference)
    results = []
    for index, layer in enumerate(layers):
        without = _error(_outputs_with(model, images, layers, ranges, shared, skip=index), reference)
        results.append(LayerSensitivity(index, type(layer).__name__, full - without))
    return sorted(results, key=lambda s: s.error, reverse=True)


def _outputs_with(model: nn.Module, images: torch.Tensor, layers: list[nn.Module], ranges, shared: set[int],
                  skip: int | None) -> list[torch.Tensor]:
    """Head outputs with every layer but ``skip`` computing in simulated INT8."""
    with ExitStack() as stack:
        for index, layer in enumerate(layers):
            if index != skip:
                stack.enter_context(_quantized_layer(index, layer, ranges, shared))
        return _head_outputs(model, images)


def _error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Relative squared error per output level, averaged over the levels."""
    errors = [float(((o - r) ** 2).sum()) / max(float((r ** 2).sum()), 1e-12) for o, r in zip(outputs, reference)]
    return sum(errors) / len(errors)


def format_sensitivity(results: list[LayerSensitivity], kept: int) -> str:
    """The ranking as printed by export.py: layer, block type, relative error, and which ones stay FP32."""
    lines = ["INT8 sensitivity (fall of the INT8 model's relative error at the head when the layer stays FP32):"]
    for rank, item in enumerate(results):
        mark = "  <- kept FP32" if rank < kept else ""
        lines.append(f"  layer {item.layer:3d} {item.kind:12s} {item.error:.3e}{mark}")
    return "\n".join(lines)
