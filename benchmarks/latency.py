"""Batch-1 latency of several checkpoints on the pruning tools' runtimes, all in the same interleaved rounds.

    python benchmarks/latency.py --weights runs/sparse/s_aim026_slim.pt runs/train/yolov5n/weights/best.pt \
        --imgsz 640 --runtime onnxruntime openvino --threads 2 --runs 30
    python benchmarks/latency.py --weights yolov5s.pt --widths 0.5 0.25 --runtime openvino openvino-bf16 \
        openvino-int8 --reference openvino-bf16      # how fast can pruning make it, against bf16?

The questions it answers: is this pruned model faster than that one (a family member of about the same FLOPs, the
unpruned parent)? And with ``--widths``: how much speed is there for pruning to buy at all? Every checkpoint is
then also cut to each uniform width (every prunable channel group keeps that share of its channels, rounded up to
8, as the latency tables' points; which channels does not change the time), so a target such as "2.5x the
unpruned model in bf16" can be checked against what even a drastic cut reaches.

Each model is exported the way export.py exports it (fused, fixed batch-1 shape) and opened on every
``--runtime`` of ``prune_slim.py --runtime`` (utils/compress/prune/runtimes.py: ONNX Runtime, OpenVINO FP32 and
bfloat16, OpenVINO INT8 by NNCF on random calibration inputs, which is enough to time it). Every model on every
runtime runs once per round, all in the same rounds (a busy moment of the machine slows all alike), and the median
of ``--runs`` rounds is kept. Prints a Markdown table with each model's parameters, GFLOPs at ``--imgsz`` and
milliseconds, and its speed relative to the first ``--weights`` on the same runtime, or, with ``--reference R``,
on runtime R.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.cli import UserArgumentParser, run_cli  # noqa: E402
from utils.common.errors import FlagError  # noqa: E402

if TYPE_CHECKING:
    from torch import nn

CUT_MULTIPLE = 8  # --widths cuts round kept channels up to this, as the latency tables' points do


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoints (.pt); the first is the reference")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument("--runtime", nargs="+", default=["onnxruntime", "openvino"],
                        help="runtimes (prune_slim.py --runtime names)")
    parser.add_argument("--widths", nargs="+", type=float, default=[],
                        help="also time every checkpoint cut to these uniform widths (share of each group's channels)")
    parser.add_argument("--reference", help="speed-ups relative to the first --weights on this --runtime "
                        "(default: on each runtime itself)")
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
    for width in args.widths:
        if not 0 < width < 1:
            raise FlagError(f"--widths {width:g}: expected a share of the channels between 0 and 1")
    if args.reference and args.reference not in args.runtime:
        raise FlagError(f"--reference {args.reference}: not one of --runtime {' '.join(args.runtime)}")
    for name in args.runtime:
        RUNTIMES.create(name, args.threads).check()


def uniform_cuts(model: nn.Module, widths: list[float]) -> list[nn.Module]:
    """``model`` cut to each uniform width: every prunable group keeps that share of its channels (rounded as the
    latency tables' points are)."""
    from utils.compress.prune.analysis import analyse_channels
    from utils.compress.prune.latency import cut_to_counts, uniform_counts
    from utils.compress.prune.plan import MIN_KEEP

    groups = analyse_channels(model, verify=False).groups
    sizes = [g.size for g in groups]
    return [cut_to_counts(model, groups, uniform_counts(sizes, width, MIN_KEEP, CUT_MULTIPLE)) for width in widths]


def load_rows(weights: list[str], widths: list[float]) -> tuple[list[str], list[nn.Module]]:
    """(row labels, models): each checkpoint as it is, then cut to each of ``widths``."""
    from utils.weights.checkpoint import load_checkpoint

    labels, models = [], []
    for path in weights:
        model = load_checkpoint(path).model.float().eval()
        labels.append(path)
        models.append(model)
        for width, cut in zip(widths, uniform_cuts(model, widths), strict=True):
            labels.append(f"{path} at {width:.0%} width")
            models.append(cut)
    return labels, models


def measure(models: list[nn.Module], imgsz: int, runtimes: list[str], threads: int, runs: int
            ) -> tuple[list[dict[str, float]], dict[str, list[float]]]:
    """(params and GFLOPs of each model, runtime -> median ms of each model), every model on every runtime timed
    in the same interleaved rounds (by the first runtime's timer: the runtimes differ in how they open a model, not
    in how a call is timed)."""
    from utils.common.torch_utils import count_parameters, model_gflops
    from utils.compress.prune.latency import example_input
    from utils.compress.prune.runtimes import RUNTIMES
    from utils.export.common import prepare_for_export

    sizes = [{"params": count_parameters(m), "gflops": model_gflops(m, imgsz) or 0.0} for m in models]
    opened = {name: RUNTIMES.create(name, threads) for name in runtimes}
    with tempfile.TemporaryDirectory() as folder:
        handles = [runtime.open(prepare_for_export(m), example_input(m, imgsz), Path(folder))
                   for runtime in opened.values() for m in models]
        times = opened[runtimes[0]].latency(handles, runs)
    return sizes, {name: times[i * len(models):(i + 1) * len(models)] for i, name in enumerate(runtimes)}


def table(labels: list[str], sizes: list[dict[str, float]], ms: dict[str, list[float]],
          reference: str | None = None) -> str:
    """Markdown: one row per model; per runtime its ms and its speed-up over the first model on the same runtime,
    or on ``reference``."""
    header = ["weights", "params (M)", "GFLOPs"] + [f"{name} ms (speed-up)" for name in ms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, (label, size) in enumerate(zip(labels, sizes, strict=True)):
        cells = [f"{times[number]:.2f} ({ms[reference or name][0] / times[number]:.2f}x)"
                 for name, times in ms.items()]
        lines.append(f"| {label} | {size['params'] / 1e6:.3f} | {size['gflops']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from utils.common.timing import cpu_model

    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    labels, models = load_rows(args.weights, args.widths)
    sizes, ms = measure(models, args.imgsz, args.runtime, args.threads, args.runs)
    print(table(labels, sizes, ms, args.reference))
    against = f"the first model on {args.reference}" if args.reference else "the first model on the same runtime"
    print(f"\nbatch 1, {args.imgsz}x{args.imgsz}, {args.threads} threads, median of {args.runs} interleaved rounds "
          f"(every model and runtime in the same rounds), speed-ups against {against}, {cpu_model()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
