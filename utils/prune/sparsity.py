"""Sparse training for Network Slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
Network Slimming"): an L1 penalty on the BatchNorm scale factors (gamma) of the prunable layers.

``train.py --sparse S`` adds the penalty's subgradient ``S * sign(gamma)`` to each gamma's gradient once per
optimizer step, after the task's gradients are final (unscaled, clipped; SAM's second pass done). Channels the
task does not need then drift to gamma ~ 0, which is what ``prune_slim.py``'s global |gamma| threshold cuts.
``--sparse-decay linear|cos`` lowers S over training to 10 % of its start, so the last epochs mostly let the
kept channels recover accuracy while the ones already near zero stay there.

Logged each epoch (on the EMA model, the one saved and later pruned): the share of prunable gammas with
|gamma| < 0.01 (results.csv ``sparsity/gamma<0.01``, TensorBoard) and a gamma histogram (TensorBoard); at
the end a PNG of the final |gamma| distribution (``bn_gamma.png`` in the run folder, unless ``--noplots``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from utils.errors import UserError

if TYPE_CHECKING:
    from utils.config import TrainConfig

LOGGER = logging.getLogger(__name__)

SMALL_GAMMA = 0.01  # |gamma| below this counts as "switched off" in the logged share
SPARSE_DECAYS = ("none", "linear", "cos")
FINAL_FRACTION = 0.1  # linear/cos decay end at this fraction of --sparse
SHARE_COLUMN = f"sparsity/gamma<{SMALL_GAMMA}"
HISTOGRAM_TAG = "sparsity/gamma"
PLOT_NAME = "bn_gamma.png"


def prunable_batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers whose channels the pruning tools may remove (their gammas are what slimming ranks).

    Provisional definition: every BatchNorm2d of the model except those inside a layer whose registry spec
    declares ``coupling="head"`` (Detect, Classify, MultiHeadClassify: their outputs are fixed by the task).
    The dependency-graph selection of the pruning core replaces this body; the signature stays.
    """
    from models.registry import REGISTRY

    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential):  # not a parse_model network: nothing is known to be a head
        return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    spec_of_class = {spec.cls: spec for spec in REGISTRY.specs()}
    norms: list[nn.BatchNorm2d] = []
    for layer in layers:
        block = layer[0] if type(layer) is nn.Sequential and len(layer) else layer  # outer repeats: n x block
        spec = spec_of_class.get(type(block))
        if spec is None and getattr(layer, "type", ""):
            name = str(layer.type).rsplit(".", 1)[-1]
            spec = REGISTRY.get(name) if name in REGISTRY else None
        if spec is not None and spec.coupling == "head":
            continue
        norms.extend(m for m in layer.modules() if isinstance(m, nn.BatchNorm2d))
    return norms


def gamma_values(model: nn.Module) -> torch.Tensor:
    """All prunable gammas of ``model`` as one flat float32 CPU tensor (signed)."""
    norms = prunable_batchnorms(model)
    if not norms:
        return torch.zeros(0)
    return torch.cat([bn.weight.detach().float().flatten().cpu() for bn in norms])


def small_gamma_share(model: nn.Module, threshold: float = SMALL_GAMMA) -> float:
    """Share of the prunable gammas with |gamma| < ``threshold`` (0 when the model has none)."""
    values = gamma_values(model)
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
def add_l1_subgradient(gammas: list[torch.Tensor], strength: float) -> None:
    """``grad += strength * sign(gamma)`` for every gamma that has a gradient (frozen ones have none)."""
    for gamma in gammas:
        if gamma.grad is not None:
            gamma.grad.add_(torch.sign(gamma), alpha=strength)


def check_sparse_flags(cfg: TrainConfig) -> None:
    """--sparse must be >= 0 and finite; --sparse-decay one of none, linear, cos."""
    if not (math.isfinite(cfg.sparse) and cfg.sparse >= 0):
        raise UserError(f"--sparse {cfg.sparse}: the L1 strength on BatchNorm gammas must be >= 0 (e.g. 1e-4)")
    if cfg.sparse_decay not in SPARSE_DECAYS:
        raise UserError(f"--sparse-decay {cfg.sparse_decay}: use one of {', '.join(SPARSE_DECAYS)}")
    if cfg.sparse_decay != "none" and not cfg.sparse:
        LOGGER.warning("--sparse-decay %s has no effect without --sparse S", cfg.sparse_decay)


class SparseTraining:
    """What ``--sparse`` adds to a run: the gradient term each optimizer step and the per-epoch logging.

    Holds the gamma Parameters themselves, not their modules, so it survives SyncBatchNorm conversion (which
    moves the same Parameters into new modules) and DDP wrapping.
    """

    def __init__(self, model: nn.Module, strength: float, decay: str = "none"):
        self.strength, self.decay = strength, decay
        self.gammas = [bn.weight for bn in prunable_batchnorms(model)]
        LOGGER.info("--sparse %g (decay %s): L1 on %d BatchNorm gammas in %d layers", strength, decay,
                    sum(g.numel() for g in self.gammas), len(self.gammas))

    def apply(self, epoch: int, epochs: int) -> float:
        """Add this epoch's ``S * sign(gamma)`` to the gamma gradients; returns the S used."""
        strength = sparsity_strength(self.strength, self.decay, epoch, epochs)
        add_l1_subgradient(self.gammas, strength)
        return strength

    @staticmethod
    def epoch_row(model: nn.Module) -> dict[str, float]:
        """results.csv / TensorBoard scalars of ``model`` (the EMA): the share of small gammas."""
        return {SHARE_COLUMN: small_gamma_share(model)}

    @staticmethod
    def epoch_histograms(model: nn.Module) -> dict[str, torch.Tensor]:
        return {HISTOGRAM_TAG: gamma_values(model)}

    @staticmethod
    def plot(model: nn.Module, save_dir: str | Path) -> Path:
        """The final |gamma| distribution of ``model`` (the saved EMA) as ``bn_gamma.png`` in ``save_dir``."""
        return plot_gamma_distribution(gamma_values(model), Path(save_dir) / PLOT_NAME)


def plot_gamma_distribution(values: torch.Tensor, path: Path) -> Path:
    """Histogram of |gamma| on a log axis (slimming's zeros span decades) with the 0.01 line, and the sorted
    |gamma| curve that a global pruning threshold cuts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    magnitudes = np.sort(values.abs().numpy())
    share = float((magnitudes < SMALL_GAMMA).mean()) if magnitudes.size else 0.0
    fig, (hist, curve) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
