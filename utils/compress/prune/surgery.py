"""Cut a model down to the channels each group keeps, and record the new widths in its YAML."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from models.channels import is_depthwise, replace_module, slice_leaf, widths_table
from utils.compress.prune.groups import Axis, ChannelGroup, leaves_by_axis


def prune_model(model: nn.Module, groups: list[ChannelGroup], keep: Mapping[int, torch.Tensor],
                note: Mapping[str, object] | None = None, record: bool = True) -> nn.Module:
    """A copy of ``model`` keeping, for each group number in ``keep``, only those group channels.

    Groups not in ``keep`` stay whole. With ``record`` the copy's ``yaml['pruned']`` holds the widths table that
    rebuilds it from the YAML alone (plus ``note``: how it was pruned), so it saves and loads like any other
    model; a search that only scores the copy skips that.
    """
    pruned = copy.deepcopy(model)
    layers = pruned.model
    for path, (keep_out, keep_in) in _kept_indices(layers, groups, keep).items():
        replace_module(layers, path, slice_leaf(layers.get_submodule(path), keep_out, keep_in))
    for layer in layers:
        layer.np = sum(p.numel() for p in layer.parameters())
    if not record:
        return pruned
    # widths are relative to the YAML's rows: an earlier cut's entries stay, this cut's overwrite them
    previous = dict(model.yaml.get("pruned") or {})
    widths = {**previous.get("widths", {}), **widths_table(model.model, layers)}
    pruned.yaml = {**pruned.yaml, "pruned": {**previous, **(note or {}), "widths": widths}}
    return pruned


def _kept_indices(layers: nn.Module, groups: list[ChannelGroup], keep: Mapping[int, torch.Tensor]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Leaf path -> (kept output channels, kept input channels) for every leaf that loses channels."""
    removed: dict[tuple[str, Axis], set[int]] = {}
    for (path, axis), entries in leaves_by_axis(groups).items():
        for number, member in entries:
            if number not in keep:
                continue
            dropped = torch.ones(groups[number].size, dtype=torch.bool)
            dropped[keep[number].long()] = False
            positions = member.index[dropped[member.root]].tolist()
            if positions:
                removed.setdefault((path, axis), set()).update(positions)
    result = {}
    for path in sorted({path for path, _ in removed}):
        module = layers.get_submodule(path)
        out_size, in_size = _axis_sizes(module)
        gone_out = removed.get((path, "out"), set())
        gone_in = removed.get((path, "in"), set())
        if isinstance(module, nn.Conv2d) and is_depthwise(module):
            gone_out = gone_in = gone_out | gone_in  # one filter per channel: input and output go together
        keep_out = _complement(out_size, gone_out)
        keep_in = _complement(in_size, gone_in) if in_size is not None else None
        result[path] = (keep_out, keep_in)
    return result


def _axis_sizes(module: nn.Module) -> tuple[int, int | None]:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.num_features, None


def _complement(size: int, gone: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)
