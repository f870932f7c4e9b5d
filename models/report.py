"""Model report: the layer table, per-layer timing and a roofline estimate (memory traffic vs compute).

``python models/yolo.py --cfg yolov5s.yaml --imgsz 640 --profile --roofline --peak-gflops 1000
--bandwidth-gbs 100`` prints what a deployment engineer needs before choosing a board: parameters, FLOPs,
bytes moved, arithmetic intensity, and whether the model is compute- or memory-bound there.

Everything here works on a model already built (``models.yolo.main`` builds it), so this module imports
nothing from ``models``. It holds the command line's flags too; their domain checks come from
``utils.common.flags``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from models.registry import task_of
from utils.common.cli import UserArgumentParser
from utils.common.flags import IMGSZ_HELP, at_least, check_img_size, image_sizes, positive
from utils.common.torch_utils import count_parameters, model_gflops

LOGGER = logging.getLogger(__name__)


@dataclass
class Roofline:
    """FLOPs and bytes moved for one forward pass at batch 1, and the implied bound on a device."""

    gflops: float
    weight_bytes: int
    activation_bytes: int
    peak_gflops: float | None = None
    bandwidth_gbs: float | None = None

    @property
    def traffic_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte of memory traffic."""
        return self.gflops * 1e9 / max(self.traffic_bytes, 1)

    @property
    def bound(self) -> str | None:
        if not (self.peak_gflops and self.bandwidth_gbs):
            return None
        ridge = self.peak_gflops / self.bandwidth_gbs  # FLOPs/byte where the two limits meet
        return "compute" if self.intensity >= ridge else "memory"

    @property
    def roofline_ms(self) -> float | None:
        """Lower bound on latency: the slower of doing the FLOPs and moving the bytes."""
        if not (self.peak_gflops and self.bandwidth_gbs):
            return None
        return max(self.gflops / self.peak_gflops, self.traffic_bytes / 1e9 / self.bandwidth_gbs) * 1e3


def _leaf_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def _numel(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_numel(o) for o in obj)
    return 0


def activation_traffic(model: nn.Module, image: torch.Tensor, bytes_per_element: int = 4) -> int:
    """Bytes each leaf layer reads (inputs) and writes (outputs) during one forward pass, summed.

    This counts every layer boundary as a round trip through memory, which is what an unfused eager
    runtime does; fused runtimes (TensorRT) move less, so the number is an upper bound for them.
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += (_numel(inputs) + _numel(output)) * bytes_per_element

    handles = [m.register_forward_hook(hook) for m in _leaf_modules(model)]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return total


def roofline(model: nn.Module, imgsz: int = 640, bytes_per_element: int = 4, peak_gflops: float | None = None,
             bandwidth_gbs: float | None = None) -> Roofline:
    """Parameters, FLOPs and memory traffic of one batch-1 forward pass at ``imgsz``."""
    model = model.eval()
    image = torch.zeros(1, int(getattr(model, "yaml", {}).get("ch", 3)), imgsz, imgsz)
    return Roofline(
        gflops=model_gflops(model, imgsz) or 0.0,
        weight_bytes=count_parameters(model) * bytes_per_element,
        activation_bytes=activation_traffic(model, image, bytes_per_element),
        peak_gflops=peak_gflops,
        bandwidth_gbs=bandwidth_gbs,
    )


def profile_layers(model: nn.Module, imgsz: int = 640, runs: int = 3) -> list[tuple[int, str, float]]:
    """Median forward time per top-level layer (ms), measured inside one real forward pass."""
    times: dict[int, list[float]] = {}
    starts: dict[int, float] = {}

    def pre(module, _):
        starts[module.i] = time.perf_counter()

    def post(module, _, __):
        times.setdefault(module.i, []).append((time.perf_counter() - starts[module.i]) * 1e3)

    handles = [h for m in model.model for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    image = torch.zeros(1, 3, imgsz, imgsz)
    try:
        with torch.no_grad():
            for _ in range(runs + 1):
                model(image)
    finally:
        for handle in handles:
            handle.remove()
    return [(m.i, m.type, sorted(times[m.i][1:])[len(times[m.i][1:]) // 2]) for m in model.model]


def layer_table(model: nn.Module) -> str:
    """The YOLOv5-style table: index, from, n, params, module, arguments."""
    rows = [f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}"]
    for (f, n, _, args), layer in zip(model.yaml["backbone"] + model.yaml["head"], model.model):
        rows.append(f"{layer.i:>3}{f!s:>18}{n:>3}{layer.np:10.0f}  {layer.type:<40}{args!s:<30}")
    return "\n".join(rows)


def format_report(model: nn.Module, imgsz: int, report: Roofline) -> str:
    lines = [
        layer_table(model),
        f"summary: {len(model.model)} layers, {count_parameters(model):,} parameters, "
        f"{report.gflops:.2f} GFLOPs at {imgsz}x{imgsz}",
        f"memory traffic: weights {report.weight_bytes / 1e6:.2f} MB + activations "
        f"{report.activation_bytes / 1e6:.2f} MB = {report.traffic_bytes / 1e6:.2f} MB; "
        f"arithmetic intensity {report.intensity:.1f} FLOPs/byte",
    ]
    if report.bound:
        lines.append(f"roofline at {report.peak_gflops:g} GFLOP/s, {report.bandwidth_gbs:g} GB/s: "
                     f"{report.bound}-bound, >= {report.roofline_ms:.3f} ms per image")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description="Print a model's layer table, profile and roofline")
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model YAML (path or name in models/)")
    parser.add_argument("--nc", type=int, default=None, help="override the number of classes")
    parser.add_argument("--depth-multiple", type=float, default=None, help="override depth_multiple")
    parser.add_argument("--width-multiple", type=float, default=None, help="override width_multiple")
    parser.add_argument("--imgsz", "--img", type=int, default=640, help=f"input size ({IMGSZ_HELP})")
    parser.add_argument("--profile", action="store_true", help="add per-layer forward time")
    parser.add_argument("--half-bytes", action="store_true", help="count 2 bytes per element (FP16) for traffic")
    parser.add_argument("--peak-gflops", type=float, default=None, help="device peak GFLOP/s for the roofline")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="device memory bandwidth GB/s")
    return parser.parse_args(argv)


def check_report_args(args: argparse.Namespace) -> None:
    """Every numeric flag in its domain before the model is built."""
    at_least("--nc", args.nc, 1)
    positive("--depth-multiple", args.depth_multiple)
    positive("--width-multiple", args.width_multiple)
    image_sizes("--imgsz", args.imgsz)
    positive("--peak-gflops", args.peak_gflops)
    positive("--bandwidth-gbs", args.bandwidth_gbs)


def print_report(model: nn.Module, args: argparse.Namespace) -> None:
    """Print the table, cost and roofline of a built model (eval mode) for the flags of :func:`parse_args`."""
    if task_of(model) == "detect":  # detectors run at multiples of their largest stride only
        args.imgsz = check_img_size(args.imgsz, max(int(model.stride.max()), 32))
    report = roofline(model, args.imgsz, 2 if args.half_bytes else 4, args.peak_gflops, args.bandwidth_gbs)
    print(format_report(model, args.imgsz, report))
    if args.profile:
        torch.set_num_threads(max(torch.get_num_threads(), 1))
        print(f"\n{'layer':>5} {'module':<40} {'ms':>9}")
        for index, kind, ms in profile_layers(model, args.imgsz):
            print(f"{index:>5} {kind:<40} {ms:9.2f}")
