"""What val.py and detect.py share: their common flags and checks, the run folder, opening any model or artifact."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from utils.common.errors import FlagError
from utils.common.flags import IMGSZ_HELP, at_least, existing_weights, fraction, image_sizes
from utils.common.paths import REPO_ROOT, check_set_aside, check_writable_folder, increment_path, set_aside_earlier_run
from utils.tasks import ModelInfo, model_info


def add_inference_args(parser: argparse.ArgumentParser, run_kind: str) -> None:
    """Flags val.py and detect.py share: weights, size, device, precision, label files, output folder."""
    parser.add_argument("--weights", required=True, help="model weights (.pt, .torchscript, .onnx, folder, .engine)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help=f"inference size ({IMGSZ_HELP})")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA)")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (flips and scales; .pt only)")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--project", default=str(REPO_ROOT / "runs" / run_kind), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="write into an existing project/name (no name2, ...); "
                        "an earlier run there moves whole to project/name/previous (previous2, ...)")


def check_inference_args(args: argparse.Namespace, script: str) -> None:
    """val.py / detect.py: thresholds in [0, 1], counts >= 1, image size > 0, named files present."""
    existing_weights(args.weights)
    image_sizes("--imgsz", args.imgsz)
    fraction("--conf-thres", args.conf_thres)
    fraction("--iou-thres", args.iou_thres)
    at_least("--max-det", args.max_det, 1)
    if script == "val":
        at_least("--batch-size", args.batch_size, 1)
        at_least("--workers", args.workers, 0)
    else:
        at_least("--vid-stride", args.vid_stride, 1)
        at_least("--line-thickness", args.line_thickness, 1)
        for index in args.classes or []:
            at_least("--classes", index, 0)
    if args.data:
        from utils.common.paths import find_file
        from utils.data.config import DATA_DIR

        find_file(args.data, DATA_DIR, "--data YAML")


def load_predictor(weights: str, device: torch.device, half: bool) -> tuple[Any, ModelInfo]:
    """(fused model or backend, what the task needs to know of it) for a .pt checkpoint or any exported artifact."""
    if Path(weights).suffix == ".pt":
        from utils.weights.checkpoint import load_checkpoint

        loaded = load_checkpoint(weights, fuse=True)
        return loaded.model.to(device), model_info(loaded.model, loaded.meta.get("names"))
    from utils.export.registry import load_backend

    backend = load_backend(weights, device=str(device), fp16=half)
    return backend, model_info(backend)


class RunDir:
    """``project/name`` (or the next free ``name2``, ``name3``... without ``exist_ok``), made only when a script
    is ready to write there: a mistake found while loading leaves no empty folder behind. With ``exist_ok`` an
    earlier run found there is set aside whole (``previous``, ``previous2``...), as train.py does."""

    def __init__(self, project: str | Path, name: str, exist_ok: bool):
        self.project = project
        self.path = Path(project) / name
        self.exist_ok = exist_ok

    def check(self, inputs: dict[str, str | None]) -> None:
        """Before any model loads: the folder can be created and written, and (``exist_ok``) its earlier run can be
        set aside without moving ``inputs`` (flag -> file this run reads) from under it."""
        check_writable_folder(self.path if self.exist_ok else increment_path(self.path), "--project", self.project)
        if self.exist_ok:
            check_set_aside(self.path, "--project/--name", inputs)

    def create(self) -> Path:
        path = self.path if self.exist_ok else increment_path(self.path)
        if self.exist_ok:
            set_aside_earlier_run(path)
        path.mkdir(parents=True, exist_ok=True)
        return path


def check_artifact_size(predictor: Any, imgsz: int, weights: str) -> None:
    """An export with a fixed input size runs at that size only; another --imgsz is refused before loading data."""
    fixed = getattr(predictor, "imgsz", None)
    if fixed and not getattr(predictor, "dynamic_hw", False) and tuple(fixed) != (imgsz, imgsz):
        raise FlagError(f"--imgsz {imgsz}: {weights} was exported for {fixed[0]}x{fixed[1]} inputs; pass --imgsz "
                        f"{fixed[0]} or re-export with that --imgsz (or --dynamic-hw for ONNX/OpenVINO)")
