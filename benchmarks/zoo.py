"""Benchmark the model zoo on CPU: size, FLOPs, memory traffic, and measured latency (PyTorch eager + ONNX Runtime).

``PYTHONPATH=. python benchmarks/zoo.py --sizes 320 640 --runs 5`` prints one Markdown table. GFLOPs are
given twice: the project's ``model_gflops`` (exact at 640) and YOLOv5's printout (thop at 32 px times the area
ratio), which over-counts models whose layers do not all grow with the input area.
Latency is the median of ``--runs`` batch-1 forwards after ``--warmup`` runs, on ``--threads`` threads (2 by
default: the numbers are for a small CPU, not this machine's best). ``--max-latency-gflops`` skips timing models whose
FLOPs at a size exceed the limit (x models at 640 take minutes per engine), printed as "-".
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from models.report import activation_traffic  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.common.cli import run_cli  # noqa: E402
from utils.common.torch_utils import count_parameters, model_gflops  # noqa: E402

LOGGER = logging.getLogger(__name__)
BASELINES = ("yolov5n.yaml", "yolov5s.yaml", "yolov5l.yaml")


@dataclass
class ModelRow:
    """One table row: static costs at 640 and latencies (ms) per engine and size."""

    name: str
    params: int
    gflops: float
    gflops_yolov5: float
    traffic_mb: float
    intensity: float
    latency_ms: dict[tuple[str, int], float | None] = field(default_factory=dict)


def zoo_configs(selected: list[str] | None) -> list[Path]:
    """The zoo YAMLs plus YOLOv5n/s/l as baselines, optionally filtered by substrings of the file name."""
    paths = sorted((ROOT / "models" / "zoo").glob("*.yaml")) + [ROOT / "models" / b for b in BASELINES]
    if selected:
        paths = [p for p in paths if any(s in p.name for s in selected)]
    return paths


def time_call(fn, runs: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def eager_latency(model: nn.Module, imgsz: int, runs: int, warmup: int) -> float:
    image = torch.rand(1, 3, imgsz, imgsz)
    with torch.inference_mode():
        return time_call(lambda: model(image), runs, warmup)


def onnx_latency(model: nn.Module, imgsz: int, runs: int, warmup: int, threads: int) -> float | None:
    """Export with the TorchScript exporter (opset 17) to a temp dir and time ONNX Runtime's CPU provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        LOGGER.warning("onnxruntime not installed: no ONNX latency")
        return None
    image = torch.rand(1, 3, imgsz, imgsz)
    head = model.model[-1]
    head.export_decoded_only = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(model, (image,), str(path), opset_version=17, dynamo=False,
                              input_names=["images"], output_names=["output"])
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"images": image.numpy()}
            return time_call(lambda: session.run(None, feed), runs, warmup)
    finally:
        head.export_decoded_only = False


def yolov5_style_gflops(model: nn.Module, imgsz: int, base: int = 32) -> float:
    """The number YOLOv5 prints: thop at ``base`` px scaled by the area ratio. It over-counts layers whose cost
    does not grow with area (SE/SK fully-connected layers after global pooling) and Swin blocks (a 1x1 map at
    32 px is padded to a whole 8x8 window); ``model_gflops`` detects those and counts at full size."""
    import thop

    with torch.no_grad():
        macs = thop.profile(copy.deepcopy(model), inputs=(torch.zeros(1, 3, base, base),), verbose=False)[0]
    return macs * 2 / 1e9 * (imgsz / base) ** 2


def benchmark_model(path: Path, args: argparse.Namespace) -> ModelRow:
    model = DetectionModel(path).eval()
    gflops = model_gflops(model, 640) or 0.0
    gflops_yolov5 = yolov5_style_gflops(model, 640)
    weight_bytes = count_parameters(model) * 4
    traffic = weight_bytes + activation_traffic(model, torch.zeros(1, 3, 640, 640))
    row = ModelRow(path.stem, count_parameters(model), gflops, gflops_yolov5, traffic / 1e6, gflops * 1e9 / traffic)
    for size in args.sizes:
        too_heavy = gflops * (size / 640) ** 2 > args.max_latency_gflops
        row.latency_ms[("eager", size)] = None if too_heavy else eager_latency(model, size, args.runs, args.warmup)
        if not args.skip_onnx:
            row.latency_ms[("onnx", size)] = (None if too_heavy else
                                              onnx_latency(model, size, args.runs, args.warmup, args.threads))
        LOGGER.info("%s @%d: %s", path.stem, size, {k: v for k, v in row.latency_ms.items() if k[1] == size})
    return row


def markdown_table(rows: list[ModelRow], sizes: list[int], engines: list[str]) -> str:
    columns = [f"{engine} {size} ms" for size in sizes for engine in engines]
    lines = ["| model | params (M) | GFLOPs@640 | YOLOv5-printed GFLOPs@640 | traffic@640 (MB) | FLOPs/byte | "
             + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        times = [row.latency_ms.get((engine, size)) for size in sizes for engine in engines]
        cells = ["-" if t is None else f"{t:.1f}" for t in times]
        lines.append(f"| {row.name} | {row.params / 1e6:.2f} | {row.gflops:.1f} | {row.gflops_yolov5:.1f} | "
                     f"{row.traffic_mb:.0f} | "
                     f"{row.intensity:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="substrings of YAML names to include (default: all)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--max-latency-gflops", type=float, default=float("inf"),
                        help="skip timing where a model's FLOPs at that size exceed this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("models.yolo").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [benchmark_model(path, args) for path in zoo_configs(args.models)]
    engines = ["eager"] if args.skip_onnx else ["eager", "onnx"]
    print(markdown_table(rows, args.sizes, engines))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
