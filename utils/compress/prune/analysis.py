"""The channel analysis the pruning tools use: Torch-Pruning's trace filtered by the registry's declarations
(:mod:`.groups`), then every traced group checked numerically (:mod:`.verify`)."""

from __future__ import annotations

import torch
from torch import nn

from utils.compress.prune.groups import ChannelAnalysis, trace_channels
from utils.compress.prune.verify import split_exact_groups


def analyse_channels(model: nn.Module, imgsz: int = 64, verify: bool = True) -> ChannelAnalysis:
    """Trace ``model`` (a DetectionModel or ClassificationModel) and return its prunable channel groups.

    With ``verify`` every group is also checked numerically (:mod:`utils.compress.prune.verify`): a group whose traced
    channel map does not prune exactly is dropped and its layers reported as kept whole.
    """
    with torch.enable_grad():  # the trace follows autograd; callers may sit inside torch.no_grad()
        analysis = trace_channels(model, imgsz)
    if verify and analysis.groups:
        analysis.groups, failed = split_exact_groups(model, analysis.groups, _check_size(model))
        for group in failed:
            for layer in sorted({m.layer for m in group.members if m.axis == "out"}):
                analysis.kept_whole.setdefault(layer, set()).add(
                    f"traced channel map of {group.name} failed the consistency checks")
    return analysis


def _check_size(model: nn.Module) -> int:
    """The smallest input every layer handles: one cell at the coarsest stride (the check runs per group)."""
    stride = getattr(model, "stride", None)
    return max(int(stride.max()) if stride is not None else 32, 32)
