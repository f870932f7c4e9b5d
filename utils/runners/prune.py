"""What prune_slim.py, prune_eagleeye.py and the peer (benchmarks/prune_tp.py) do, callable from tests: load, plan,
cut, report, save.

The tools share the frame: load a trained checkpoint (safe loader), find its channel groups, pick a plan,
cut the model, print a per-layer table and the size before/after, score the pruned model on the validation
split (before fine-tuning), and write ``pruned.yaml`` + ``pruned.pt``. Only the plan differs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.common.errors import UserError
from utils.common.torch_utils import recalibrate_batchnorm
from utils.compress.prune import eagleeye, slim
from utils.compress.prune.analysis import analyse_channels
from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import ChannelAnalysis, batchnorm_members, declared_constraints
from utils.compress.prune.io import check_writable, save_pruned
from utils.compress.prune.peer import IMPORTANCES, PeerBudgetError, PeerSettings, flops_share, search_ratio
from utils.compress.prune.plan import Plan
from utils.compress.prune.report import format_layer_table, format_totals, model_size
from utils.compress.prune.surgery import prune_model
from utils.compress.sparsity import SMALL_GAMMA
from utils.tasks import Task, TaskOptions, build_task, model_info, task_of

LOGGER = logging.getLogger(__name__)

SPARSE_SHARE_WARNING = 0.05  # below this share of |gamma| < 0.01 a model was most likely not trained --sparse


@dataclass(frozen=True)
class PruneOptions:
    """Flags both pruning tools share."""

    weights: str
    data: str
    path: str
    imgsz: int = 640
    batch_size: int = 32
    workers: int = 2
    multiple: int = 8
    min_keep: float = 0.1
    exist_ok: bool = False
    noval: bool = False
    seed: int = 0


@dataclass
class PruneResult:
    yaml_path: Path
    weights_path: Path
    before: dict[str, Any] = field(default_factory=dict)  # parameters, gflops, metrics
    after: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every pruning tool shares (prune_slim.py, prune_eagleeye.py, benchmarks/prune_tp.py)."""
    parser.add_argument("--weights", required=True, help="trained checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="data-set YAML (validation before fine-tuning)")
    parser.add_argument("--path", required=True, help="pruned model YAML to write; the checkpoint goes beside it (.pt)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="image size for FLOPs and val")
    parser.add_argument("--batch-size", "--batch", type=int, default=32, help="validation batch size")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--round", type=int, default=8, help="round kept widths up to a multiple of this (1: none)")
    parser.add_argument("--min-keep", type=float, default=0.1, help="keep at least this share of each group")
    parser.add_argument("--noval", action="store_true", help="skip the validation of the pruned model")
    parser.add_argument("--exist-ok", action="store_true", help="replace an existing pruned.yaml / pruned.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed (calibration batches, EagleEye draws)")


def options(args: argparse.Namespace) -> PruneOptions:
    """The shared flags as :class:`PruneOptions`."""
    return PruneOptions(weights=args.weights, data=args.data, path=args.path, imgsz=args.imgsz,
                        batch_size=args.batch_size, workers=args.workers, multiple=args.round,
                        min_keep=args.min_keep, exist_ok=args.exist_ok, noval=args.noval, seed=args.seed)


def check_options(opts: PruneOptions) -> None:
    """Flag checks that need nothing loaded (a mistake ends before any model or image is read)."""
    for flag, path in (("--weights", opts.weights), ("--data", opts.data)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: file not found")
    checks = [("--imgsz", opts.imgsz > 0, "a positive number of pixels"),
              ("--batch-size", opts.batch_size > 0, "at least 1"),
              ("--workers", opts.workers >= 0, "0 or more"),
              ("--round", opts.multiple >= 1, "1 (no rounding) or more, e.g. 8"),
              ("--min-keep", 0 < opts.min_keep <= 1, "a share in (0, 1], e.g. 0.1")]
    for flag, ok, expected in checks:
        if not ok:
            raise UserError(f"{flag} {getattr(opts, _attr(flag))}: expected {expected}")
    check_writable(opts.path, opts.exist_ok)


def _attr(flag: str) -> str:
    return {"--round": "multiple"}.get(flag, flag.removeprefix("--").replace("-", "_"))


def load_trained(weights: str) -> tuple[nn.Module, dict[str, Any]]:
    from utils.weights.checkpoint import load_checkpoint

    loaded = load_checkpoint(weights)
    model = loaded.model.float().eval()
    if not hasattr(model, "model"):
        raise UserError(f"--weights {weights}: not a YOLO model checkpoint")
    return model, loaded.meta


def prune_task(model: nn.Module, meta: dict[str, Any], opts: PruneOptions) -> Task:
    """The model's task on ``--data``: adaptive BatchNorm batches, candidate scores, validation before fine-tuning.
    A model trained on other data (other classes or heads) is refused as val.py refuses it."""
    task = build_task(task_of(model), opts.data, TaskOptions(imgsz=opts.imgsz, batch_size=opts.batch_size,
                                                             workers=opts.workers, seed=opts.seed))
    task.check_model(model_info(model, meta.get("names")), opts.weights)
    return task


def analyse(model: nn.Module) -> ChannelAnalysis:
    analysis = analyse_channels(model)
    if not analysis.groups:
        raise UserError("this model has no prunable channel groups (every channel is coupled to a block kept whole)")
    LOGGER.info("%d prunable channel groups; %d layers kept whole", len(analysis.groups), len(analysis.kept_whole))
    return analysis


def sparse_share(model: nn.Module, analysis: ChannelAnalysis) -> float:
    """Share of the prunable BatchNorm scales below 0.01 (large after ``train.py --sparse``)."""
    norms = {id(bn): bn for g in analysis.groups for _, bn in batchnorm_members(g, model.model)}
    values = torch.cat([bn.weight.detach().abs().flatten() for bn in norms.values()])
    return float((values < SMALL_GAMMA).float().mean())


def run_prune_slim(opts: PruneOptions, global_percent: float | None, remain_ratio: float | None) -> PruneResult:
    """Network Slimming to one global |gamma| threshold (given as a share of channels, or found for a budget)."""
    check_options(opts)
    if (global_percent is None) == (remain_ratio is None):
        raise UserError("give one of --global-percent P (share of channels to cut) or --remain-ratio R (FLOPs to keep)")
    for flag, value in (("--global-percent", global_percent), ("--remain-ratio", remain_ratio)):
        if value is not None and not 0 < value < 1:
            raise UserError(f"{flag} {value}: expected a share strictly between 0 and 1")
    model, meta = load_trained(opts.weights)
    task = prune_task(model, meta, opts)
    analysis = analyse(model)
    share = sparse_share(model, analysis)
    if share < SPARSE_SHARE_WARNING and not meta.get("sparse"):
        LOGGER.warning("warning: only %.1f%% of the prunable BatchNorm scales are below 0.01: %s looks trained "
                       "without --sparse, and slimming without sparse training is weak (expect a larger drop "
                       "before fine-tuning); train with `train.py --sparse 1e-4` first", 100 * share, opts.weights)
    scales = slim.group_scales(model.model, analysis.groups)
    if global_percent is not None:
        threshold = slim.percent_threshold(scales, global_percent)
    else:
        cost = CostModel(model, analysis.groups, opts.imgsz)
        try:
            threshold = slim.budget_threshold(scales, cost, remain_ratio, opts.min_keep, opts.multiple)
        except ValueError as exc:
            raise UserError(f"--remain-ratio {remain_ratio}: {exc}") from None
    plan = slim.slimming_plan(scales, threshold, opts.min_keep, opts.multiple)
    LOGGER.info("global |gamma| threshold %.4g; %.1f%% of prunable BatchNorm scales below 0.01", threshold,
                100 * share)
    note = {"method": "slim", "source": opts.weights, "threshold": round(threshold, 6),
            **({"global_percent": global_percent} if global_percent is not None else {"remain_ratio": remain_ratio})}
    return _finish(model, meta, analysis, plan, opts, note, task)


def run_prune_eagleeye(opts: PruneOptions, settings: eagleeye.SearchSettings, calibration_batches: int,
                 score_images: int) -> PruneResult:
    """EagleEye search; writes ``<path stem>_candidates.csv`` and ``_candidates.png`` beside the YAML."""
    check_options(opts)
    if not 0 < settings.remain_ratio < 1:
        raise UserError(f"--remain-ratio {settings.remain_ratio}: expected a share of FLOPs strictly between 0 and 1")
    if not 0 < settings.delta < 1:
        raise UserError(f"--delta {settings.delta}: expected a tolerance in (0, 1), e.g. 0.02")
    if settings.max_iter < 1 or calibration_batches < 1 or score_images < 1:
        raise UserError("--max-iter, --calib-batches and --score-images must be at least 1")
    model, meta = load_trained(opts.weights)
    task = prune_task(model, meta, opts)
    analysis = analyse(model)
    cost = CostModel(model, analysis.groups, opts.imgsz)
    try:
        eagleeye.check_budget(cost, [g.size for g in analysis.groups], settings)
    except eagleeye.BudgetError as exc:
        raise UserError(str(exc)) from None
    calibration = task.calibration_batches(calibration_batches)
    sample = task.sample_batches(score_images)
    try:
        candidates = eagleeye.search(model, analysis.groups, cost, calibration,
                                     lambda candidate: task.score(candidate, sample), settings)
    except eagleeye.BudgetError as exc:
        raise UserError(str(exc)) from None
    best, plan = eagleeye.best_plan(model, analysis.groups, candidates)
    csv_path = write_candidates(candidates, Path(opts.path))
    LOGGER.info("best candidate %d: FLOPs %.3f of the original, score %.4f (of %d); all in %s", best.number,
                best.flops_ratio, best.score, len(candidates), csv_path)
    note = {"method": "eagleeye", "source": opts.weights, "remain_ratio": settings.remain_ratio,
            "delta": settings.delta, "candidates": len(candidates), "best_candidate": best.number}
    result = _finish(model, meta, analysis, plan, opts, note, task, calibration)
    result.extra = {"candidates_csv": csv_path, "best": best,
                    "seconds_per_candidate": sorted(c.seconds for c in candidates)[len(candidates) // 2]}
    return result


@dataclass(frozen=True)
class LatencyTarget:
    """A latency budget for the Torch-Pruning peer: batch-1 ONNX Runtime milliseconds at ``imgsz``."""

    ms: float
    imgsz: int
    threads: int = 2
    runs: int = 10


def run_prune_tp(opts: PruneOptions, settings: PeerSettings, remain_ratio: float | None,
                 latency: LatencyTarget | None = None) -> PruneResult:
    """Torch-Pruning's own pruner (:mod:`utils.compress.prune.peer`) to a FLOPs share or a measured latency; the
    channel ratio is bisected until the pruned model measures within ``settings.tolerance`` of the budget
    (FLOPs: that share; latency: that fraction of the milliseconds)."""
    check_options(opts)
    check_peer_options(settings, remain_ratio, latency)
    model, meta = load_trained(opts.weights)
    task = prune_task(model, meta, opts)
    settings = dataclasses.replace(settings, max_ratio=1 - opts.min_keep, round_to=opts.multiple)
    if remain_ratio is not None:
        measure, target, flag = flops_share(model, opts.imgsz), remain_ratio, f"--remain-ratio {remain_ratio}"
    else:
        measure, target, flag = onnx_latency(latency), latency.ms, f"--latency-ms {latency.ms}"
        settings = dataclasses.replace(settings, tolerance=settings.tolerance * latency.ms)
    try:
        found = search_ratio(model, settings, measure, target)
    except PeerBudgetError as exc:
        raise UserError(f"{flag}: {exc}; give a larger budget (or a smaller --min-keep, or a larger --delta)") from None
    LOGGER.info("Torch-Pruning (%s importance, %d steps): channel ratio %.4f measures %.4g (target %.4g, %d trials)",
                settings.importance, settings.steps, found.ratio, found.value, target, found.trials)
    budget = {"remain_ratio": remain_ratio} if remain_ratio is not None else {
        "latency_ms": latency.ms, "latency_imgsz": latency.imgsz, "measured_ms": round(found.value, 3)}
    note = {**found.model.yaml["pruned"], "source": opts.weights, **budget}
    note.pop("widths")
    found.model.yaml["pruned"].update(note)
    return _report_and_save(model, meta, found.model, head_kept_whole(model), opts, note, task)


def check_peer_options(settings: PeerSettings, remain_ratio: float | None, latency: LatencyTarget | None) -> None:
    """benchmarks/prune_tp.py's own flags, checked before anything loads."""
    if (remain_ratio is None) == (latency is None):
        raise UserError("give one of --remain-ratio R (FLOPs to keep) or --latency-ms MS (ONNX Runtime batch-1 "
                        "latency to reach)")
    if remain_ratio is not None and not 0 < remain_ratio < 1:
        raise UserError(f"--remain-ratio {remain_ratio}: expected a share of FLOPs strictly between 0 and 1")
    if latency is not None:
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


def onnx_latency(target: LatencyTarget) -> Callable[[nn.Module], float]:
    """The measurement of a latency budget: median batch-1 ms of a candidate exported to ONNX (as export.py
    --simplify writes it) and run by ONNX Runtime with ``target.threads`` threads on one image."""
    from utils.common.timing import median_call_ms
    from utils.export import ExportOptions, export_model
    from utils.export.onnx import ONNXRuntimeBackend
    from utils.weights.checkpoint import save_checkpoint

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="prune-tp-") as tmp:
            weights = save_checkpoint(model, f"{tmp}/candidate.pt")
            artifacts = export_model(ExportOptions(weights=weights, include=("onnx",), simplify=True,
                                                   imgsz=(target.imgsz, target.imgsz), output_dir=weights.parent))
            backend = ONNXRuntimeBackend(artifacts["onnx"], threads=target.threads)
            images = torch.zeros(1, model.yaml.get("ch", 3), target.imgsz, target.imgsz)
            return median_call_ms({"candidate": partial(backend, images)}, target.runs)["candidate"]["median"]
    return measure


def _finish(model: nn.Module, meta: dict[str, Any], analysis: ChannelAnalysis, plan: Plan, opts: PruneOptions,
            note: dict[str, Any], task: Task, calibration: list[torch.Tensor] | None = None) -> PruneResult:
    """Cut, report, score and save (shared tail of both tools); ``calibration`` batches re-estimate the pruned
    model's BatchNorm statistics (EagleEye: fine-tuning starts from the network that was scored)."""
    pruned = prune_model(model, analysis.groups, plan, note=note)
    if calibration:
        recalibrate_batchnorm(pruned, calibration)
    return _report_and_save(model, meta, pruned, analysis.kept_whole, opts, note, task)


def _report_and_save(model: nn.Module, meta: dict[str, Any], pruned: nn.Module, kept_whole: dict[int, set[str]],
                     opts: PruneOptions, note: dict[str, Any], task: Task) -> PruneResult:
    """Layer table, sizes, the pruned model's score before fine-tuning, and pruned.yaml + pruned.pt (every tool)."""
    before, after = model_size(model, opts.imgsz), model_size(pruned, opts.imgsz)
    LOGGER.info("\n%s", format_layer_table(model, pruned, kept_whole))
    LOGGER.info("%s", format_totals(before, after, opts.imgsz))
    result_before = {"parameters": before.parameters, "gflops": before.gflops}
    result_after = {"parameters": after.parameters, "gflops": after.gflops}
    if not opts.noval:
        metrics = task.evaluate(pruned.eval(), task.val_loader())
        LOGGER.info("\n%s", task.report(metrics))
        result_after["metrics"] = {k: float(metrics[k]) for k in task.headline_metrics}
        LOGGER.info("pruned model before fine-tuning: %s", task.summary(metrics))
    header = (f"{Path(opts.path).name}: {note['method']} pruning of {opts.weights} "
              f"({after.gflops / max(before.gflops, 1e-9):.1%} of the GFLOPs at {opts.imgsz})\n"
              "Written by yolo-kit; fine-tune with: python train.py --cfg THIS.yaml --weights THIS.pt --data ...")
    names = list(meta.get("names") or getattr(model, "names", []))
    yaml_path, weights_path = save_pruned(pruned, opts.path, header, names=names, pruned=note,
                                          **({"imgsz": opts.imgsz}))
    LOGGER.info("saved %s and %s", yaml_path, weights_path)
    return PruneResult(yaml_path, weights_path, result_before, result_after)


def write_candidates(candidates: list[eagleeye.Candidate], yaml_path: Path) -> Path:
    """Every candidate (number, FLOPs share, score, seconds, keep ratio per group) as CSV, plus the score plot."""
    csv_path = yaml_path.with_name(f"{yaml_path.stem}_candidates.csv")
    groups = len(candidates[0].ratios) if candidates else 0
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate", "flops_ratio", "score", "seconds", *(f"group{i}" for i in range(groups))])
        for c in candidates:
            writer.writerow([c.number, f"{c.flops_ratio:.5f}", f"{c.score:.6f}", f"{c.seconds:.3f}",
                             *(f"{r:.4f}" for r in c.ratios)])
    plot_candidates(candidates, csv_path.with_suffix(".png"))
    return csv_path


def plot_candidates(candidates: list[eagleeye.Candidate], path: Path) -> None:
    """Score against FLOPs share, the best candidate marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter([c.flops_ratio for c in candidates], [c.score for c in candidates], s=12, alpha=0.7)
    best = max(candidates, key=lambda c: c.score)
    axes.scatter([best.flops_ratio], [best.score], s=60, marker="*", color="tab:red", label="best")
    axes.set_xlabel("FLOPs kept (share of the original)")
    axes.set_ylabel("score after adaptive BN")
    axes.set_title(f"EagleEye: {len(candidates)} candidates")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)

