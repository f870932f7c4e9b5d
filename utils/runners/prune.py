"""What prune_slim.py, prune_eagleeye.py and the peer (benchmarks/prune_tp.py) do, callable from tests: load, plan,
cut, report, save.

The tools share the frame: load a trained checkpoint (safe loader), find its channel groups, pick a plan,
cut the model, print a per-layer table and the size before/after, score the pruned model on the validation
split (before fine-tuning), and write ``pruned.yaml`` + ``pruned.pt``. Only the plan differs.

The budget is a share of the FLOPs (``--remain-ratio``; slimming also takes a share of channels,
``--global-percent``) or a latency measured on a named runtime (``--runtime R`` with ``--latency-ms T`` or
``--speedup X``, batch 1 at ``--imgsz`` and ``--threads``): the searches then budget the prediction of
:mod:`utils.compress.prune.latency`, and the chosen model is exported, timed, and its predicted and measured
latency reported (:attr:`PruneResult.latency`). With ``--runtime`` and no ``--round``, widths are rounded to
the multiple that runtime was measured to run fastest.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.common.errors import FlagError, UserError
from utils.common.flags import IMGSZ_HELP, image_sizes
from utils.common.torch_utils import recalibrate_batchnorm
from utils.compress.prune import eagleeye, slim
from utils.compress.prune.analysis import analyse_channels
from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import ChannelAnalysis, batchnorm_members
from utils.compress.prune.io import check_writable, save_pruned, set_aside_earlier_result
from utils.compress.prune.latency import (
    CALIBRATION_IMAGES,
    TABLE_FILE,
    LatencyModel,
    LatencySettings,
    TableCache,
    latency_model,
    measure_chosen,
    measure_multiple,
)
from utils.compress.prune.plan import DEFAULT_MULTIPLE, MIN_KEEP, Plan, plan_counts, plan_from_counts
from utils.compress.prune.report import format_layer_table, format_totals, model_size
from utils.compress.prune.runtimes import RUNTIMES, Runtime
from utils.compress.prune.surgery import prune_model
from utils.compress.sparsity import SMALL_GAMMA
from utils.tasks import Task, TaskOptions, build_task, model_info, task_of

LOGGER = logging.getLogger(__name__)

SPARSE_SHARE_WARNING = 0.05  # below this share of |gamma| < 0.01 a model was most likely not trained --sparse
# a slimming cut removing more than this share of the prunable |gamma| mass cuts channels the network still uses.
# After sparse training the cut channels' scales are below 0.01 against ~1 for kept ones, so cutting half of the
# channels removes ~1 % of the mass; a dense model cut by a share p of its channels loses nearly p of it (its
# scales are alike: the yolov5n fixture's lie in 0.98-1.00). 10 % leaves room for partly sparse models and is far
# below the ~50 % of a dense 50 % cut (whose mAP before fine-tuning is ~0 in docs/prune.md's tables).
MASS_SHARE_WARNING = 0.10
SLIM_CALIBRATION_BATCHES = 8  # prune_slim.py --calib-batches: adaptive BN after the cut, as EagleEye's candidates
# --latency-tries (both tools): measurements of the chosen cut under a latency budget. The per-layer table predicted
# slimmed yolov5s cuts at 640 7-13 % too fast (docs/prune.md), so a cut landing further than LANDING_TOLERANCE from
# the ask is aimed again by the table's error measured at it; the measured cut nearest the ask is kept.
LATENCY_TRIES = 3
LANDING_TOLERANCE = 0.05


@dataclass(frozen=True)
class PruneOptions:
    """Flags both pruning tools share."""

    weights: str
    data: str
    path: str
    imgsz: int = 640
    batch_size: int = 32
    workers: int = 2
    multiple: int | None = None  # --round; None: 8, or the multiple --runtime was measured to run fastest
    min_keep: float = MIN_KEEP
    exist_ok: bool = False
    noval: bool = False
    seed: int = 0
    runtime: str | None = None  # --runtime: where latency is measured (a name in RUNTIMES)
    threads: int = 2  # --threads the runtime runs with
    latency_ms: float | None = None  # --latency-ms: the pruned model's batch-1 time on --runtime
    speedup: float | None = None  # --speedup: the unpruned model's time over the pruned model's on --runtime
    latency_imgsz: int | None = None  # --latency-imgsz: the deployed image size latency is measured at (None: imgsz)

    @property
    def latency_size(self) -> int:
        """Where latency is measured: the deployed size, which may differ from the size the model trains at."""
        return self.latency_imgsz or self.imgsz

    def latency_budget(self) -> str | None:
        """The latency flag given, as messages name it (None under a FLOPs or channel budget)."""
        if self.latency_ms is not None:
            return f"--latency-ms {self.latency_ms:g}"
        return f"--speedup {self.speedup:g}" if self.speedup is not None else None


@dataclass
class PruneResult:
    yaml_path: Path
    weights_path: Path
    before: dict[str, Any] = field(default_factory=dict)  # parameters, gflops, metrics
    after: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # with --runtime: runtime, threads, imgsz, multiple, asked_ms, predicted_ms, measured_ms, unpruned_ms,
    # measured_speedup, gap_predicted and gap_asked (measured / predicted or asked - 1)
    latency: dict[str, Any] = field(default_factory=dict)


@dataclass
class Budget:
    """What a run budgets, resolved once the model is loaded: the model the search asks (``ratio(counts)``), the
    share to keep, how messages name it, and the latency model and runtime when ``--runtime`` is given."""

    model: CostModel | LatencyModel
    ratio: float | None
    flag: str
    multiple: int
    latency: LatencyModel | None = None
    runtime: Runtime | None = None
    samples: list | None = None


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every pruning tool shares (prune_slim.py, prune_eagleeye.py, benchmarks/prune_tp.py)."""
    parser.add_argument("--weights", required=True, help="trained checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="data-set YAML (validation before fine-tuning)")
    parser.add_argument("--path", required=True, help="pruned model YAML to write; the checkpoint goes beside it (.pt)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640,
                        help=f"image size for FLOPs, latency and val ({IMGSZ_HELP})")
    parser.add_argument("--batch-size", "--batch", type=int, default=32, help="validation batch size")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--round", type=int, default=None,
                        help="round kept widths up to a multiple of this (1: none; default 8, or with --runtime "
                             "the multiple that runtime was measured to run fastest)")
    parser.add_argument("--min-keep", type=float, default=0.1, help="keep at least this share of each group")
    parser.add_argument("--noval", action="store_true", help="skip the validation of the pruned model")
    parser.add_argument("--exist-ok", action="store_true",
                        help="set an earlier pruned.yaml / .pt (and candidates files) aside into previous/ beside them")
    parser.add_argument("--seed", type=int, default=0, help="seed (calibration batches, EagleEye draws)")
    parser.add_argument("--runtime", help=f"measure latency on this runtime ({', '.join(RUNTIMES.names())}): "
                                          "needed by --latency-ms/--speedup; with a FLOPs budget it reports the "
                                          "predicted and measured latency")
    parser.add_argument("--threads", type=int, default=2, help="threads the runtime runs with (latency budgets)")
    parser.add_argument("--latency-imgsz", type=int, default=None,
                        help="image size latency is measured at, when the model is deployed at another size than "
                             "--imgsz (trained and validated at 256, run at 640; default --imgsz)")


