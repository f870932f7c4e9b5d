"""What benchmarks/prune_tp.py does: Torch-Pruning's own pruner (:mod:`utils.compress.prune.peer`), the peer our
pruning tools are compared with, in the frame every pruning tool shares (:mod:`utils.runners.prune`: the same
checks, task, layer table, score before fine-tuning and ``pruned.yaml`` + ``pruned.pt``)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from utils.common.errors import UserError
from utils.compress.prune.groups import declared_constraints
from utils.compress.prune.io import set_aside_earlier_result
from utils.compress.prune.peer import IMPORTANCES, PeerBudgetError, PeerSettings, flops_share, search_ratio
from utils.compress.prune.runtimes import RUNTIMES
from utils.runners.prune import (
    PruneOptions,
    PruneResult,
    calibration_samples,
    check_options,
    load_trained,
    prune_task,
    report_and_save,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyTarget:
    """A latency budget for the Torch-Pruning peer: batch-1 milliseconds on ``runtime`` (a name of
    :data:`utils.compress.prune.runtimes.RUNTIMES`, as our tools' ``--runtime``) at ``imgsz``."""

    ms: float
    imgsz: int
    threads: int = 2
    runs: int = 10
    runtime: str = "onnxruntime"


def run_prune_tp(opts: PruneOptions, settings: PeerSettings, remain_ratio: float | None,
                 latency: LatencyTarget | None = None) -> PruneResult:
    """Torch-Pruning's own pruner (:mod:`utils.compress.prune.peer`) to a FLOPs share or a measured latency; the
    channel ratio is bisected until the pruned model measures within ``settings.tolerance`` of the budget
    (FLOPs: that share; latency: that fraction of the milliseconds)."""
    check_options(opts)
    check_peer_options(settings, remain_ratio, latency)
    model, meta = load_trained(opts.weights)
    task = prune_task(model, meta, opts)
    settings = replace(settings, max_ratio=1 - opts.min_keep, round_to=opts.multiple or 1)
    if remain_ratio is not None:
        measure, target, flag = flops_share(model, opts.imgsz), remain_ratio, f"--remain-ratio {remain_ratio}"
    else:
        samples = calibration_samples(task, latency.imgsz) if RUNTIMES.create(latency.runtime, 1).calibrated else None
        measure, target, flag = runtime_latency(latency, samples), latency.ms, f"--latency-ms {latency.ms}"
        settings = replace(settings, tolerance=settings.tolerance * latency.ms)
    try:
        found = search_ratio(model, settings, measure, target)
    except PeerBudgetError as exc:
        raise UserError(f"{flag}: {exc}; give a larger budget (or a smaller --min-keep, or a larger --delta)") from None
    LOGGER.info("Torch-Pruning (%s importance, %d steps): channel ratio %.4f measures %.4g (target %.4g, %d trials)",
                settings.importance, settings.steps, found.ratio, found.value, target, found.trials)
    budget = {"remain_ratio": remain_ratio} if remain_ratio is not None else {
        "latency_ms": latency.ms, "latency_imgsz": latency.imgsz, "runtime": latency.runtime,
        "measured_ms": round(found.value, 3)}
    note = {**found.model.yaml["pruned"], "source": opts.weights, **budget}
    note.pop("widths")
    found.model.yaml["pruned"].update(note)
    set_aside_earlier_result(opts.path, opts.exist_ok)
    return report_and_save(model, meta, found.model, head_kept_whole(model), opts, note, task)


def check_peer_options(settings: PeerSettings, remain_ratio: float | None, latency: LatencyTarget | None) -> None:
    """benchmarks/prune_tp.py's own flags, checked before anything loads."""
    if (remain_ratio is None) == (latency is None):
        raise UserError("give one of --remain-ratio R (FLOPs to keep) or --latency-ms MS (batch-1 latency to "
                        "reach on --runtime)")
    if remain_ratio is not None and not 0 < remain_ratio < 1:
        raise UserError(f"--remain-ratio {remain_ratio}: expected a share of FLOPs strictly between 0 and 1")
    if latency is not None:
        RUNTIMES.create(latency.runtime, latency.threads).check()
        for flag, value in (("--latency-ms", latency.ms), ("--latency-imgsz", latency.imgsz),
                            ("--threads", latency.threads), ("--runs", latency.runs)):
            if not value > 0:
                raise UserError(f"{flag} {value}: expected a positive number")
    if settings.importance not in IMPORTANCES:
        raise UserError(f"--importance {settings.importance}: expected one of {', '.join(IMPORTANCES)}")
    if settings.steps < 1:
        raise UserError(f"--steps {settings.steps}: expected at least 1 pruning step")
    if not 0 < settings.tolerance < 1:
        raise UserError(f"--delta {settings.tolerance}: expected a tolerance in (0, 1), e.g. 0.02")


def head_kept_whole(model: nn.Module) -> dict[int, set[str]]:
    """Layer -> why the peer left it whole (the registry's fixed head outputs and kept-whole blocks), for the
    layer table."""
    constraints = declared_constraints(model.model)
    kept: dict[int, set[str]] = {}
    for path in constraints.fixed_outputs | constraints.whole:
        kept.setdefault(int(path.split(".", 1)[0]), set()).add(constraints.reasons[path])
    return kept


def runtime_latency(target: LatencyTarget, samples: list | None = None) -> Callable[[nn.Module], float]:
    """The measurement of a latency budget: median batch-1 ms of a candidate on ``target.runtime`` with
    ``target.threads`` threads, opened as the latency budgets of our tools open it (the same runtime of
    :mod:`utils.compress.prune.runtimes`, an INT8 runtime calibrated on the same ``samples``), so that the peer and
    our tools meet at the same latency."""
    from utils.compress.prune.latency import example_input
    from utils.export.common import prepare_for_export

    runtime = RUNTIMES.create(target.runtime, target.threads)

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="prune-tp-") as tmp:
            handle = runtime.open(prepare_for_export(model), example_input(model, target.imgsz), Path(tmp), samples)
            return runtime.latency([handle], target.runs)[0]
    return measure
