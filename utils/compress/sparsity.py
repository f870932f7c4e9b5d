"""Sparse training for Network Slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
Network Slimming"): an L1 penalty on the BatchNorm scale factors (gamma) of the prunable layers.

``train.py --sparse S`` adds the penalty's subgradient ``S * sign(gamma)`` to each gamma's gradient once per
optimizer step, after the task's gradients are final (unscaled, clipped; SAM's second pass done). Channels the
task does not need then drift to gamma ~ 0, which is what ``prune_slim.py``'s global |gamma| threshold cuts.
``--sparse-decay linear|cos`` lowers S over training to 10 % of its start, so the last epochs mostly let the
kept channels recover accuracy while the ones already near zero stay there.

``--sparse-remain R`` aims the penalty: at the start of every epoch the channels that ``prune_slim.py
--remain-ratio R`` would cut from the model as it is then are found (same ranking, same rounding), and only their
gammas get the L1 term. Plain L1 pulls every gamma down at the same rate, so the channels the cut will keep are
held back as long as the unimportant ones need to reach zero (docs/prune.md: 30 epochs of ``--sparse 0.02`` on
yolov5n cost 16.8 points of mAP@.5:.95); aimed, the kept channels train freely while the cut ones fade out, and a
channel the task needs can climb back out of the cut set, since the ranking is redone every epoch.

Logged each epoch (on the EMA model, the one saved and later pruned): the share of prunable gammas with
|gamma| < 0.01 (results.csv ``sparsity/gamma<0.01``, TensorBoard) and a gamma histogram (TensorBoard); at
the end a PNG of the final |gamma| distribution (``bn_gamma.png`` in the run folder, unless ``--noplots``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from utils.common.errors import UserError

if TYPE_CHECKING:
    from utils.compress.prune.groups import ChannelAnalysis
    from utils.train.config import TrainConfig

LOGGER = logging.getLogger(__name__)

SMALL_GAMMA = 0.01  # |gamma| below this counts as "switched off" in the logged share
SPARSE_DECAYS = ("none", "linear", "cos")
FINAL_FRACTION = 0.1  # linear/cos decay end at this fraction of --sparse
SHARE_COLUMN = f"sparsity/gamma<{SMALL_GAMMA}"
HISTOGRAM_TAG = "sparsity/gamma"
PLOT_NAME = "bn_gamma.png"


def prunable_batchnorm_paths(model: nn.Module, analysis: ChannelAnalysis | None = None) -> list[str]:
    """Paths (below ``model.model``) of the BatchNorms in the model's prunable channel groups.

    These are exactly the gammas ``prune_slim.py`` ranks: the dependency analysis of :mod:`utils.compress.prune.groups`
    leaves out the heads' outputs and every channel coupled to a block the registry keeps whole.
    """
    from utils.compress.prune.analysis import analyse_channels
    from utils.compress.prune.groups import batchnorm_members

    layers = model.model
    analysis = analyse_channels(model) if analysis is None else analysis
    paths = {member.path for group in analysis.groups for member, _ in batchnorm_members(group, layers)}
    return sorted(paths, key=_layer_order(layers))


def _layer_order(layers: nn.Module):
    order = {path: i for i, (path, _) in enumerate(layers.named_modules())}
    return lambda path: order[path]


def prunable_batchnorms(model: nn.Module, paths: list[str] | None = None) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers whose channels the pruning tools may remove (``paths`` from an earlier call on a
    model of the same structure, e.g. the training model for its EMA copy, saves the analysis)."""
    paths = prunable_batchnorm_paths(model) if paths is None else paths
    return [model.model.get_submodule(path) for path in paths]


def gamma_values(model: nn.Module, paths: list[str] | None = None) -> torch.Tensor:
    """All prunable gammas of ``model`` as one flat float32 CPU tensor (signed)."""
    norms = prunable_batchnorms(model, paths)
    if not norms:
        return torch.zeros(0)
    return torch.cat([bn.weight.detach().float().flatten().cpu() for bn in norms])


