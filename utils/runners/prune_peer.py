"""What benchmarks/prune_tp.py does: Torch-Pruning's own pruner (:mod:`utils.compress.prune.peer`), the peer our
pruning tools are compared with, in the frame every pruning tool shares (:mod:`utils.runners.prune`: the same
checks, task, layer table, score before fine-tuning and ``pruned.yaml`` + ``pruned.pt``)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
    """A latency budget for the Torch-Pruning peer on ``runtime`` (a name of
    :data:`utils.compress.prune.runtimes.RUNTIMES`, as our tools' ``--runtime``) at ``imgsz``, batch 1: ``ms``
    (each candidate timed alone), or ``speedup`` over the unpruned model, each candidate timed in the same rounds
    as the unpruned model, so a shared machine's drift between candidates cancels (one of the two)."""

    imgsz: int
    ms: float | None = None
    speedup: float | None = None
    threads: int = 2
    runs: int = 10
    runtime: str = "onnxruntime"

    @property
    def flag(self) -> str:
        return f"--latency-ms {self.ms:g}" if self.ms is not None else f"--speedup {self.speedup:g}"

    @property
    def target(self) -> float:
        """What the search's measure is compared with: milliseconds, or the share of the unpruned model's time."""
        return self.ms if self.ms is not None else 1 / self.speedup


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
        measure, target, flag = runtime_latency(latency, model, samples), latency.target, latency.flag
        settings = replace(settings, tolerance=settings.tolerance * target)
    try:
        found = search_ratio(model, settings, measure, target)
    except PeerBudgetError as exc:
        raise UserError(f"{flag}: {exc}; give a larger budget (or a smaller --min-keep, or a larger --delta)") from None
    LOGGER.info("Torch-Pruning (%s importance, %d steps): channel ratio %.4f measures %.4g (target %.4g, %d trials)",
                settings.importance, settings.steps, found.ratio, found.value, target, found.trials)
    note = {**found.model.yaml["pruned"], "source": opts.weights, **budget_note(remain_ratio, latency, found.value)}
    note.pop("widths")
    found.model.yaml["pruned"].update(note)
    set_aside_earlier_result(opts.path, opts.exist_ok)
    return report_and_save(model, meta, found.model, head_kept_whole(model), opts, note, task)


def budget_note(remain_ratio: float | None, latency: LatencyTarget | None, measured: float) -> dict[str, Any]:
    """The budget and what the chosen model measured, as the pruned YAML records them."""
    if latency is None:
        return {"remain_ratio": remain_ratio}
    result = {"measured_ms": round(measured, 3)} if latency.ms is not None else {
        "measured_speedup": round(1 / measured, 4)}
    return {"latency_ms": latency.ms, "speedup": latency.speedup, "latency_imgsz": latency.imgsz,
            "runtime": latency.runtime, **result}


def check_peer_options(settings: PeerSettings, remain_ratio: float | None, latency: LatencyTarget | None) -> None:
    """benchmarks/prune_tp.py's own flags, checked before anything loads."""
    if (remain_ratio is None) == (latency is None):
        raise UserError("give one of --remain-ratio R (FLOPs to keep), --latency-ms MS or --speedup X (batch-1 "
                        "latency on --runtime)")
    if remain_ratio is not None and not 0 < remain_ratio < 1:
        raise UserError(f"--remain-ratio {remain_ratio}: expected a share of FLOPs strictly between 0 and 1")
    if latency is not None:
        RUNTIMES.create(latency.runtime, latency.threads).check()
        if (latency.ms is None) == (latency.speedup is None):
            raise UserError("give one latency budget: --latency-ms MS or --speedup X")
        if latency.speedup is not None and not latency.speedup > 1:
            raise UserError(f"--speedup {latency.speedup}: expected a speed-up above 1, e.g. 1.5")
        for flag, value in (("--latency-ms", latency.ms), ("--latency-imgsz", latency.imgsz),
                            ("--threads", latency.threads), ("--runs", latency.runs)):
            if value is not None and not value > 0:
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


def runtime_latency(target: LatencyTarget, unpruned: nn.Module, samples: list | None = None
                    ) -> Callable[[nn.Module], float]:
    """The measurement of a latency budget on ``target.runtime`` with ``target.threads`` threads, models opened as
    the latency budgets of our tools open them (the same runtime of :mod:`utils.compress.prune.runtimes`, an INT8
    runtime calibrated on the same ``samples``), so that the peer and our tools meet at the same latency: a
    candidate's median batch-1 ms, or (``target.speedup``) its median over the ``unpruned`` model's, both timed
    in the same interleaved rounds."""
    from utils.compress.prune.latency import example_input
    from utils.export.common import prepare_for_export

    runtime = RUNTIMES.create(target.runtime, target.threads)
    example = example_input(unpruned, target.imgsz)
    reference = None  # the unpruned model, opened once for every candidate (the runtimes hold it in memory)
    if target.speedup is not None:
        with tempfile.TemporaryDirectory(prefix="prune-tp-") as tmp:
            reference = runtime.open(prepare_for_export(unpruned), example, Path(tmp), samples)

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="prune-tp-") as tmp:
            handle = runtime.open(prepare_for_export(model), example, Path(tmp), samples)
            if reference is None:
                return runtime.latency([handle], target.runs)[0]
            candidate_ms, unpruned_ms = runtime.latency([handle, reference], target.runs)
            return candidate_ms / unpruned_ms
    return measure
