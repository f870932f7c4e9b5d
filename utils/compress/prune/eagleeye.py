"""EagleEye (Li et al., ECCV 2020): random per-layer widths within a FLOPs budget, filters ranked by L1 norm,
each candidate's BatchNorm statistics re-estimated (adaptive BN) and scored on a fixed validation subset.

A candidate's layer-wise keep ratios are drawn around the uniform ratio that meets the budget (found by
bisection on the cost model), so that most draws land within ``remain_ratio +- delta`` and the search spends
its time scoring rather than rejecting; draws outside the band are rejected before any model is built.
The budget is whatever ``cost`` measures: FLOPs (:class:`~utils.compress.prune.cost.CostModel`) or a runtime's
predicted latency (:class:`~utils.compress.prune.latency.LatencyModel`), both through ``cost.ratio(counts)``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from utils.common.torch_utils import recalibrate_batchnorm
from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import ChannelGroup, reduce_to_group
from utils.compress.prune.plan import MIN_KEEP, Plan, keep_count, plan_from_counts
from utils.compress.prune.surgery import prune_model

if TYPE_CHECKING:
    from utils.compress.prune.latency import LatencyModel

    Budget = CostModel | LatencyModel

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings:
    remain_ratio: float | None  # FLOPs (conv + linear MACs) or latency to keep, as a share of the original's
    delta: float  # accepted band: remain_ratio +- delta
    max_iter: int  # candidates to score
    min_keep: float = MIN_KEEP  # no group keeps less than this share of its channels
    multiple: int | None = 8  # widths rounded up to a multiple of this (None: the pruning tool's default)
    spread: float = 0.25  # per-group keep ratios are drawn from centre +- spread
    seed: int = 0
    max_draws: int = 20000  # draws allowed in all before the budget is declared unreachable
    budget_flag: str = ""  # how messages name the budget (default: --remain-ratio R)

    def budget_name(self) -> str:
        return self.budget_flag or f"--remain-ratio {self.remain_ratio:g}"


@dataclass
class Candidate:
    number: int
    ratios: list[float]  # kept share of each group
    flops_ratio: float
    score: float
    seconds: float
    counts: dict[int, int] = field(repr=False, default_factory=dict)
    budget_ratio: float | None = None  # the budgeted share (the FLOPs share under a FLOPs budget)


def filter_norms(layers: nn.Module, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Per group: the L1 norm of each group channel's filters, summed over the convs and linears producing it."""
    norms = []
    for group in groups:
        per_member = []
        for member in group.members:
            module = layers.get_submodule(member.path)
            if member.axis == "out" and isinstance(module, (nn.Conv2d, nn.Linear)):
                per_member.append((member, module.weight.detach().abs().flatten(1).sum(1).float().cpu()))
        norms.append(reduce_to_group(group, per_member, "sum"))
    return norms


class BudgetError(ValueError):
    """No plan within the band exists (or none was drawn); the message says what to change."""


def uniform_centre(cost: Budget, sizes: list[int], settings: SearchSettings) -> float:
    """The keep ratio that, applied to every group, meets the budget (bisection; the cost grows with it)."""
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if cost.ratio(_uniform_counts(sizes, middle, settings)) > settings.remain_ratio:
            high = middle
        else:
            low = middle
    return (low + high) / 2


def _uniform_counts(sizes: list[int], ratio: float, settings: SearchSettings) -> dict[int, int]:
    return {i: keep_count(ratio * size, size, settings.min_keep, settings.multiple) for i, size in enumerate(sizes)}


def check_budget(cost: Budget, sizes: list[int], settings: SearchSettings) -> None:
    """Fail early when even the narrowest plan keeps more than the band allows."""
    narrowest = cost.ratio(_uniform_counts(sizes, 0.0, settings))
    if narrowest > settings.remain_ratio + settings.delta:
        raise BudgetError(
            f"{settings.budget_name()} +- {settings.delta:g} cannot be met: cutting every prunable "
            f"group to --min-keep {settings.min_keep:g} (widths rounded to {settings.multiple}) still keeps "
            f"{narrowest:.1%} of the {cost.quantity}; ask for less, widen --delta, or lower --min-keep/--round")


