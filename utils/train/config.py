"""Training configuration: one dataclass generates the yolov5-compatible argparse parser, and hyperparameter
YAMLs are validated against a known key set (an unknown key is an error naming the key and the file)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.common.cli import UserArgumentParser
from utils.common.errors import UserError
from utils.common.paths import find_file
from utils.common.user_files import load_user_yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "neu-det-sample.yaml"
DEFAULT_HYP = ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"

# Every hyperparameter a hyp YAML may set, with its default (YOLOv5 v7.0 scratch-low values).
HYP_DEFAULTS: dict[str, Any] = {
    "lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005,
    "warmup_epochs": 3.0, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1,
    "box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0, "obj_pw": 1.0, "iou_t": 0.20, "anchor_t": 4.0,
    "anchors": 3, "fl_gamma": 0.0, "iou_type": "ciou", "vfl": False, "label_smoothing": 0.0,
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0,
    "sam_rho": 0.05, "grad_clip": 10.0, "nbs": 64,
    # classification
    "crop_scale_min": 0.08, "randaugment": False, "dropout": 0.0,
}


# Domains of the numeric hyperparameters as interval text; a value outside would crash later (nbs 0 divides by
# zero) or silently train something else (a probability of 1.5).
HYP_DOMAINS: dict[str, str] = {
    **dict.fromkeys(("mosaic", "mixup", "copy_paste", "fliplr", "flipud", "iou_t", "hsv_h", "hsv_s", "hsv_v",
                     "translate", "momentum", "warmup_momentum"), "[0, 1]"),
    **dict.fromkeys(("label_smoothing", "dropout"), "[0, 1)"),
    **dict.fromkeys(("lr0", "lrf", "anchor_t", "grad_clip", "cls_pw", "obj_pw"), "(0, inf)"),
    **dict.fromkeys(("weight_decay", "warmup_epochs", "warmup_bias_lr", "box", "cls", "obj", "fl_gamma", "scale",
                     "perspective", "sam_rho", "crop_scale_min"), "[0, inf)"),
    "nbs": "[1, inf)", "anchors": "[1, inf)",
}


class HypError(UserError, ValueError):
    """A hyp YAML with an unknown key or a bad value."""


def load_hyp(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults <- hyp YAML <- ``key=value`` overrides; unknown keys raise :class:`HypError`."""
    hyp = dict(HYP_DEFAULTS)
    if path:
        path = find_file(path, ROOT / "data", "hyp file")  # bare names: the shipped ones in data/hyps/
        loaded = load_user_yaml(path, "hyp file", HypError) or {}
        if not isinstance(loaded, dict):
            raise HypError(f"{path}: expected a mapping of hyperparameters (lr0: 0.01, ...), got a "
                           f"{type(loaded).__name__}")
        _update_hyp(hyp, loaded, str(path))
    for item in overrides or []:
        key, _, value = item.partition("=")
        if not _:
            raise HypError(f"--hyp-override '{item}': expected key=value")
        _update_hyp(hyp, {key.strip(): _override_value(value, item)}, "--hyp-override")
    return hyp