def small_gamma_share(model: nn.Module, threshold: float = SMALL_GAMMA, paths: list[str] | None = None) -> float:
    """Share of the prunable gammas with |gamma| < ``threshold`` (0 when the model has none)."""
    values = gamma_values(model, paths)
    return float((values.abs() < threshold).float().mean()) if values.numel() else 0.0


def sparsity_strength(strength: float, decay: str, epoch: int, epochs: int) -> float:
    """S for ``epoch``: constant, or falling from ``strength`` to 10 % of it over the run (linear or cosine).

    A function of the epoch alone, so a resumed run applies the same S as an uninterrupted one.
    """
    if decay not in SPARSE_DECAYS:
        raise ValueError(f"sparse decay '{decay}' unknown; use one of {SPARSE_DECAYS}")
    progress = min(max(epoch / max(epochs - 1, 1), 0.0), 1.0)
    if decay == "linear":
        factor = 1 - (1 - FINAL_FRACTION) * progress
    elif decay == "cos":
        factor = FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    return strength * factor


@torch.no_grad()
def add_l1_subgradient(gammas: list[torch.Tensor], strength: float,
                       masks: list[torch.Tensor] | None = None) -> None:
    """``grad += strength * sign(gamma)`` for every gamma that has a gradient (frozen ones have none); with
    ``masks`` (one 0/1 tensor per gamma) only where the mask is 1."""
    for number, gamma in enumerate(gammas):
        if gamma.grad is not None:
            term = torch.sign(gamma) if masks is None else torch.sign(gamma) * masks[number]
            gamma.grad.add_(term, alpha=strength)


class SlimmingTarget:
    """The channels a slimming cut to ``remain`` of the FLOPs would remove from a model now: what
    ``--sparse-remain`` penalises. The ranking, the floor (``min_keep``) and the width rounding (``multiple``)
    are ``prune_slim.py --remain-ratio``'s, so the channels that fade out are the ones the cut will take."""

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, remain: float, imgsz: int,
                 min_keep: float | None = None, multiple: int | None = None):
        from utils.compress.prune.cost import CostModel
        from utils.compress.prune.plan import DEFAULT_MULTIPLE, MIN_KEEP, keep_count

        self.groups, self.remain = analysis.groups, remain
        self.min_keep = MIN_KEEP if min_keep is None else min_keep
        self.multiple = DEFAULT_MULTIPLE if multiple is None else multiple
        self.cost = CostModel(model, self.groups, imgsz)
        floor = {number: keep_count(0, group.size, self.min_keep, self.multiple)
                 for number, group in enumerate(self.groups)}
        if self.cost.ratio(floor) > remain:
            raise ValueError(f"even cutting every channel to --min-keep {self.min_keep:g} keeps "
                             f"{self.cost.ratio(floor):.1%} of the FLOPs, above the {remain:.1%} asked for")

    def masks(self, model: nn.Module, paths: list[str]) -> list[torch.Tensor]:
        """One float 0/1 mask per BatchNorm in ``paths``: 1 on the channels the cut would remove. All 0 while the
        gammas are too alike to rank (a model built from scratch starts with every gamma at 1: the first epoch
        then trains unpenalised and tells the channels apart)."""
        from utils.compress.prune import slim

        layers = model.model
        scales = slim.group_scales(layers, self.groups)
        try:
            threshold = slim.budget_threshold(scales, self.cost, self.remain, self.min_keep, self.multiple)
        except ValueError:  # feasible (checked when built), so the scales tie: no threshold separates them
            return [torch.zeros(layers.get_submodule(path).num_features) for path in paths]
        plan = slim.slimming_plan(scales, threshold, self.min_keep, self.multiple)
        _, removed = slim.removed_channels(layers, self.groups, plan)
        return [removed[path].float() if path in removed else torch.zeros(layers.get_submodule(path).num_features)
                for path in paths]


