"""The peer: Torch-Pruning's own structured pruner, run on our models the way its YOLO examples run it.

Our pruning tools use Torch-Pruning only for its dependency graph and pick channels themselves (BatchNorm
scales, EagleEye's search). To know what that buys, the benchmark (benchmarks/compress.py) also prunes with the
library's pruner as its users do on YOLO models:

* its pruner (``BasePruner``; ``GroupNormPruner`` for the group-norm importance, as in its YOLOv8 example)
  with its importance: ``l1`` / ``l2`` = ``MagnitudeImportance(p, group_reduction="first")``, the norm of each
  group's first layer (classic filter pruning), ``group-norm`` = its default ``GroupMagnitudeImportance(p=2)``,
  the norm over every coupled parameter of the group (DepGraph);
* ``steps`` iterative steps of its linear schedule (importance re-estimated on the shrinking model each step),
  per-layer (local) ranking unless ``global_pruning``, widths rounded to ``round_to``;
* the head's outputs ignored: every module our registry declares fixed by the task or kept whole (for
  ``Detect`` its output convs ``m``, as the examples pass the Detect head in ``ignored_layers``).

The library prunes to a channel ratio, not to a FLOPs budget; so the ratio is found by bisection on the
measured cost of the pruned model (:func:`search_ratio`): thop GFLOPs for a FLOPs budget, or any other
measurement (batch-1 latency) for a latency-matched row. The result is recorded like our tools' results: a
``pruned.widths`` table in the model's YAML (:mod:`models.channels`), so it saves as ``pruned.yaml`` +
``pruned.pt`` and loads without the library.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.channels import widths_table
from utils.compress.prune.groups import declared_constraints, flatten_outputs, forward_with_raw_heads

LOGGER = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "group-norm")


class PeerBudgetError(ValueError):
    """No ratio within the allowed range brings the measured cost within tolerance of the target."""


@dataclass(frozen=True)
class PeerSettings:
    """How the library's pruner runs (its own knobs) and how the ratio search stops."""

    importance: str = "group-norm"
    steps: int = 5  # iterative pruning steps of the library's linear schedule
    global_pruning: bool = False  # the examples rank channels per layer
    round_to: int = 1  # widths a multiple of this; the examples do not round (our tools: --round 8)
    max_ratio: float = 0.9  # no layer loses more than this share of its channels (our --min-keep 0.1)
    tolerance: float = 0.02  # accepted |measured - target|, in the measurement's own unit
    iterations: int = 14  # bisection trials at most


def importance(name: str):
    """The library's importance criterion for ``name`` (one of :data:`IMPORTANCES`)."""
    import torch_pruning as tp

    if name == "group-norm":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name in ("l1", "l2"):
        return tp.importance.MagnitudeImportance(p=int(name[1]), group_reduction="first", normalizer=None)
    raise ValueError(f"unknown importance {name!r}; expected one of {', '.join(IMPORTANCES)}")


def ignored_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose output channels the pruner must keep: the registry's fixed head outputs and kept-whole
    blocks (the library then also keeps every channel coupled to them)."""
    constraints = declared_constraints(model.model)
    paths = sorted(constraints.fixed_outputs | constraints.whole)
    return [model.model.get_submodule(path) for path in paths]


def prune_to_ratio(model: nn.Module, ratio: float, settings: PeerSettings, imgsz: int = 64) -> nn.Module:
    """A copy of ``model`` pruned by the library to channel ratio ``ratio`` in ``settings.steps`` steps, with
    the widths table that rebuilds it from its YAML (``model`` itself is left as it was)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).float().eval()
    example = torch.zeros(1, pruned.yaml.get("ch", 3), imgsz, imgsz)
    pruner_class = tp.pruner.GroupNormPruner if settings.importance == "group-norm" else tp.pruner.BasePruner
    for p in pruned.parameters():  # the library's trace follows autograd; checkpoints often come with it off
        p.requires_grad_(True)
    with torch.enable_grad():
        pruner = pruner_class(pruned, example, importance=importance(settings.importance),
                              global_pruning=settings.global_pruning, pruning_ratio=ratio,
                              max_pruning_ratio=settings.max_ratio, iterative_steps=settings.steps,
                              ignored_layers=ignored_modules(pruned), round_to=settings.round_to,
                              forward_fn=forward_with_raw_heads, output_transform=flatten_outputs)
        for _ in range(settings.steps):
            pruner.step()
    for p in pruned.parameters():
        p.requires_grad_(False)
    pruned.eval()
    for layer in pruned.model:
        layer.np = sum(p.numel() for p in layer.parameters())
    previous = dict(model.yaml.get("pruned") or {})
    widths = {**previous.get("widths", {}), **widths_table(model.model, pruned.model)}
    note = {"method": "torch-pruning", "importance": settings.importance, "steps": settings.steps,
            "global_pruning": settings.global_pruning, "ratio": round(ratio, 6)}
    pruned.yaml = {**model.yaml, "pruned": {**previous, **note, "widths": widths}}
    return pruned


@dataclass(frozen=True)
class SearchResult:
    ratio: float
    model: nn.Module
    value: float  # the measurement at ``ratio``
    trials: int


def search_ratio(model: nn.Module, settings: PeerSettings, measure: Callable[[nn.Module], float],
                 target: float, imgsz: int = 64) -> SearchResult:
    """Bisect the channel ratio until ``measure(pruned)`` (a cost that falls as the ratio grows: FLOPs share,
    latency) is within ``settings.tolerance`` of ``target`` (the first trial that lands is kept).

    Raises :class:`PeerBudgetError` when even ``settings.max_ratio`` stays above the target, or no trial lands
    within tolerance (widths move in steps of ``round_to`` channels).
    """
    def trial(ratio: float) -> SearchResult:
        pruned = prune_to_ratio(model, ratio, settings, imgsz)
        value = measure(pruned)
        LOGGER.info("Torch-Pruning ratio %.4f: %.4f (target %.4f)", ratio, value, target)
        return SearchResult(ratio, pruned, value, 0)

    low, high = 0.0, settings.max_ratio
    best = trial(high)
    trials = 1
    if best.value > target + settings.tolerance:
        raise PeerBudgetError(f"at the largest ratio ({high}) the pruned model still measures {best.value:.4g}, "
                              f"above the target {target:.4g}")
    while trials < settings.iterations and abs(best.value - target) > settings.tolerance:
        middle = trial((low + high) / 2)
        trials += 1
        if abs(middle.value - target) < abs(best.value - target):
            best = middle
        low, high = (middle.ratio, high) if middle.value > target else (low, middle.ratio)
    if abs(best.value - target) > settings.tolerance:
        raise PeerBudgetError(f"the closest of {trials} ratios measures {best.value:.4g}, more than "
                              f"{settings.tolerance} from the target {target:.4g}")
    return SearchResult(best.ratio, best.model, best.value, trials)


def flops_share(model: nn.Module, imgsz: int) -> Callable[[nn.Module], float]:
    """The measurement of a FLOPs budget: a pruned model's thop GFLOPs at ``imgsz`` over ``model``'s."""
    from utils.common.torch_utils import model_gflops

    full = model_gflops(model, imgsz)
    if not full:
        raise PeerBudgetError("thop is not installed: GFLOPs cannot be counted")
    return lambda pruned: (model_gflops(pruned, imgsz) or 0.0) / full
