"""Torch-Pruning's own structured pruner on a YOLO model, as its users run it: magnitude (L1/L2) or group-norm
importance, iterative steps, the Detect head's output convs ignored; the channel ratio is searched until the
pruned model keeps the asked share of the FLOPs (or reaches a measured latency). The peer our pruning tools are
compared with: the peer row of benchmarks/compress.py.

    python benchmarks/prune_tp.py --weights best.pt --data data.yaml --importance group-norm --remain-ratio 0.5 \
        --path tp.yaml
    python benchmarks/prune_tp.py --weights best.pt --data data.yaml --importance l1 --steps 5 --remain-ratio 0.5 \
        --path tp.yaml
    python benchmarks/prune_tp.py ... --latency-ms 40 --latency-imgsz 640 --threads 2   # ONNX Runtime batch-1 budget
    python benchmarks/prune_tp.py ... --latency-ms 30 --runtime openvino-int8            # on another runtime
    python benchmarks/prune_tp.py ... --speedup 1.6 --runtime onnxruntime --latency-imgsz 640   # vs the unpruned
    python train.py --cfg tp.yaml --weights tp.pt --data data.yaml --teacher best.pt   # fine-tune

Writes tp.yaml (the model's rows plus a widths table) and tp.pt, prints the layer table, the size before/after
and the score before fine-tuning, like prune_slim.py. The FLOPs share lands within --delta of --remain-ratio
(latency: within --delta of --latency-ms or of 1/--speedup, as a share of it, measured on --runtime, ONNX Runtime
by default, as our tools measure their latency budgets; --speedup times each candidate in the same rounds as the
unpruned model, as our tools report their measured speed-up); each trial of the search prunes a fresh copy.
Unlike prune_slim.py and prune_eagleeye.py, --round defaults to 1 (the library's examples do not round widths).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.cli import UserArgumentParser, run_cli  # noqa: E402
from utils.compress.prune.peer import IMPORTANCES, PeerSettings  # noqa: E402
from utils.runners.prune import add_common_args, options  # noqa: E402
from utils.runners.prune_peer import LatencyTarget, run_prune_tp  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    # the library's examples do not round widths; with --round 8 a per-layer ratio moves small models' FLOPs in
    # jumps of 10 % and more, so most budgets cannot be met
    parser.set_defaults(round=1)
    parser.add_argument("--importance", default="group-norm", choices=IMPORTANCES,
                        help="l1/l2: norm of each group's first layer; group-norm: over all coupled parameters")
    parser.add_argument("--steps", type=int, default=5, help="iterative pruning steps (the library's schedule)")
    parser.add_argument("--global-pruning", action="store_true", help="rank channels across layers, not per layer")
    parser.add_argument("--delta", type=float, default=0.02,
                        help="accepted band: remain-ratio +- delta, or latency-ms x (1 +- delta)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--remain-ratio", type=float, help="share of the FLOPs to keep (0-1)")
    budget.add_argument("--latency-ms", type=float,
                        help="batch-1 latency to reach on --runtime (default onnxruntime) at --latency-imgsz")
    budget.add_argument("--speedup", type=float,
                        help="speed-up over the unpruned model to reach on --runtime, each candidate timed in the "
                             "same rounds as the unpruned model (robust to a shared machine's drift)")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per latency measurement (median)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = PeerSettings(importance=args.importance, steps=args.steps, global_pruning=args.global_pruning,
                            tolerance=args.delta)
    latency = None
    if args.latency_ms is not None or args.speedup is not None:
        latency = LatencyTarget(args.latency_imgsz or args.imgsz, args.latency_ms, args.speedup, args.threads,
                                args.runs, args.runtime or "onnxruntime")
    # the peer times each candidate of its own search (LatencyTarget), with no latency table of --runtime
    run_prune_tp(replace(options(args), latency_ms=None, speedup=None, runtime=None), settings, args.remain_ratio,
                 latency)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