def add_latency_budgets(budget: argparse._MutuallyExclusiveGroup) -> None:
    """The latency budgets, in each tool's group of mutually exclusive budgets."""
    budget.add_argument("--latency-ms", type=float,
                        help="batch-1 latency to reach on --runtime at --latency-imgsz (default --imgsz), in ms "
                             "(measured, not FLOPs)")
    budget.add_argument("--speedup", type=float, help="speed-up over the unpruned model to reach on --runtime")


def add_latency_tries(parser: argparse.ArgumentParser) -> None:
    """How often a latency budget's cut is measured (both tools; :func:`land_on_measured_latency`)."""
    parser.add_argument("--latency-tries", type=int, default=LATENCY_TRIES,
                        help="with --latency-ms / --speedup: measurements of the cut; one landing more than 5 %% "
                             "from the ask is aimed again by the table's error measured there (1: measure the "
                             "predicted cut only)")


def options(args: argparse.Namespace) -> PruneOptions:
    """The shared flags as :class:`PruneOptions`."""
    return PruneOptions(weights=args.weights, data=args.data, path=args.path, imgsz=args.imgsz,
                        batch_size=args.batch_size, workers=args.workers, multiple=args.round,
                        min_keep=args.min_keep, exist_ok=args.exist_ok, noval=args.noval, seed=args.seed,
                        runtime=args.runtime, threads=args.threads, latency_ms=getattr(args, "latency_ms", None),
                        speedup=getattr(args, "speedup", None), latency_imgsz=args.latency_imgsz)


