"""Network Slimming: cut the channels whose BatchNorm scales fall below one global threshold.

    python train.py --cfg yolov5s.yaml --data data.yaml --sparse 1e-4                  # sparse training first
    python prune_slim.py --weights best.pt --data data.yaml --global-percent 0.5 --path pruned.yaml
    python prune_slim.py --weights best.pt --data data.yaml --remain-ratio 0.5 --path pruned.yaml  # FLOPs budget
    python train.py --cfg pruned.yaml --weights pruned.pt --data data.yaml --teacher best.pt  # fine-tune

Writes pruned.yaml (the model's rows plus a widths table) and pruned.pt, prints the layer table, the size
before/after and the mAP before fine-tuning.
"""

from __future__ import annotations

import argparse

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.flags import IMGSZ_HELP
from utils.runners.prune import PruneOptions, run_prune_slim


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags prune_slim.py and prune_eagleeye.py share."""
    parser.add_argument("--weights", required=True, help="trained checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="data-set YAML (validation before fine-tuning)")
    parser.add_argument("--path", required=True, help="pruned model YAML to write; the checkpoint goes beside it (.pt)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640,
                        help=f"image size for FLOPs and val ({IMGSZ_HELP})")
    parser.add_argument("--batch-size", "--batch", type=int, default=32, help="validation batch size")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--round", type=int, default=8, help="round kept widths up to a multiple of this (1: none)")
    parser.add_argument("--min-keep", type=float, default=0.1, help="keep at least this share of each group")
    parser.add_argument("--noval", action="store_true", help="skip the validation of the pruned model")
    parser.add_argument("--exist-ok", action="store_true", help="replace an existing pruned.yaml / pruned.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed (calibration batches, EagleEye draws)")


def options(args: argparse.Namespace) -> PruneOptions:
    return PruneOptions(weights=args.weights, data=args.data, path=args.path, imgsz=args.imgsz,
                        batch_size=args.batch_size, workers=args.workers, multiple=args.round,
                        min_keep=args.min_keep, exist_ok=args.exist_ok, noval=args.noval, seed=args.seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--global-percent", type=float, help="share of all prunable channels to cut (0-1)")
    budget.add_argument("--remain-ratio", type=float, help="share of the FLOPs to keep (0-1); the threshold is found")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_prune_slim(options(args), args.global_percent, args.remain_ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