def _override_value(value: str, item: str) -> Any:
    """The YAML value of one ``--hyp-override key=value`` (``0.01``, ``true``, ``ciou``)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise HypError(f"--hyp-override '{item}': the value is not a YAML scalar") from None


def _update_hyp(hyp: dict, new: dict, source: str) -> None:
    for key, value in new.items():
        if key not in HYP_DEFAULTS:
            raise HypError(f"{source}: unknown hyperparameter '{key}'; known: {', '.join(sorted(HYP_DEFAULTS))}")
        default = HYP_DEFAULTS[key]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
            raise HypError(f"{source}: hyperparameter '{key}' must be a number, got {value!r}")
        _check_hyp_domain(key, value, source)
        hyp[key] = value


def _check_hyp_domain(key: str, value: Any, source: str) -> None:
    if key not in HYP_DOMAINS or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    domain = HYP_DOMAINS[key]
    low, high = (float(v) for v in domain[1:-1].split(","))
    above = value >= low if domain[0] == "[" else value > low
    below = value <= high if domain[-1] == "]" else value < high
    if not (above and below):
        raise HypError(f"{source}: hyperparameter '{key}' is {value!r}; it must lie in {domain}")


def _flag(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """All train.py options. Field names are yolov5's flag names with '-' -> '_'."""

    weights: str = _flag("", "initial weights: .pt checkpoint, or torchvision .pth for backbones ('' = scratch)")
    cfg: str = _flag("", "model YAML (models/yolov5s.yaml or a bare name); '' = from --weights")
    data: str = _flag(str(DEFAULT_DATA), "data-set YAML")
    hyp: str = _flag(str(DEFAULT_HYP), "hyperparameter YAML")
    hyp_override: list[str] = _flag(None, "override hyp values: --hyp-override lr0=0.005 mosaic=0", nargs="*")
    epochs: int = _flag(100, "total training epochs")
    batch_size: int = _flag(16, "total batch size for all devices, -1 for AutoBatch", aliases=("--batch",))
    imgsz: int = _flag(640, "train/val image size (pixels)", aliases=("--img", "--img-size"))
    nc: int = _flag(None, "override the model YAML's number of classes (default: from the data YAML)")
    depth_multiple: float = _flag(None, "override the model YAML's depth_multiple")
    width_multiple: float = _flag(None, "override the model YAML's width_multiple")
    rect: bool = _flag(False, "rectangular training batches")
    resume: str = _flag(None, "resume the most recent run, or the run of this last.pt", nargs="?", const=True)
    extend: int = _flag(0, "with --resume: continue a finished run for this many extra epochs")
    nosave: bool = _flag(False, "only save the final checkpoint")
    noval: bool = _flag(False, "only validate after the final epoch")
    noautoanchor: bool = _flag(False, "disable the autoanchor check")
    noplots: bool = _flag(False, "save no plot files")
    evolve: int = _flag(None, "evolve hyperparameters for this many generations", nargs="?", const=300)
    cache: str = _flag(None, "cache images: ram, ram-jpeg or disk", nargs="?", const="ram")
    image_weights: bool = _flag(False, "sample training images weighted by their classes' mAP")
    device: str = _flag("", "cuda device, i.e. 0 or 0,1,2,3 or cpu")
    multi_scale: bool = _flag(False, "vary img-size +/- 50%%")
    single_cls: bool = _flag(False, "train multi-class data as single-class")
    optimizer: str = _flag("SGD", "optimizer", choices=["SGD", "Adam", "AdamW", "SAM"])
    sync_bn: bool = _flag(False, "SyncBatchNorm under DDP on CUDA")
    workers: int = _flag(2, "max dataloader workers (per rank under DDP)")
    project: str = _flag(str(ROOT / "runs" / "train"), "save to project/name")
    name: str = _flag("exp", "save to project/name")
    exist_ok: bool = _flag(False, "existing project/name ok, do not increment")
    cos_lr: bool = _flag(False, "cosine learning-rate schedule")
    label_smoothing: float = _flag(0.0, "label smoothing epsilon")
    patience: int = _flag(100, "early stop after this many epochs without improvement")
    freeze: list[str] = _flag(None, "freeze: N (first N layers), 'backbone', or layer indices", nargs="+")
    freeze_schedule: str = _flag(None, "alternate:K: per K-epoch cycle, 1 epoch backbone-only then K-1 head-only")
    save_period: int = _flag(-1, "save a checkpoint every N epochs (disabled if < 1)")
    seed: int = _flag(0, "global training seed")
    deterministic: bool = _flag(False, "force deterministic algorithms (for exact resume checks)")
    compile: bool = _flag(False, "torch.compile the training forward/backward (~1.3x per CPU step; the first run "
                                 "compiles for 1-2 min, later runs reuse the on-disk cache)")
    precision: str = _flag("auto", "training precision; auto: bfloat16 autocast on CPUs with AVX512-BF16 or AMX, "
                                   "float16 AMP on CUDA, float32 elsewhere (weights, optimizer, EMA and validation "
                                   "stay float32)", choices=["auto", "bf16", "fp16", "fp32"])
    bf16: bool = _flag(False, "--precision bf16: bfloat16 autocast also where it is not the default (a CPU that "
                              "emulates it, slower; on CUDA instead of float16 AMP)")
    fp32: bool = _flag(False, "--precision fp32: train in float32, no mixed precision", aliases=("--no-amp",))
    qat: bool = _flag(False, "quantization-aware training (torchao): fine-tune --weights with INT8 fake quantization, "
                             "in float32 (detectors and classifiers); export the result with export.py --include onnx "
                             "--int8 (docs/deploy.md)")
    heads_mode: str = _flag("joint", "multi-head classifiers: joint or sequential", choices=["joint", "sequential"])
    head_weights: list[float] = _flag(None, "multi-head loss weights, one per head", nargs="+", type=float)
    head_balance: str = _flag("none", "dynamic multi-head loss balancing", choices=["none", "uncertainty"])
    finetune_epochs: int = _flag(0, "sequential mode: final joint fine-tune epochs at lr x 0.1")
    sparse: float = _flag(0.0, "Network Slimming sparse training: add S*sign(gamma) to the gradients of the prunable "
                               "BatchNorm weights each optimizer step (e.g. 1e-4; 0 = off), before prune_slim.py")
    sparse_decay: str = _flag("none", "lower --sparse over training to 10%% of S (linear or cosine in the epoch)",
                              choices=["none", "linear", "cos"])
    teacher: str = _flag("", "knowledge distillation from this trained model (.pt, e.g. the unpruned parent of a "
                             "pruned student): same classes, and for detectors the same strides and anchors")
    distill_weight: float = _flag(1.0, "weight of the --teacher distillation loss (1 = the task loss's scale)")
    distill_temperature: float = _flag(4.0, "softmax temperature of --teacher distillation for classifiers")
    max_batches: int = _flag(0, "debug: stop each epoch after this many batches (0 = all)")
    local_rank: int = _flag(-1, "set by torchrun; do not modify")

    @property
    def save_dir(self) -> Path:
        return Path(self.project) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser(config_cls: type = TrainConfig, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (plus yolov5's aliases)."""
    parser = UserArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        aliases = meta.pop("aliases", ())
        flags = [f"--{f.name.replace('_', '-')}", *aliases]
        if f.name.replace("_", "-") != f.name:
            flags.append(f"--{f.name}")
        if f.type in ("bool", bool):
            parser.add_argument(*flags, action="store_true", dest=f.name, **meta)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0])
        if "type" not in meta and kind is not None:
            meta["type"] = kind
        parser.add_argument(*flags, default=f.default, dest=f.name, **meta)
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser(TrainConfig, "Train a YOLOv5-family detector or classifier").parse_args(argv)
    return TrainConfig(**vars(args))


def add_inference_args(parser: argparse.ArgumentParser, run_kind: str) -> None:
    """Flags val.py and detect.py share: weights, size, device, precision, label files, output folder."""
    parser.add_argument("--weights", required=True, help="model weights (.pt, .torchscript, .onnx, folder, .engine)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA)")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (flips and scales; .pt only)")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--project", default=str(ROOT / "runs" / run_kind), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