def check_sparse_flags(cfg: TrainConfig) -> None:
    """--sparse must be >= 0 and finite; --sparse-decay one of none, linear, cos; --sparse-remain 0 (off) or a
    share in (0, 1)."""
    if not (math.isfinite(cfg.sparse) and cfg.sparse >= 0):
        raise UserError(f"--sparse {cfg.sparse}: the L1 strength on BatchNorm gammas must be >= 0 (e.g. 1e-4)")
    if cfg.sparse_decay not in SPARSE_DECAYS:
        raise UserError(f"--sparse-decay {cfg.sparse_decay}: use one of {', '.join(SPARSE_DECAYS)}")
    if not (math.isfinite(cfg.sparse_remain) and 0 <= cfg.sparse_remain < 1):
        raise UserError(f"--sparse-remain {cfg.sparse_remain}: expected the FLOPs share prune_slim.py will keep, "
                        "strictly between 0 and 1 (e.g. 0.5), or 0 to penalise every prunable gamma")
    for flag, value in (("--sparse-decay", cfg.sparse_decay != "none"), ("--sparse-remain", cfg.sparse_remain)):
        if value and not cfg.sparse:
            LOGGER.warning("%s has no effect without --sparse S", flag)
    if cfg.sparse and cfg.optimizer in ADAPTIVE_OPTIMIZERS:
        LOGGER.warning("warning: --sparse with --optimizer %s: it divides every gradient by its running size, so the "
                       "L1 term moves a gamma by about lr0 per step whatever S is, and gammas starting near 1 do "
                       "not reach 0 (docs/prune.md); sparse-train with --optimizer SGD", cfg.optimizer)


# Optimizers that normalise each gradient by a running estimate of its size: the L1 subgradient S * sign(gamma)
# becomes a step of ~lr whatever S is. Measured 2026-12-08 (yolov5n-mcls-s on fashion-color-type, Adam, lr0 0.002,
# 10 epochs, --sparse 0.05 --sparse-remain 0.5): the penalised gammas fell from ~1 to 0.59-0.61, none below 0.01.
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW")


