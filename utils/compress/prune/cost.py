"""How many multiply-accumulates a pruning plan leaves, without building the pruned model.

A search that draws hundreds of candidate plans (EagleEye) or bisects a threshold (slimming to a FLOPs budget)
needs the cost of a plan in microseconds. Convolutions and linear layers are >99 % of a YOLO model's MACs and
their cost is a product of widths, so one forward pass that records each layer's output size is enough:

    conv:      out x in / groups x kh x kw x H_out x W_out      (depthwise: channels x kh x kw x H_out x W_out)
    linear:    out x in x tokens

The ratio of two such counts is what ``--remain-ratio`` budgets; the printed GFLOPs come from thop on the real
pruned model. The per-layer split (:meth:`CostModel.layer_macs`) is what the latency model
(:mod:`utils.compress.prune.latency`) interpolates each layer's measured time against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from models.channels import is_depthwise
from utils.compress.prune.groups import ChannelGroup


@dataclass(frozen=True)
class _Leaf:
    out: int
    inp: int
    per_pair: float  # MACs per (output channel x input channel) pair, or per channel for depthwise convs
    depthwise: bool

    def macs(self, out_removed: int, in_removed: int) -> float:
        if self.depthwise:
            return (self.out - max(out_removed, in_removed)) * self.per_pair
        return (self.out - out_removed) * (self.inp - in_removed) * self.per_pair


class CostModel:
    """MACs of ``model`` at ``imgsz`` as a function of how many channels each group keeps.

    Both searches budget ``ratio(counts)``; :class:`utils.compress.prune.latency.LatencyModel` offers the same
    interface for a measured latency, so either can be handed to them. ``quantity`` names what is budgeted in
    messages."""

    quantity = "FLOPs"

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], imgsz: int):
        self.groups = groups
        self.leaves = _profile(model, imgsz)
        # (group, leaf, axis) -> positions one group channel occupies there (4 for SPPF's concatenated pools)
        self.cuts = [[(m.path, m.axis, len(m.index) // g.size) for m in g.members if m.path in self.leaves]
                     for g in groups]
        self.full = self.macs({})

    def macs(self, keep_counts: Mapping[int, int]) -> float:
        """Total conv + linear MACs when group ``i`` keeps ``keep_counts[i]`` channels (others stay whole)."""
        removed = self._removed(keep_counts)
        return sum(leaf.macs(removed.get((path, "out"), 0), removed.get((path, "in"), 0))
                   for path, leaf in self.leaves.items())

    def layer_macs(self, keep_counts: Mapping[int, int]) -> dict[int, float]:
        """MACs per layer of the model's layer list (the YAML rows) under the same plan; layers without a conv or
        linear layer are absent."""
        removed = self._removed(keep_counts)
        layers: dict[int, float] = {}
        for path, leaf in self.leaves.items():
            layer = int(path.split(".", 1)[0])
            layers[layer] = layers.get(layer, 0.0) + leaf.macs(removed.get((path, "out"), 0),
                                                               removed.get((path, "in"), 0))
        return layers

    def _removed(self, keep_counts: Mapping[int, int]) -> dict[tuple[str, str], int]:
        """(leaf path, axis) -> positions the plan removes there."""
        removed: dict[tuple[str, str], int] = {}
        for number, kept in keep_counts.items():
            dropped = self.groups[number].size - kept
            if dropped <= 0:
                continue
            for path, axis, per_channel in self.cuts[number]:
                removed[(path, axis)] = removed.get((path, axis), 0) + dropped * per_channel
        return removed

    def ratio(self, keep_counts: Mapping[int, int]) -> float:
        return self.macs(keep_counts) / self.full

    def flops_ratio(self, keep_counts: Mapping[int, int]) -> float:
        """The FLOPs share (here the budgeted ratio itself), reported next to a latency budget's ratio."""
        return self.ratio(keep_counts)


def _profile(model: nn.Module, imgsz: int) -> dict[str, _Leaf]:
    """One forward pass recording every conv's output size and every linear layer's token count."""
    leaves: dict[str, _Leaf] = {}
    hooks = []
    for path, module in model.model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(_recorder(path, leaves)))
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
    return leaves


def _recorder(path: str, leaves: dict[str, _Leaf]):
    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            spatial = output.shape[-2] * output.shape[-1]
            if is_depthwise(module):
                leaves[path] = _Leaf(module.out_channels, module.in_channels, kh * kw * spatial, True)
            else:
                per_pair = kh * kw * spatial / module.groups
                leaves[path] = _Leaf(module.out_channels, module.in_channels, per_pair, False)
        else:
            tokens = output.numel() // output.shape[0] // module.out_features
            leaves[path] = _Leaf(module.out_features, module.in_features, float(tokens), False)
    return record
