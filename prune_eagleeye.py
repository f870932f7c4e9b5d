"""EagleEye: search random layer widths within a FLOPs or latency budget, keep the candidate that scores best
after adaptive BatchNorm, and write it as a pruned model.

    python prune_eagleeye.py --weights best.pt --data data.yaml --remain-ratio 0.5 --max-iter 200 --path pruned.yaml
    python prune_eagleeye.py --weights best.pt --data data.yaml --speedup 1.5 --runtime openvino --path pruned.yaml
    python train.py --cfg pruned.yaml --weights pruned.pt --data data.yaml --teacher best.pt    # fine-tune

Writes pruned.yaml, pruned.pt, pruned_candidates.csv (every candidate's widths, FLOPs share, score; under a
latency budget also its predicted latency) and pruned_candidates.png (score against the budgeted share).
Latency budgets (--latency-ms, --speedup with --runtime) work as in prune_slim.py: --delta is then a share of
the unpruned model's latency, and the best candidate is exported and timed beside the unpruned model. When it
lands more than 5 % from the ask, its widths are scaled (one factor for every layer, no second search) to where
the table's error measured there says the ask lies, and measured again (up to --latency-tries measurements);
the nearest is kept.
"""

from __future__ import annotations

import argparse

from utils.common.cli import UserArgumentParser, run_cli
from utils.compress.prune.eagleeye import SearchSettings
from utils.runners.prune import (
    add_common_args,
    add_latency_budgets,
    add_latency_tries,
    options,
    run_prune_eagleeye,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--remain-ratio", type=float, help="share of the FLOPs to keep (0-1)")
    add_latency_budgets(budget)
    parser.add_argument("--delta", type=float, default=0.02,
                        help="accepted band around the budget, as a share of the unpruned FLOPs (or latency)")
    add_latency_tries(parser)
    parser.add_argument("--max-iter", type=int, default=200, help="candidates to score")
    parser.add_argument("--spread", type=float, default=0.25, help="per-layer keep ratios vary by +- this")
    parser.add_argument("--calib-batches", type=int, default=8, help="training batches for adaptive BN")
    parser.add_argument("--score-images", type=int, default=128, help="validation images that score a candidate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SearchSettings(remain_ratio=args.remain_ratio, delta=args.delta, max_iter=args.max_iter,
                              min_keep=args.min_keep, multiple=args.round, spread=args.spread, seed=args.seed)
    run_prune_eagleeye(options(args), settings, args.calib_batches, args.score_images, args.latency_tries)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