def check_options(opts: PruneOptions) -> None:
    """Flag checks that need nothing loaded (a mistake ends before any model or image is read)."""
    for flag, path in (("--weights", opts.weights), ("--data", opts.data)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: file not found")
    image_sizes("--imgsz", opts.imgsz)
    if opts.latency_imgsz is not None:
        image_sizes("--latency-imgsz", opts.latency_imgsz)
    checks = [("--batch-size", opts.batch_size > 0, "at least 1"),
              ("--workers", opts.workers >= 0, "0 or more"),
              ("--round", opts.multiple is None or opts.multiple >= 1, "1 (no rounding) or more, e.g. 8"),
              ("--min-keep", 0 < opts.min_keep <= 1, "a share in (0, 1], e.g. 0.1"),
              ("--threads", opts.threads >= 1, "1 or more"),
              ("--latency-ms", opts.latency_ms is None or opts.latency_ms > 0, "milliseconds above 0, e.g. 15"),
              ("--speedup", opts.speedup is None or opts.speedup > 1, "a speed-up above 1, e.g. 1.5")]
    for flag, ok, expected in checks:
        if not ok:
            raise UserError(f"{flag} {getattr(opts, _attr(flag))}: expected {expected}")
    check_runtime(opts)
    check_writable(opts.path, opts.exist_ok)


def check_runtime(opts: PruneOptions) -> None:
    """A latency budget names one latency and the runtime it is measured on, which must be installed."""
    if opts.latency_ms is not None and opts.speedup is not None:
        raise FlagError("--latency-ms and --speedup are two budgets: give one")
    budget = opts.latency_budget()
    if budget and not opts.runtime:
        raise FlagError(f"{budget} needs --runtime ({'|'.join(RUNTIMES.names())}): the runtime the latency is "
                        "measured on")
    if opts.runtime:
        RUNTIMES.create(opts.runtime, opts.threads).check()


def check_one_budget(given: dict[str, float | None]) -> None:
    """Exactly one of the budget flags ``given`` (flag -> value, None when absent)."""
    named = [flag for flag, value in given.items() if value is not None]
    if len(named) != 1:
        choices = ", ".join(given)
        raise FlagError(f"give one budget, not {' and '.join(named)}: one of {choices}" if named
                        else f"give a budget: one of {choices}")


def _attr(flag: str) -> str:
    return {"--round": "multiple"}.get(flag, flag.removeprefix("--").replace("-", "_"))


def load_trained(weights: str) -> tuple[nn.Module, dict[str, Any]]:
    """The float model to prune and its checkpoint's metadata; a QAT checkpoint is refused before it is built."""
    from utils.weights.checkpoint import checkpoint_quantization, load_checkpoint

    if checkpoint_quantization(weights):
        raise UserError(f"--weights {weights} is a quantization-aware-trained checkpoint: its fake-quantized, "
                        "BatchNorm-folded graph has no channels to prune. Prune the float checkpoint the QAT run "
                        "started from (its --weights), then quantization-aware-train the pruned model: python "
                        "train.py --cfg pruned.yaml --weights pruned.pt --data ... --qat")
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


def run_prune_slim(opts: PruneOptions, global_percent: float | None, remain_ratio: float | None,
                   calibration_batches: int = SLIM_CALIBRATION_BATCHES, latency_tries: int = LATENCY_TRIES
                   ) -> PruneResult:
    """Network Slimming to one global |gamma| threshold (given as a share of channels, or found for a FLOPs or
    latency budget). The cut model's BatchNorm statistics are then re-estimated on ``calibration_batches``
    augmented training batches (0: kept as trained): a cut channel's constant output (its activated beta) no
    longer reaches the next layer, whose statistics then describe inputs it will not see; re-estimating them
    tripled a sparse yolov5n's mAP before fine-tuning (docs/prune.md). Under a latency budget the chosen cut is
    measured up to ``latency_tries`` times (:func:`land_on_measured_latency`)."""
    check_options(opts)
    if calibration_batches < 0:
        raise UserError(f"--calib-batches {calibration_batches}: expected 0 (keep the trained statistics) or more")
    check_latency_tries(latency_tries)
    check_one_budget({"--global-percent": global_percent, "--remain-ratio": remain_ratio,
                      "--latency-ms": opts.latency_ms, "--speedup": opts.speedup})
    for flag, value in (("--global-percent", global_percent), ("--remain-ratio", remain_ratio)):
        if value is not None and not 0 < value < 1:
            raise UserError(f"{flag} {value}: expected a share strictly between 0 and 1")
    model, meta = load_trained(opts.weights)
    task = prune_task(model, meta, opts)
    analysis = analyse(model)
    budget = resolve_budget(opts, model, analysis, task, remain_ratio)
    scales = slim.group_scales(model.model, analysis.groups)
    latency = None
    if global_percent is not None:
        threshold = slim.percent_threshold(scales, global_percent)
    elif opts.latency_budget() is not None:
        aim, _, latency = land_on_measured_latency(model, analysis, budget, opts, latency_tries,
                                                   _slimming_plan_for(scales, budget, opts))
        threshold = _budget_threshold(scales, budget, aim, opts)
    else:
        threshold = _budget_threshold(scales, budget, budget.ratio, opts)
    plan = slim.slimming_plan(scales, threshold, opts.min_keep, budget.multiple)
    report_scale_mass(model, analysis, plan, threshold, opts.weights, bool(meta.get("sparse")))
    note = {"method": "slim", "source": opts.weights, "threshold": round(threshold, 6),
            **({"global_percent": global_percent} if global_percent is not None else {}),
            **budget_note(opts, remain_ratio)}
    calibration = task.calibration_batches(calibration_batches) if calibration_batches else None
    set_aside_earlier_result(opts.path, opts.exist_ok)
    return _finish(model, meta, analysis, plan, opts, note, task, calibration, budget, latency)


def _budget_threshold(scales: list[torch.Tensor], budget: Budget, ratio: float, opts: PruneOptions) -> float:
    try:
        return slim.budget_threshold(scales, budget.model, ratio, opts.min_keep, budget.multiple)
    except ValueError as exc:
        raise UserError(f"{budget.flag}: {exc}") from None


def _slimming_plan_for(scales: list[torch.Tensor], budget: Budget, opts: PruneOptions) -> Callable[[float], Plan]:
    """Slimming's plan for a latency aim: the global threshold the table puts at that aim."""
    def plan_for(aim: float) -> Plan:
        return slim.slimming_plan(scales, _budget_threshold(scales, budget, aim, opts), opts.min_keep,
                                  budget.multiple)

    return plan_for


def land_on_measured_latency(model: nn.Module, analysis: ChannelAnalysis, budget: Budget, opts: PruneOptions,
                             tries: int, plan_for: Callable[[float], Plan]) -> tuple[float, Plan, dict[str, Any]]:
    """A latency budget's plan, checked on the runtime: ``plan_for`` the share of the unpruned latency the table
    should predict (first the ask), export and time the cut beside the unpruned model. While it lands further
    than :data:`LANDING_TOLERANCE` from the ask, take the table's error at that cut (measured over predicted
    share of the unpruned latency) as a factor, aim the table at ``ask / factor`` and measure again, up to
    ``tries`` measurements; a plan measured already (the table's error moves no channel: the distance is the
    width rounding's) is not measured again. Returns the aim, plan and latency report of the measured cut
    nearest the ask, every try in the report's ``tries``."""
    aim, landings, tried = budget.ratio, [], []
    plan = plan_for(aim)
    while True:
        tried.append(plan_counts(plan))
        report = measured_latency(model, prune_model(model, analysis.groups, plan, record=False), plan, opts,
                                  budget)
        error, factor = landing_error(report, opts), table_factor(report, opts)
        landings.append((abs(error), len(landings) + 1, aim, plan,
                         {**report, "aim": aim, "landing_error": error, "table_factor": factor}))
        if abs(error) <= LANDING_TOLERANCE or len(landings) == tries:
            break
        aim = budget.ratio / factor
        try:
            plan = plan_for(aim)
        except UserError:
            LOGGER.info("no cut keeps %.1f%% of the predicted latency; keeping the nearest measured one", 100 * aim)
            break
        if plan_counts(plan) in tried:
            break
        LOGGER.info("try %d landed %+.1f%% from the ask (more than %.0f%%); the table was %+.1f%% off at this cut: "
                    "aiming it at %.1f%% of the unpruned latency and measuring again", len(landings), 100 * error,
                    100 * LANDING_TOLERANCE, 100 * (factor - 1), 100 * aim)
    _, chosen, aim, plan, report = min(landings, key=lambda landing: landing[:2])
    report["tries"] = [{k: landing[4][k] for k in ("aim", "predicted_ms", "measured_ms", "unpruned_ms",
                                                   "measured_speedup", "landing_error")} for landing in landings]
    if len(landings) > 1:
        LOGGER.info("kept try %d of %d: %+.1f%% from the ask", chosen, len(landings), 100 * report["landing_error"])
    return aim, plan, report


def landing_error(report: dict[str, Any], opts: PruneOptions) -> float:
    """How far a measured cut is from the ask, as a share (positive: slower than asked). ``--speedup`` compares
    the speed-up over the unpruned model timed in the same rounds (a shared machine's drift between the table
    and this measurement cancels); ``--latency-ms`` compares the measured milliseconds (the report's gap to the
    ask)."""
    if opts.speedup is not None:
        return opts.speedup / report["measured_speedup"] - 1
    return report["gap_asked"]


def table_factor(report: dict[str, Any], opts: PruneOptions) -> float:
    """The table's error at a measured cut, as a factor on its prediction: for ``--speedup`` on the share of the
    unpruned model's time (each side against its own unpruned time, drift cancels), for ``--latency-ms`` on the
    milliseconds (the report's gap to the prediction)."""
    if opts.speedup is not None:
        measured_share = report["measured_ms"] / report["unpruned_ms"]
        return measured_share / (report["predicted_ms"] / report["table_unpruned_ms"])
    return 1 + report["gap_predicted"]


def report_scale_mass(model: nn.Module, analysis: ChannelAnalysis, plan: Plan, threshold: float, weights: str,
                      trained_sparse: bool) -> float:
    """Before cutting: say how much of the prunable BatchNorm-scale mass (sum of |gamma|) the cut removes, and
    warn in one line when it is more than :data:`MASS_SHARE_WARNING` (the model is not sparse enough for the
    budget; when also under :data:`SPARSE_SHARE_WARNING` of its scales are small and its checkpoint does not say
    ``sparse``, it looks trained without ``--sparse``). Returns the share removed."""
    share = sparse_share(model, analysis)
    cut, total = slim.removed_scale_mass(model.model, analysis.groups, plan)
    removed = cut / total if total > 0 else 0.0
    LOGGER.info("global |gamma| threshold %.4g; %.1f%% of prunable BatchNorm scales below 0.01; the cut removes "
                "%.2f%% of their mass (sum of |gamma|: %.4g of %.4g)", threshold, 100 * share, 100 * removed, cut,
                total)
    if removed > MASS_SHARE_WARNING:
        why = (f"only {share:.1%} of its prunable scales are below 0.01: it looks trained without --sparse; train "
               "with `train.py --sparse 1e-4` first" if share < SPARSE_SHARE_WARNING and not trained_sparse
               else f"{share:.1%} of its prunable scales are below 0.01; sparse-train longer or ask for less")
        LOGGER.warning("warning: the cut removes %.1f%% of the BatchNorm-scale mass (more than %.0f%%): %s is not "
                       "sparse enough for this budget (%s); expect a large drop before fine-tuning", 100 * removed,
                       100 * MASS_SHARE_WARNING, weights, why)
    return removed


def run_prune_eagleeye(opts: PruneOptions, settings: eagleeye.SearchSettings, calibration_batches: int,
                       score_images: int, latency_tries: int = LATENCY_TRIES) -> PruneResult:
    """EagleEye search; writes ``<path stem>_candidates.csv`` and ``_candidates.png`` beside the YAML.
    ``settings.remain_ratio`` is the FLOPs budget (None under a latency budget); ``settings.multiple`` None
    takes the default of :func:`resolve_budget`. Under a latency budget the best candidate is measured, and
    where it lands more than :data:`LANDING_TOLERANCE` from the ask its widths are scaled to the table's
    corrected aim and measured again, up to ``latency_tries`` measurements (no second search: scaling keeps
    the layer proportions the search chose)."""
    check_options(opts)
    check_latency_tries(latency_tries)
    check_one_budget({"--remain-ratio": settings.remain_ratio, "--latency-ms": opts.latency_ms,
                      "--speedup": opts.speedup})
    if settings.remain_ratio is not None and not 0 < settings.remain_ratio < 1:
        raise UserError(f"--remain-ratio {settings.remain_ratio}: expected a share of FLOPs strictly between 0 and 1")
    if not 0 < settings.delta < 1:
        raise UserError(f"--delta {settings.delta}: expected a tolerance in (0, 1), e.g. 0.02")
    if settings.max_iter < 1 or calibration_batches < 1 or score_images < 1:
        raise UserError("--max-iter, --calib-batches and --score-images must be at least 1")
    model, meta = load_trained(opts.weights)
    task = prune_task(model, meta, opts)
    analysis = analyse(model)
    budget = resolve_budget(opts, model, analysis, task, settings.remain_ratio)
    settings = replace(settings, remain_ratio=budget.ratio, multiple=budget.multiple, budget_flag=budget.flag)
    try:
        eagleeye.check_budget(budget.model, [g.size for g in analysis.groups], settings)
    except eagleeye.BudgetError as exc:
        raise UserError(str(exc)) from None
    calibration = task.calibration_batches(calibration_batches)
    sample = task.sample_batches(score_images)
    try:
        candidates = eagleeye.search(model, analysis.groups, budget.model, calibration,
                                     lambda candidate: task.score(candidate, sample), settings)
    except eagleeye.BudgetError as exc:
        raise UserError(str(exc)) from None
    best, plan = eagleeye.best_plan(model, analysis.groups, candidates)
    latency_full = budget.model.full if isinstance(budget.model, LatencyModel) else None
    set_aside_earlier_result(opts.path, opts.exist_ok)
    csv_path = write_candidates(candidates, Path(opts.path), latency_full)
    LOGGER.info("best candidate %d: FLOPs %.3f of the original%s, score %.4f (of %d); all in %s", best.number,
                best.flops_ratio, f", predicted latency {best.budget_ratio:.3f}" if latency_full else "",
                best.score, len(candidates), csv_path)
    note = {"method": "eagleeye", "source": opts.weights, **budget_note(opts, settings.remain_ratio),
            "delta": settings.delta, "candidates": len(candidates), "best_candidate": best.number}
    latency = None
    if opts.latency_budget() is not None:
        plan_for = _scaled_candidate(model, analysis, budget, settings, best, plan)
        aim, plan, latency = land_on_measured_latency(model, analysis, budget, opts, latency_tries, plan_for)
        if aim != budget.ratio:
            note["scaled_to"] = round(aim, 6)
            LOGGER.info("kept candidate %d's widths scaled to %.1f%% of the unpruned latency (predicted)",
                        best.number, 100 * aim)
    result = _finish(model, meta, analysis, plan, opts, note, task, calibration, budget, latency)
    result.extra = {"candidates_csv": csv_path, "best": best,
                    "seconds_per_candidate": sorted(c.seconds for c in candidates)[len(candidates) // 2]}
    return result


def _scaled_candidate(model: nn.Module, analysis: ChannelAnalysis, budget: Budget,
                      settings: eagleeye.SearchSettings, best: eagleeye.Candidate,
                      best_plan: Plan) -> Callable[[float], Plan]:
    """EagleEye's plan for a latency aim: the best candidate at the ask, its widths scaled at any other aim."""
    norms = eagleeye.filter_norms(model.model, analysis.groups)
    sizes = [group.size for group in analysis.groups]

    def plan_for(aim: float) -> Plan:
        if aim == budget.ratio:
            return best_plan
        try:
            counts = eagleeye.scaled_counts(best.counts, sizes, budget.model, aim, settings)
        except eagleeye.BudgetError as exc:
            raise UserError(f"{budget.flag}: {exc}") from None
        return plan_from_counts(norms, counts)

    return plan_for


def check_latency_tries(tries: int) -> None:
    if tries < 1:
        raise UserError(f"--latency-tries {tries}: expected 1 (measure the predicted cut once) or more")


def budget_note(opts: PruneOptions, remain_ratio: float | None) -> dict[str, Any]:
    """The budget as the pruned YAML records it."""
    if opts.latency_budget() is None:
        return {"remain_ratio": remain_ratio} if remain_ratio is not None else {}
    given = {"latency_ms": opts.latency_ms} if opts.latency_ms is not None else {"speedup": opts.speedup}
    return {**given, "runtime": opts.runtime, "threads": opts.threads}


def resolve_budget(opts: PruneOptions, model: nn.Module, analysis: ChannelAnalysis, task: Task,
                   remain_ratio: float | None) -> Budget:
    """The budget the search asks: FLOPs (``remain_ratio``), or with ``--runtime`` the latency model (its table
    measured or read from ``latency_tables.json`` beside ``--path``) and the measured width multiple."""
    cost = CostModel(model, analysis.groups, opts.imgsz)
    if not opts.runtime:
        return Budget(cost, remain_ratio, f"--remain-ratio {remain_ratio:g}" if remain_ratio else "",
                      opts.multiple or DEFAULT_MULTIPLE)
    runtime = RUNTIMES.create(opts.runtime, opts.threads)
    cache = TableCache(Path(opts.path).parent / TABLE_FILE)
    if opts.multiple is None:
        multiple = measure_multiple(model, analysis.groups, runtime, opts.latency_size, cache)
    else:
        multiple = opts.multiple
        LOGGER.info("widths rounded to --round %d (given; without it the multiple %s runs fastest is measured)",
                    multiple, runtime.name)
    samples = calibration_samples(task, opts.latency_size) if runtime.calibrated else None
    settings = LatencySettings(runtime.name, opts.latency_size, opts.threads, opts.min_keep, multiple)
    latency_cost = cost if opts.latency_size == opts.imgsz else CostModel(model, analysis.groups, opts.latency_size)
    latency = latency_model(model, latency_cost, analysis.groups, runtime, settings, cache, samples)
    flag = opts.latency_budget()
    if flag is None:
        return Budget(cost, remain_ratio, f"--remain-ratio {remain_ratio:g}" if remain_ratio else "", multiple,
                      latency, runtime, samples)
    ratio = opts.latency_ms / latency.full if opts.latency_ms is not None else 1 / opts.speedup
    where = f"on {runtime.name} ({opts.threads} threads, {opts.latency_size} px, batch 1)"
    if ratio >= 1:
        raise UserError(f"{flag}: the unpruned model already runs in {latency.full:.2f} ms {where}; ask for less")
    LOGGER.info("latency budget %s: %.2f ms, %.1f%% of the unpruned model's %.2f ms %s", flag, ratio * latency.full,
                100 * ratio, latency.full, where)
    return Budget(latency, ratio, flag, multiple, latency, runtime, samples)


def calibration_samples(task: Task, imgsz: int) -> list:
    """A few training images prepared as the task validates them: an INT8 runtime's calibration (as export)."""
    files = task.calibration_files("train")[:CALIBRATION_IMAGES]
    return [task.calibration_image(f, (imgsz, imgsz))[None].numpy() for f in files]


def _finish(model: nn.Module, meta: dict[str, Any], analysis: ChannelAnalysis, plan: Plan, opts: PruneOptions,
            note: dict[str, Any], task: Task, calibration: list[torch.Tensor] | None = None,
            budget: Budget | None = None, latency: dict[str, Any] | None = None) -> PruneResult:
    """Cut, report, time (with ``--runtime``; ``latency``: measured already), score and save (shared tail of both
    tools); ``calibration`` batches re-estimate the pruned model's BatchNorm statistics (EagleEye: fine-tuning
    starts from the network that was scored)."""
    pruned = prune_model(model, analysis.groups, plan, note=note)
    if calibration:
        recalibrate_batchnorm(pruned, calibration)
    def time_latency() -> dict[str, Any]:
        if latency is not None:
            return latency
        return measured_latency(model, pruned, plan, opts, budget) if budget and budget.runtime else {}

    return report_and_save(model, meta, pruned, analysis.kept_whole, opts, note, task, time_latency)


def report_and_save(model: nn.Module, meta: dict[str, Any], pruned: nn.Module, kept_whole: dict[int, set[str]],
                     opts: PruneOptions, note: dict[str, Any], task: Task,
                     time_latency: Callable[[], dict[str, Any]] = dict) -> PruneResult:
    """Layer table, sizes, the measured latency (``time_latency``, after the tables), the pruned model's score
    before fine-tuning, and pruned.yaml + pruned.pt (every tool)."""
    before, after = model_size(model, opts.imgsz), model_size(pruned, opts.imgsz)
    LOGGER.info("\n%s", format_layer_table(model, pruned, kept_whole))
    LOGGER.info("%s", format_totals(before, after, opts.imgsz))
    latency = time_latency()
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
    extra = {"latency": latency} if latency else {}
    yaml_path, weights_path = save_pruned(pruned, opts.path, header, names=names, pruned=note, imgsz=opts.imgsz,
                                          **extra)
    LOGGER.info("saved %s and %s", yaml_path, weights_path)
    return PruneResult(yaml_path, weights_path, result_before, result_after, latency=latency)


def measured_latency(model: nn.Module, pruned: nn.Module, plan: Plan, opts: PruneOptions,
                     budget: Budget) -> dict[str, Any]:
    """Export the unpruned and the pruned model for the runtime, time them in the same rounds, and compare
    with the prediction and the ask."""
    predicted = budget.latency.ms(plan_counts(plan))
    unpruned, measured = measure_chosen(model, pruned, budget.runtime, opts.latency_size, budget.samples)
    asked = budget.ratio * budget.latency.full if budget.model is budget.latency else None
    report = {"runtime": budget.runtime.name, "threads": opts.threads, "imgsz": opts.latency_size,
              "multiple": budget.multiple, "budget": budget.flag or None, "asked_ms": asked,
              "predicted_ms": predicted, "measured_ms": measured, "unpruned_ms": unpruned,
              "table_unpruned_ms": budget.latency.full, "measured_speedup": unpruned / measured,
              "gap_predicted": measured / predicted - 1, "gap_asked": measured / asked - 1 if asked else None}
    ask = f"asked {asked:.2f} ms ({budget.flag}), " if asked else ""
    versus = f", {report['gap_asked']:+.1%} from the ask" if asked else ""
    LOGGER.info("latency on %s (%d threads, %d px, batch 1): %spredicted %.2f ms, measured %.2f ms (%+.1f%% from "
                "the prediction%s); the unpruned model measured %.2f ms in the same rounds: %.2fx",
                budget.runtime.name, opts.threads, opts.latency_size, ask, predicted, measured,
                100 * report["gap_predicted"], versus, unpruned, report["measured_speedup"])
    return report


def write_candidates(candidates: list[eagleeye.Candidate], yaml_path: Path, latency_full: float | None = None
                     ) -> Path:
    """Every candidate (number, FLOPs share, score, seconds, keep ratio per group; under a latency budget also its
    predicted latency share and ms) as CSV, plus the score plot."""
    csv_path = yaml_path.with_name(f"{yaml_path.stem}_candidates.csv")
    groups = len(candidates[0].ratios) if candidates else 0
    latency = ["latency_ratio", "predicted_ms"] if latency_full else []
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate", "flops_ratio", "score", "seconds", *latency,
                         *(f"group{i}" for i in range(groups))])
        for c in candidates:
            predicted = [f"{c.budget_ratio:.5f}", f"{c.budget_ratio * latency_full:.3f}"] if latency_full else []
            writer.writerow([c.number, f"{c.flops_ratio:.5f}", f"{c.score:.6f}", f"{c.seconds:.3f}", *predicted,
                             *(f"{r:.4f}" for r in c.ratios)])
    plot_candidates(candidates, csv_path.with_suffix(".png"), "latency" if latency_full else "FLOPs")
    return csv_path


def plot_candidates(candidates: list[eagleeye.Candidate], path: Path, quantity: str = "FLOPs") -> None:
    """Score against the budgeted share (FLOPs or predicted latency), the best candidate marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    share = (lambda c: c.flops_ratio) if quantity == "FLOPs" else (lambda c: c.budget_ratio)
    axes.scatter([share(c) for c in candidates], [c.score for c in candidates], s=12, alpha=0.7)
    best = max(candidates, key=lambda c: c.score)
    axes.scatter([share(best)], [best.score], s=60, marker="*", color="tab:red", label="best")
    axes.set_xlabel(f"{'FLOPs kept' if quantity == 'FLOPs' else 'predicted latency'} (share of the original)")
    axes.set_ylabel("score after adaptive BN")
    axes.set_title(f"EagleEye: {len(candidates)} candidates")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)

