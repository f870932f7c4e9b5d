"""A numerical check of every traced channel group: removing channels that carry zeros changes nothing.

The dependency trace maps each group channel to positions in its leaves; a wrong map (seen with GhostNet's
``cat(y, depthwise(y))`` feeding a residual add, where the trace assigns a conv and its own BatchNorm different
channels) would silently build a wrong model. So each group is tested the way pruning is meant to work: in
float64, set the BatchNorm scale and shift of a random third of its channels to zero, cut exactly those
channels, and compare the outputs. All groups are tested at once; only when that fails is each group tested
alone, and the failing ones are dropped (their layers are reported as kept whole).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from utils.compress.prune.groups import ChannelGroup, batchnorm_members, flatten_outputs, uniform_map
from utils.compress.prune.surgery import prune_model

LOGGER = logging.getLogger(__name__)
TOLERANCE = 1e-6  # float64: exact removals differ by rounding only (~1e-13)


def split_exact_groups(model: nn.Module, groups: list[ChannelGroup], imgsz: int
                       ) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """(groups whose removal is exact, together and one by one; groups that failed a check)."""
    groups, bad = _drop_overlapping(groups)
    probe = copy.deepcopy(model).double().eval()
    image = torch.randn(1, probe.yaml.get("ch", 3), imgsz, imgsz, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    if _removal_is_exact(probe, groups, range(len(groups)), image):
        return groups, bad
    good = []
    for number, group in enumerate(groups):
        (good if _removal_is_exact(probe, groups, [number], image) else bad).append(group)
    if not _removal_is_exact(probe, good, range(len(good)), image):  # exact one by one, not together
        return [], bad + good
    LOGGER.info("channel check: %d of %d traced groups fail to prune exactly and stay whole", len(bad),
                len(groups) + len(bad))
    return good, bad


def _drop_overlapping(groups: list[ChannelGroup]) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """Structural checks before the numerical one. In a consistent map each group channel a member holds
    occupies the same number of its positions, and no two groups claim the same channel of a leaf; a trace that
    merged two paths breaks one of these (drop the groups involved)."""
    owner: dict[tuple[str, str, int], int] = {}
    clashing: set[int] = set()
    for number, group in enumerate(groups):
        if not all(uniform_map(member.root) for member in group.members):
            clashing.add(number)
        for member in group.members:
            for position in member.index.unique().tolist():
                key = (member.path, member.axis, position)
                if owner.setdefault(key, number) != number:
                    clashing |= {owner[key], number}
    return ([g for i, g in enumerate(groups) if i not in clashing],
            [g for i, g in enumerate(groups) if i in clashing])


def _removal_is_exact(model: nn.Module, groups: list[ChannelGroup], numbers, image: torch.Tensor) -> bool:
    """Zero a random third of each listed group's BatchNorm channels (in place, restored after), cut them from a
    copy, and compare the outputs."""
    generator = torch.Generator().manual_seed(1)
    keep, saved = {}, []
    for number in numbers:
        group = groups[number]
        if group.size < 2:
            continue
        order = torch.randperm(group.size, generator=generator)
        dropped = order[: max(group.size // 3, 1)]
        keep[number] = order[len(dropped):].sort().values
        for member, bn in batchnorm_members(group, model.model):
            positions = member.index[torch.isin(member.root, dropped)]
            saved.append((bn, positions, bn.weight.data[positions].clone(), bn.bias.data[positions].clone()))
            bn.weight.data[positions] = 0
            bn.bias.data[positions] = 0
    try:
        with torch.no_grad():
            expected = flatten_outputs(model(image))
            result = flatten_outputs(prune_model(model, groups, keep, record=False)(image))
    except RuntimeError:  # widths that do not fit together
        return False
    finally:
        for bn, positions, weight, bias in reversed(saved):
            bn.weight.data[positions] = weight
            bn.bias.data[positions] = bias
    return all(a.shape == b.shape and bool((a - b).abs().max() <= TOLERANCE * max(1.0, float(a.abs().max())))
               for a, b in zip(expected, result, strict=True))
