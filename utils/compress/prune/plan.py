"""A pruning plan: how many channels each group keeps, and which ones."""

from __future__ import annotations

import math

import torch

Plan = dict[int, torch.Tensor]  # group number -> kept group channels (sorted); absent groups stay whole

MIN_KEEP = 0.1  # --min-keep: no group keeps less than this share of its channels
DEFAULT_MULTIPLE = 8  # --round without --runtime: kept widths rounded up to this (suits GPU and NPU kernels)


def keep_count(wanted: float, size: int, min_keep: float, multiple: int) -> int:
    """Channels a group keeps: ``wanted``, but at least ``min_keep`` of the group (and one channel), rounded up
    to a multiple of ``multiple`` (8 suits GPU and NPU kernels), and never more than the group has."""
    floor = max(math.ceil(min_keep * size - 1e-9), 1)
    count = max(math.ceil(wanted - 1e-9), floor)
    if multiple > 1:
        count = math.ceil(count / multiple) * multiple
    return min(count, size)


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in channel order (ties go to the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values


def plan_from_counts(scores: list[torch.Tensor], counts: dict[int, int]) -> Plan:
    """Keep the best-scored channels of each group that loses any."""
    return {number: keep_top(scores[number], count) for number, count in counts.items()
            if count < len(scores[number])}


def plan_counts(plan: Plan) -> dict[int, int]:
    """Channels each group of ``plan`` keeps (groups it leaves whole are absent, as in the plan)."""
    return {group: len(kept) for group, kept in plan.items()}
