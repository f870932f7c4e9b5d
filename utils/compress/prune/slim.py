"""Network Slimming (Liu et al., ICCV 2017): rank channels by |BatchNorm scale| and cut below one global threshold.

Training with an L1 penalty on the scales (``train.py --sparse``) drives unimportant channels' scales towards
zero, so one threshold over the whole network finds them. A channel that several BatchNorms share (residual
adds) is ranked by its largest scale: it goes only if it is unimportant everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import ChannelGroup, batchnorm_members, reduce_to_group
from utils.compress.prune.plan import Plan, keep_count, plan_from_counts

if TYPE_CHECKING:
    from utils.compress.prune.latency import LatencyModel


def group_scales(layers: nn.Module, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Per group: the largest |gamma| of each group channel over the group's BatchNorms."""
    return [reduce_to_group(group, [(member, bn.weight.detach().abs().float().cpu())
                                    for member, bn in batchnorm_members(group, layers)], "max")
            for group in groups]


def percent_threshold(scales: list[torch.Tensor], percent: float) -> float:
    """The |gamma| below which ``percent`` of all prunable channels lie."""
    values = torch.cat(scales).sort().values
    position = min(int(percent * len(values)), len(values) - 1)
    return float(values[position])


def slimming_counts(scales: list[torch.Tensor], threshold: float, min_keep: float, multiple: int) -> dict[int, int]:
    """Channels each group keeps: those at or above ``threshold``, bounded by ``min_keep`` and rounded."""
    return {number: keep_count(float((s >= threshold).sum()), len(s), min_keep, multiple)
            for number, s in enumerate(scales)}


def slimming_plan(scales: list[torch.Tensor], threshold: float, min_keep: float, multiple: int) -> Plan:
    return plan_from_counts(scales, slimming_counts(scales, threshold, min_keep, multiple))


def budget_threshold(scales: list[torch.Tensor], cost: CostModel | LatencyModel, remain_ratio: float,
                     min_keep: float, multiple: int, steps: int = 40) -> float:
    """The lowest global threshold whose plan keeps at most ``remain_ratio`` of the MACs, or of the predicted
    latency when ``cost`` is a latency model (bisection over the sorted scales); raises ``ValueError`` if even
    the most aggressive plan keeps more."""
    values = torch.cat(scales).unique().sort().values
    ratio = lambda i: cost.ratio(slimming_counts(scales, float(values[i]), min_keep, multiple))  # noqa: E731
    last = len(values) - 1
    if ratio(last) > remain_ratio:
        raise ValueError(f"even cutting every channel to --min-keep {min_keep:g} keeps {ratio(last):.1%} of the "
                         f"{cost.quantity}, above the {remain_ratio:.1%} asked for; lower --min-keep or ask for less")
    low, high = 0, last  # ratio(high) <= remain_ratio
    for _ in range(steps):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        if ratio(middle) <= remain_ratio:
            high = middle
        else:
            low = middle
    return float(values[high]) if ratio(low) > remain_ratio else float(values[low])


def removed_channels(layers: nn.Module, groups: list[ChannelGroup], plan: Plan
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per BatchNorm path (below the layer list): (its prunable channels, those of them the plan removes), as
    boolean masks over the BatchNorm's channels."""
    prunable: dict[str, torch.Tensor] = {}
    removed: dict[str, torch.Tensor] = {}
    for number, group in enumerate(groups):
        dropped = torch.zeros(group.size, dtype=torch.bool)
        if number in plan:
            dropped[:] = True
            dropped[plan[number].long()] = False
        for member, bn in batchnorm_members(group, layers):
            for masks in (prunable, removed):
                masks.setdefault(member.path, torch.zeros(bn.num_features, dtype=torch.bool))
            prunable[member.path][member.index] = True
            removed[member.path][member.index[dropped[member.root]]] = True
    return prunable, removed


def removed_scale_mass(layers: nn.Module, groups: list[ChannelGroup], plan: Plan) -> tuple[float, float]:
    """(sum of |gamma| the plan removes, sum of |gamma| over every prunable BatchNorm channel), each channel
    counted once. After sparse training the channels slimming cuts hold almost none of the mass; a cut that
    removes much of it removes channels the network still uses (how much it will lose before fine-tuning)."""
    prunable, removed = removed_channels(layers, groups, plan)
    total = cut = 0.0
    for path, mask in prunable.items():
        gamma = layers.get_submodule(path).weight.detach().abs().double().cpu()
        total += float(gamma[mask].sum())
        cut += float(gamma[removed[path]].sum())
    return cut, total
