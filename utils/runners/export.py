"""What export.py does, callable from tests: export, then report each artifact's size and how far its outputs are
from PyTorch's on real images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from utils.common.errors import FlagError
from utils.common.flags import at_least, existing_path, existing_weights, fraction, image_sizes, positive
from utils.common.paths import REPO_ROOT
from utils.export import ExportOptions, export_model, load_for_export, prepare_for_export
from utils.export.job import comparison_images, export_task
from utils.export.onnx import EndToEndDetector, check_opset
from utils.export.registry import load_backend

SAMPLE_IMAGES = REPO_ROOT / "data" / "neu-det-sample" / "images" / "val"


def check_export_args(args: argparse.Namespace) -> None:
    """export.py: sizes, batch, counts and thresholds in their domain, weights (and --data) present."""
    existing_weights(args.weights)
    if len(args.imgsz) not in (1, 2):
        raise FlagError(f"--imgsz {' '.join(map(str, args.imgsz))}: give one size or height and width")
    image_sizes("--imgsz", args.imgsz)
    at_least("--batch-size", args.batch_size, 1)
    check_opset(args.opset)
    at_least("--calib-images", args.calib_images, 1)
    positive("--workspace", args.workspace, " GB")
    fraction("--conf-thres", args.conf_thres)
    fraction("--iou-thres", args.iou_thres)
    at_least("--max-det", args.max_det, 1)
    existing_path("--data", args.data)


def run_export(options: ExportOptions, compare: bool = True) -> dict[str, Path]:
    """Export ``options.weights``, print the parameter count and each artifact's size, and (``compare``) the max
    |artifact - PyTorch| on real images; returns artifact key -> path."""
    artifacts = export_model(options)
    print(f"{'model':12s} {options.weights}: {model_parameters(options.weights):,} parameters")
    for name, path in artifacts.items():
        print(f"{name:12s} {path} ({artifact_bytes(path) / 1e6:.2f} MB)")
    if compare:
        images, source = images_to_compare(options, SAMPLE_IMAGES)
        if images is None:
            print(source)
        else:
            for name, diff in compare_with_pytorch(options, artifacts, images).items():
                print(f"{name:12s} max |output - PyTorch| = {diff:.3g} on {len(images)} images from {source}")
    return artifacts


def model_parameters(weights: str | Path) -> int:
    from utils.common.torch_utils import count_parameters

    return count_parameters(load_for_export(Path(weights))[0])


def artifact_bytes(path: Path) -> int:
    """Size on disk of a file or of a folder artifact (OpenVINO, NCNN) with everything in it."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compare_with_pytorch(options: ExportOptions, artifacts: dict[str, Path],
                         images: torch.Tensor) -> dict[str, float]:
    """Max |exported - PyTorch| over ``images`` for each artifact (the same decoded output, or the NMS table)."""
    model, _ = load_for_export(Path(options.weights))
    reference_model = prepare_for_export(model)
    with torch.no_grad():
        reference = reference_model(images)
        end_to_end = EndToEndDetector(reference_model, len(model.names), options.nms_settings) if options.nms else None
        reference_nms = end_to_end(images)[0] if end_to_end is not None else None
    differences = {}
    for name, path in artifacts.items():
        backend = load_backend(path, device=options.device, fp16=options.half)
        output = backend(images.half() if backend.fp16 else images)
        expected = reference_nms if getattr(backend, "end2end", False) else reference
        differences[name] = _max_difference(output, expected)
    return differences


def _max_difference(output: Any, expected: Any) -> float:
    """Max |output - expected| for one tensor or a dict of heads; a backend's tuple output (``--nms``:
    detections, counts) is compared by its first tensor."""
    if isinstance(expected, dict):
        return max(_max_difference(output[name], logits) for name, logits in expected.items())
    output = output[0] if isinstance(output, (tuple, list)) else output
    return float((output.float().cpu() - expected).abs().max())


def images_to_compare(options: ExportOptions, sample_folder: Path, limit: int = 8) -> tuple[torch.Tensor | None, str]:
    """Real images to compare on (the model's task's --data val images, else the embedded sample), or none, with
    where they came from (or why there are none)."""
    if not options.data and not sample_folder.is_dir():
        return None, f"no --data given and {sample_folder} does not exist: outputs were not compared with PyTorch"
    model, _ = load_for_export(Path(options.weights))
    task = export_task(model, options.data, options.imgsz)
    images = comparison_images(task, sample_folder, options.imgsz, limit)
    return images, f"{options.data} val images" if options.data else str(sample_folder)
