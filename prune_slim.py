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
cutting, the pruned model is exported and timed beside the unpruned one, and the predicted and measured latency
are printed; when the cut lands more than 5 % from the ask, the table's error measured there aims the next cut
(up to --latency-tries measurements), and the cut nearest the ask is kept.
"""

from __future__ import annotations

import argparse

from utils.common.cli import UserArgumentParser, run_cli
from utils.runners.prune import (
    SLIM_CALIBRATION_BATCHES,
    add_common_args,
    add_latency_budgets,
    add_latency_tries,
    options,
    run_prune_slim,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--global-percent", type=float, help="share of all prunable channels to cut (0-1)")
    budget.add_argument("--remain-ratio", type=float, help="share of the FLOPs to keep (0-1); the threshold is found")
    add_latency_budgets(budget)
    add_latency_tries(parser)
    parser.add_argument("--calib-batches", type=int, default=SLIM_CALIBRATION_BATCHES,
                        help="augmented training batches that re-estimate the cut model's BatchNorm statistics "
                             "(0: keep the trained ones)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_prune_slim(options(args), args.global_percent, args.remain_ratio, args.calib_batches,
                   args.latency_tries)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
