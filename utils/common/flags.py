"""Command-line flags checked against their domain before anything loads, and ``--imgsz`` rounded to the stride.

Every script calls its ``check_*`` function first, so ``--epochs 0``, ``--conf-thres 2`` or a weights file that
is not there end in one ``error: --flag ...`` line, before a model is built, a data set is scanned or a run
folder is made. :func:`check_img_size` is the one rule all four scripts apply to image sizes once the model's
stride is known (YOLOv5 v7.0's: round up to a multiple of the largest stride, and say so).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from utils.common.errors import FlagError, MissingFileError

if TYPE_CHECKING:
    import argparse

    from utils.train.config import TrainConfig

LOGGER = logging.getLogger(__name__)

CACHE_CHOICES = ("ram", "ram-jpeg", "disk")
MAX_SEED = 2**32 - 1  # NumPy's seed range


# ---------------------------------------------------------------------------------------------- domain checks
def at_least(flag: str, value: float | None, low: float, hint: str = "") -> None:
    """``value >= low`` (None = flag not given, accepted)."""
    if value is not None and not value >= low:
        raise FlagError(f"{flag} {value}: must be at least {low:g}{hint}")


def positive(flag: str, value: float | None, hint: str = "") -> None:
    """``value > 0`` (None = flag not given, accepted)."""
    if value is not None and not value > 0:
        raise FlagError(f"{flag} {value}: must be greater than 0{hint}")


def fraction(flag: str, value: float | None, include_one: bool = True) -> None:
    """``value`` in [0, 1] (or [0, 1) without ``include_one``)."""
    if value is None:
        return
    if not (0 <= value <= 1) or (value == 1 and not include_one):
        raise FlagError(f"{flag} {value}: must lie in [0, 1{']' if include_one else ')'}")


def existing_path(flag: str, value: str | Path | None, what: str = "file") -> None:
    """A file (or, for exported models, a folder) the flag names must exist."""
    if value in (None, ""):
        return
    if not Path(value).expanduser().exists():
        raise MissingFileError(f"{flag} {value}: not found (no such {what})")


def existing_weights(value: str | Path) -> None:
    """``--weights`` must exist; the message says where to get official YOLOv5 weights (nothing is downloaded)."""
    from utils.weights.checkpoint import missing_weights_message

    if value and not Path(value).expanduser().exists():
        raise MissingFileError(f"--weights: {missing_weights_message(Path(value))}")


def image_sizes(flag: str, sizes: int | Sequence[int]) -> None:
    for size in [sizes] if isinstance(sizes, int) else sizes:
        at_least(flag, size, 1, " pixel (it is rounded up to a multiple of the model's stride)")


# ---------------------------------------------------------------------------------------------- per script
def check_train_config(cfg: TrainConfig) -> None:
    """train.py: every numeric flag in its domain, choice flags known, named files present."""
    at_least("--epochs", cfg.epochs, 1)
    if cfg.batch_size != -1:
        at_least("--batch-size", cfg.batch_size, 1, " (or -1 for AutoBatch)")
    image_sizes("--imgsz", cfg.imgsz)
    at_least("--workers", cfg.workers, 0)
    at_least("--nc", cfg.nc, 1)
    positive("--depth-multiple", cfg.depth_multiple)
    positive("--width-multiple", cfg.width_multiple)
    fraction("--label-smoothing", cfg.label_smoothing, include_one=False)
    at_least("--patience", cfg.patience, 0, " (0 disables early stopping)")
    at_least("--extend", cfg.extend, 0)
    if cfg.extend and not cfg.resume:
        raise FlagError(f"--extend {cfg.extend}: needs --resume (it adds epochs to a finished run)")
    at_least("--evolve", cfg.evolve, 1, " generation")
    at_least("--finetune-epochs", cfg.finetune_epochs, 0)
    if cfg.finetune_epochs >= cfg.epochs:
        raise FlagError(f"--finetune-epochs {cfg.finetune_epochs}: must be fewer than --epochs {cfg.epochs}")
    at_least("--max-batches", cfg.max_batches, 0)
    if not 0 <= cfg.seed <= MAX_SEED:
        raise FlagError(f"--seed {cfg.seed}: must lie in [0, {MAX_SEED}]")
    if cfg.cache is not None and cfg.cache not in CACHE_CHOICES:
        raise FlagError(f"--cache {cfg.cache}: choose one of {', '.join(CACHE_CHOICES)} (or --cache alone for ram)")
    for weight in cfg.head_weights or []:
        at_least("--head-weights", weight, 0)
    if cfg.head_weights and not any(cfg.head_weights):
        raise FlagError("--head-weights: at least one weight must be greater than 0")
    _check_freeze(cfg)
    _check_train_files(cfg)


def _check_freeze(cfg: TrainConfig) -> None:
    from utils.train.freeze import parse_freeze_schedule

    parse_freeze_schedule(cfg.freeze_schedule)
    spec = cfg.freeze or []
    if spec and spec != ["backbone"]:
        if not all(item.lstrip("-").isdigit() for item in spec):
            raise FlagError(f"--freeze {' '.join(spec)}: expects N (the first N layers), 'backbone' or layer indices")
        for item in spec:
            at_least("--freeze", int(item), 0)


def _check_train_files(cfg: TrainConfig) -> None:
    """The files train.py will read: weights, model YAML, data YAML, hyp YAML (loaded: it is small)."""
    from utils.common.paths import find_file
    from utils.data.config import DATA_DIR
    from utils.train.config import load_hyp

    if cfg.resume:
        return  # the run's own saved files are used; resume_config checks the path
    existing_weights(cfg.weights)
    if cfg.cfg:
        from models.yaml_config import find_model_yaml

        find_model_yaml(cfg.cfg)
    find_file(cfg.data, DATA_DIR, "--data YAML")
    load_hyp(cfg.hyp, cfg.hyp_override)


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


def check_export_args(args: argparse.Namespace) -> None:
    """export.py: sizes, batch, counts and thresholds in their domain, weights (and --data) present."""
    existing_weights(args.weights)
    if len(args.imgsz) not in (1, 2):
        raise FlagError(f"--imgsz {' '.join(map(str, args.imgsz))}: give one size or height and width")
    image_sizes("--imgsz", args.imgsz)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--opset", args.opset, 7, " (ONNX opsets below 7 cannot express the model)")
    at_least("--calib-images", args.calib_images, 1)
    positive("--workspace", args.workspace, " GB")
    fraction("--conf-thres", args.conf_thres)
    fraction("--iou-thres", args.iou_thres)
    at_least("--max-det", args.max_det, 1)
    existing_path("--data", args.data)


# ---------------------------------------------------------------------------------------------- image size
def check_img_size(imgsz: int, stride: int, floor: int = 0, flag: str = "--imgsz") -> int:
    """``imgsz`` rounded up to a multiple of ``stride`` (at least ``floor``); logs when it changes.

    YOLOv5 v7.0's rule, applied by train.py (floor = 2 strides, for --multi-scale), val.py, detect.py and
    export.py alike: a model whose feature maps must divide evenly can only run at such sizes, and a silently
    different size would give silently different results.
    """
    image_sizes(flag, imgsz)
    new = max(math.ceil(imgsz / stride) * stride, floor)
    if new != imgsz:
        LOGGER.warning("%s %d must be a multiple of the model's largest stride %d%s: using %d", flag, imgsz, stride,
                       f" and at least {floor}" if floor else "", new)
    return new

