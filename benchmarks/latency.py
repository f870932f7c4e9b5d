"""Batch-1 latency of several checkpoints on the pruning tools' runtimes, all in the same interleaved rounds.

    python benchmarks/latency.py --weights runs/sparse/s_aim026_slim.pt runs/train/yolov5n/weights/best.pt \
        --imgsz 640 --runtime onnxruntime openvino --threads 2 --runs 30

The question it answers: is this pruned model faster than that one (a family member of about the same FLOPs, the
unpruned parent)? Each checkpoint is exported the way export.py exports it (fused, fixed batch-1 shape) and opened
on every ``--runtime`` of ``prune_slim.py --runtime`` (utils/compress/prune/runtimes.py: ONNX Runtime, OpenVINO
FP32, OpenVINO INT8 by NNCF on random calibration inputs, which is enough to time it); per runtime, every model
runs once per round and the median of ``--runs`` rounds is kept. Prints a Markdown table with each model's
parameters, GFLOPs at ``--imgsz`` and milliseconds, and its speed relative to the first ``--weights``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.cli import UserArgumentParser, run_cli  # noqa: E402
from utils.common.errors import FlagError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoints (.pt); the first is the reference")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument("--runtime", nargs="+", default=["onnxruntime", "openvino"],
                        help="runtimes (prune_slim.py --runtime names)")
    parser.add_argument("--threads", type=int, default=2, help="runtime threads")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds per runtime")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every file present and every number in its domain, before any model is loaded."""
    from utils.common.flags import image_sizes
    from utils.compress.prune.runtimes import RUNTIMES

    for weights in args.weights:
        if not Path(weights).is_file():
            raise FlagError(f"--weights {weights}: file not found")
    image_sizes("--imgsz", args.imgsz)
    for flag, value in (("--threads", args.threads), ("--runs", args.runs)):
        if value < 1:
            raise FlagError(f"{flag} {value}: expected at least 1")
    for name in args.runtime:
        RUNTIMES.create(name, args.threads).check()


def measure(weights: list[str], imgsz: int, runtimes: list[str], threads: int, runs: int
            ) -> tuple[list[dict[str, float]], dict[str, list[float]]]:
    """(params and GFLOPs of each checkpoint, runtime -> median ms of each checkpoint)."""
    from utils.common.torch_utils import count_parameters, model_gflops
    from utils.compress.prune.latency import example_input
    from utils.compress.prune.runtimes import RUNTIMES
    from utils.export.common import prepare_for_export
    from utils.weights.checkpoint import load_checkpoint

    models = [load_checkpoint(w).model.float().eval() for w in weights]
    sizes = [{"params": count_parameters(m), "gflops": model_gflops(m, imgsz) or 0.0} for m in models]
    ms: dict[str, list[float]] = {}
    for name in runtimes:
        runtime = RUNTIMES.create(name, threads)
        with tempfile.TemporaryDirectory() as folder:
            handles = [runtime.open(prepare_for_export(m), example_input(m, imgsz), Path(folder)) for m in models]
            ms[name] = runtime.latency(handles, runs)
    return sizes, ms


def table(weights: list[str], sizes: list[dict[str, float]], ms: dict[str, list[float]]) -> str:
    """Markdown: one row per checkpoint; per runtime its ms and its speed-up over the first checkpoint."""
    header = ["weights", "params (M)", "GFLOPs"] + [f"{name} ms (speed-up)" for name in ms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, (path, size) in enumerate(zip(weights, sizes, strict=True)):
        cells = [f"{times[number]:.2f} ({times[0] / times[number]:.2f}x)" for times in ms.values()]
        lines.append(f"| {path} | {size['params'] / 1e6:.3f} | {size['gflops']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from utils.common.timing import cpu_model

    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    sizes, ms = measure(args.weights, args.imgsz, args.runtime, args.threads, args.runs)
    print(table(args.weights, sizes, ms))
    print(f"\nbatch 1, {args.imgsz}x{args.imgsz}, {args.threads} threads, median of {args.runs} interleaved rounds, "
          f"{cpu_model()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