def scaled_counts(counts: dict[int, int], sizes: list[int], cost: Budget, aim: float,
                  settings: SearchSettings) -> dict[int, int]:
    """A candidate's widths carried to another budget without a new search (a latency budget aimed again after
    the table was measured to be off; :func:`utils.runners.prune.land_on_measured_latency`): every group's width
    scaled by the largest common factor whose share of the budget is at most ``aim``, then widened one rounding
    step at a time, the group cut most (against the candidate) first, while the share stays at most ``aim``.
    The second step matters because widths are rounded: groups whose widths share a factor with the multiple
    step up together, so one factor alone can stop a tenth of the budget short."""
    step = settings.multiple or 1

    def scaled(factor: float) -> dict[int, int]:
        return {i: keep_count(factor * counts[i], sizes[i], settings.min_keep, step) for i in counts}

    if cost.ratio(scaled(0.0)) > aim:
        raise BudgetError(f"no width keeps {aim:.1%} of the {cost.quantity} or less (every group at --min-keep "
                          f"{settings.min_keep:g})")
    low, high = 0.0, max(size / counts[i] for i, size in enumerate(sizes))
    for _ in range(40):
        middle = (low + high) / 2
        if cost.ratio(scaled(middle)) > aim:
            high = middle
        else:
            low = middle
    widths = scaled(low)
    while True:
        for i in sorted(widths, key=lambda i: widths[i] / counts[i]):
            wider = {**widths, i: min(widths[i] + step, sizes[i])}
            if wider[i] > widths[i] and cost.ratio(wider) <= aim:
                widths = wider
                break
        else:
            return widths


def draw_counts(rng: random.Random, sizes: list[int], centre: float, settings: SearchSettings) -> dict[int, int]:
    """One random plan: each group's keep ratio uniform in ``centre +- spread`` (clipped to [min_keep, 1])."""
    low = max(settings.min_keep, centre - settings.spread)
    high = min(1.0, centre + settings.spread)
    return {i: keep_count(rng.uniform(low, high) * size, size, settings.min_keep, settings.multiple)
            for i, size in enumerate(sizes)}


def search(model: nn.Module, groups: list[ChannelGroup], cost: Budget, calibration: list[torch.Tensor],
           score: Callable[[nn.Module], float], settings: SearchSettings) -> list[Candidate]:
    """Score ``settings.max_iter`` candidates; returns them all (the caller keeps the best and writes the CSV)."""
    sizes = [g.size for g in groups]
    check_budget(cost, sizes, settings)
    norms = filter_norms(model.model, groups)
    centre = uniform_centre(cost, sizes, settings)
    rng = random.Random(settings.seed)
    candidates: list[Candidate] = []
    draws = 0
    bar = tqdm(total=settings.max_iter, desc="EagleEye", bar_format="{l_bar}{bar:10}{r_bar}")
    while len(candidates) < settings.max_iter:
        counts = draw_counts(rng, sizes, centre, settings)
        draws += 1
        ratio = cost.ratio(counts)
        if abs(ratio - settings.remain_ratio) > settings.delta:
            if draws >= settings.max_draws and not candidates:
                raise BudgetError(f"no candidate within {settings.budget_name()} +- {settings.delta:g} "
                                  f"({cost.quantity}) in {draws} draws; widen --delta")
            continue
        start = time.perf_counter()
        value = score_plan(model, groups, plan_from_counts(norms, counts), calibration, score)
        seconds = time.perf_counter() - start
        flops = cost.flops_ratio(counts)
        candidates.append(Candidate(len(candidates), [counts[i] / sizes[i] for i in range(len(sizes))], flops,
                                    value, seconds, counts, ratio))
        best = max(c.score for c in candidates)
        shown = f"FLOPs {flops:.3f}" + (f" {cost.quantity} {ratio:.3f}" if cost.quantity != "FLOPs" else "")
        bar.set_postfix_str(f"{shown} score {value:.4f} best {best:.4f} {seconds:.1f} s/candidate")
        bar.update()
    bar.close()
    LOGGER.info("EagleEye: %d candidates from %d draws, %.2f s per candidate (median)", len(candidates), draws,
                sorted(c.seconds for c in candidates)[len(candidates) // 2])
    return candidates


def score_plan(model: nn.Module, groups: list[ChannelGroup], plan: Plan, calibration: list[torch.Tensor],
               score: Callable[[nn.Module], float]) -> float:
    """Prune a copy, re-estimate its BatchNorm statistics, score it."""
    candidate = prune_model(model, groups, plan, record=False)
    recalibrate_batchnorm(candidate, calibration)
    candidate.eval()
    return score(candidate)


def best_plan(model: nn.Module, groups: list[ChannelGroup], candidates: list[Candidate]) -> tuple[Candidate, Plan]:
    """The highest-scoring candidate and its plan (filters ranked by L1 norm, as during the search)."""
    best = max(candidates, key=lambda c: c.score)
    return best, plan_from_counts(filter_norms(model.model, groups), best.counts)
