"""Network Slimming: cut the channels whose BatchNorm scales fall below one global threshold.

    python train.py --cfg yolov5s.yaml --data data.yaml --sparse 1e-4                  # sparse training first
    python prune_slim.py --weights best.pt --data data.yaml --global-percent 0.5 --path pruned.yaml
    python prune_slim.py --weights best.pt --data data.yaml --remain-ratio 0.5 --path pruned.yaml  # FLOPs budget
    python prune_slim.py --weights best.pt --data data.yaml --speedup 1.5 --runtime onnxruntime --path pruned.yaml
                                                                   # latency budget, measured on the runtime
    python train.py --cfg pruned.yaml --weights pruned.pt --data data.yaml --teacher best.pt  # fine-tune

Writes pruned.yaml (the model's rows plus a widths table) and pruned.pt, prints the layer table, the size
before/after and the mAP before fine-tuning. Before cutting it prints the share of the BatchNorm-scale mass (sum
of |gamma| over the prunable channels) the cut removes, and warns when that is more than 10 %: the model is not
sparse enough for the budget (sparse-train it first, or ask for less).

A latency budget (--latency-ms T or --speedup X, with --runtime) is batch-1 time at --imgsz with --threads
threads on that runtime. The per-layer latency table it is predicted from is measured once per model, runtime,
image size and thread count (seconds to minutes) and kept in latency_tables.json beside --path for the next
run; without --round, widths are rounded to the multiple the runtime was measured to run fastest. After
cutting, the pruned model is exported and timed, and the predicted and measured latency are printed.
"""

from __future__ import annotations

import argparse

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.flags import IMGSZ_HELP
from utils.compress.prune.runtimes import RUNTIMES
from utils.runners.prune import PruneOptions, run_prune_slim


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags prune_slim.py and prune_eagleeye.py share."""
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
    parser.add_argument("--exist-ok", action="store_true", help="replace an existing pruned.yaml / pruned.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed (calibration batches, EagleEye draws)")
    parser.add_argument("--runtime", help=f"measure latency on this runtime ({', '.join(RUNTIMES.names())}): "
                                          "needed by --latency-ms/--speedup; with a FLOPs budget it reports the "
                                          "predicted and measured latency")
    parser.add_argument("--threads", type=int, default=2, help="threads the runtime runs with (latency budgets)")


def add_latency_budgets(budget: argparse._MutuallyExclusiveGroup) -> None:
    """The latency budgets, in each tool's group of mutually exclusive budgets."""
    budget.add_argument("--latency-ms", type=float,
                        help="batch-1 latency to reach on --runtime at --imgsz, in ms (measured, not FLOPs)")
    budget.add_argument("--speedup", type=float, help="speed-up over the unpruned model to reach on --runtime")


def options(args: argparse.Namespace) -> PruneOptions:
    return PruneOptions(weights=args.weights, data=args.data, path=args.path, imgsz=args.imgsz,
                        batch_size=args.batch_size, workers=args.workers, multiple=args.round,
                        min_keep=args.min_keep, exist_ok=args.exist_ok, noval=args.noval, seed=args.seed,
                        runtime=args.runtime, threads=args.threads, latency_ms=args.latency_ms,
                        speedup=args.speedup)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--global-percent", type=float, help="share of all prunable channels to cut (0-1)")
    budget.add_argument("--remain-ratio", type=float, help="share of the FLOPs to keep (0-1); the threshold is found")
    add_latency_budgets(budget)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_prune_slim(options(args), args.global_percent, args.remain_ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