class SparseTraining:
    """Training plug-in for ``--sparse``: the gradient term each optimizer step, the per-epoch logging of the EMA
    model (the one saved and later pruned) and the final |gamma| plot.

    Holds the gamma Parameters themselves, not their modules, so it survives SyncBatchNorm conversion (which
    moves the same Parameters into new modules) and DDP wrapping.
    """

    def __init__(self, strength: float, decay: str = "none", plots: bool = True, remain: float = 0.0,
                 imgsz: int = 640):
        self.strength, self.decay, self.plots = strength, decay, plots
        self.remain, self.imgsz = remain, imgsz  # --sparse-remain (0: every prunable gamma) and its cost's size
        self.paths: list[str] = []
        self.gammas: list[torch.Tensor] = []
        self.target: SlimmingTarget | None = None
        self.masks: list[torch.Tensor] | None = None  # this epoch's aimed channels (None: all)

    # ---------------------------------------------------------------- plug-in hooks
    def on_pretrain_routine_end(self, trainer: Any) -> None:
        from utils.common.torch_utils import de_parallel

        self.attach(de_parallel(trainer.model))

    def on_train_epoch_start(self, trainer: Any) -> None:
        if self.target is not None:
            from utils.common.torch_utils import de_parallel

            self.aim(trainer.ema.ema if trainer.ema is not None else de_parallel(trainer.model),
                     share=trainer.world_size > 1)

    def on_before_optimizer_step(self, trainer: Any) -> None:
        self.apply(trainer.epoch, trainer.epochs)

    def on_train_epoch_end(self, trainer: Any) -> None:
        if trainer.ema is not None:
            trainer.extra_scalars.update(self.epoch_row(trainer.ema.ema))
            trainer.extra_histograms.update(self.epoch_histograms(trainer.ema.ema))

    def on_train_end(self, trainer: Any) -> None:
        if self.plots and trainer.ema is not None:
            self.plot(trainer.ema.ema, trainer.save_dir)

    # ---------------------------------------------------------------- the work
    def attach(self, model: nn.Module) -> None:
        """Find the prunable gammas of ``model`` (the training model; its EMA copy has the same paths) and, with
        ``remain``, what a cut to that share of the FLOPs would cost."""
        from utils.compress.prune.analysis import analyse_channels

        analysis = analyse_channels(model)
        self.paths = prunable_batchnorm_paths(model, analysis)
        self.gammas = [bn.weight for bn in prunable_batchnorms(model, self.paths)]
        aimed = f", aimed at the channels a cut to {self.remain:g} of the FLOPs removes" if self.remain else ""
        LOGGER.info("--sparse %g (decay %s): L1 on %d BatchNorm gammas in %d layers%s", self.strength, self.decay,
                    sum(g.numel() for g in self.gammas), len(self.gammas), aimed)
        if self.remain:
            try:
                self.target = SlimmingTarget(model, analysis, self.remain, self.imgsz)
            except ValueError as exc:
                raise UserError(f"--sparse-remain {self.remain:g}: {exc}") from None

    def aim(self, model: nn.Module, share: bool = False) -> None:
        """Re-rank ``model``'s gammas (the EMA: the model that is saved and later cut) and aim this epoch's L1
        term at the channels a cut to ``remain`` would remove now. Under DDP (``share``) only rank 0 holds an EMA:
        its masks are broadcast, so that every rank adds the same term to the same (all-reduced) gradients."""
        assert self.target is not None
        masks = self.target.masks(model, self.paths)
        self.masks = [mask.to(gamma.device, gamma.dtype) for mask, gamma in zip(masks, self.gammas, strict=True)]
        if share:
            import torch.distributed as dist

            for mask in self.masks:
                dist.broadcast(mask, 0)
        aimed = int(sum(float(mask.sum()) for mask in masks))
        LOGGER.info("--sparse-remain %g: L1 on %d of %d prunable channels this epoch", self.remain, aimed,
                     sum(mask.numel() for mask in masks))

    def apply(self, epoch: int, epochs: int) -> float:
        """Add this epoch's ``S * sign(gamma)`` to the (aimed) gamma gradients; returns the S used."""
        strength = sparsity_strength(self.strength, self.decay, epoch, epochs)
        add_l1_subgradient(self.gammas, strength, self.masks)
        return strength

    def epoch_row(self, model: nn.Module) -> dict[str, float]:
        """results.csv / TensorBoard scalars of ``model`` (the EMA): the share of small gammas."""
        return {SHARE_COLUMN: small_gamma_share(model, paths=self.paths)}

    def epoch_histograms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {HISTOGRAM_TAG: gamma_values(model, self.paths)}

    def plot(self, model: nn.Module, save_dir: str | Path) -> Path:
        """The final |gamma| distribution of ``model`` (the saved EMA) as ``bn_gamma.png`` in ``save_dir``."""
        return plot_gamma_distribution(gamma_values(model, self.paths), Path(save_dir) / PLOT_NAME)


def plot_gamma_distribution(values: torch.Tensor, path: Path) -> Path:
    """Histogram of |gamma| on a log axis (slimming's zeros span decades) with the 0.01 line, and the sorted
    |gamma| curve that a global pruning threshold cuts."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    magnitudes = np.sort(values.abs().numpy())
    share = float((magnitudes < SMALL_GAMMA).mean()) if magnitudes.size else 0.0
    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)
    hist, curve = figure.subplots(1, 2)
    floor = 1e-6
    bins = np.logspace(math.log10(floor), math.log10(max(float(magnitudes.max(initial=1.0)), 1.0) * 1.1), 60)
    hist.hist(np.clip(magnitudes, floor, None), bins=bins, color="tab:blue")
    hist.set_xscale("log")
    hist.axvline(SMALL_GAMMA, color="tab:red", linestyle="--", label=f"|gamma| < {SMALL_GAMMA}: {share:.1%}")
    hist.set(xlabel="|gamma| (values below 1e-6 in the first bin)", ylabel="channels",
             title=f"BatchNorm |gamma| of {magnitudes.size} prunable channels")
    hist.legend(fontsize=8)
    curve.plot(np.linspace(0, 100, magnitudes.size), magnitudes, color="tab:blue")
    curve.axhline(SMALL_GAMMA, color="tab:red", linestyle="--")
    curve.set(xlabel="channels, sorted (%)", ylabel="|gamma|", title="sorted |gamma| (global threshold view)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
