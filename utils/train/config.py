"""Training configuration: one dataclass generates the yolov5-compatible argparse parser, and hyperparameter
YAMLs are validated against a known key set (an unknown key is an error naming the key and the file)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from utils.common.cli import UserArgumentParser
from utils.common.errors import FlagError, UserError
from utils.common.flags import IMGSZ_HELP, at_least, existing_weights, fraction, image_sizes, positive
from utils.common.paths import find_file
from utils.common.user_files import load_user_yaml

if TYPE_CHECKING:
    from utils.tasks.base import ModelSource, TaskOptions

ROOT = Path(__file__).resolve().parents[2]
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
    data: str = _flag(str(DEFAULT_DATA), "data-set YAML (detection: a train split without a single box is refused "
                                         "before training; a val split without labels only warns)")
    hyp: str = _flag(str(DEFAULT_HYP), "hyperparameter YAML")
    hyp_override: list[str] = _flag(None, "override hyp values: --hyp-override lr0=0.005 mosaic=0", nargs="*")
    epochs: int = _flag(100, "total training epochs")
    batch_size: int = _flag(16, "total batch size for all devices, -1 for AutoBatch", aliases=("--batch",))
    imgsz: int = _flag(640, f"train/val image size ({IMGSZ_HELP})", aliases=("--img", "--img-size"))
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
    exist_ok: bool = _flag(False, "write into an existing project/name (no name2, ...); an earlier run there moves "
                                  "whole to project/name/previous (previous2, ...)")
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
    sparse_remain: float = _flag(0.0, "with --sparse: penalise only the channels that prune_slim.py --remain-ratio R "
                                      "would cut from the model now (re-ranked every epoch), so the channels it "
                                      "keeps train freely (e.g. 0.5; 0 = every prunable gamma)")
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

    def checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint of the run records of these flags (best.pt holds no config): how sparse it was
        trained, so prune_slim.py can warn about a model that was not (0.0)."""
        return {"sparse": float(self.sparse)}

    def model_source(self) -> ModelSource:
        """Where the training model comes from (--cfg, --weights and the size overrides)."""
        from utils.tasks.base import ModelSource

        return ModelSource(cfg=self.cfg, weights=self.weights, nc=self.nc, depth_multiple=self.depth_multiple,
                           width_multiple=self.width_multiple, head_balance=self.head_balance)

    def task_options(self) -> TaskOptions:
        """What the task needs of these flags (the rest belongs to the training loop and its plug-ins)."""
        from utils.tasks.base import TaskOptions

        return TaskOptions(imgsz=self.imgsz, batch_size=self.batch_size, workers=self.workers, seed=self.seed,
                           single_cls=self.single_cls, cache=self.cache, rect=self.rect,
                           image_weights=self.image_weights, multi_scale=self.multi_scale,
                           autoanchor=not self.noautoanchor, plots=not self.noplots, save_dir=self.save_dir,
                           heads_mode=self.heads_mode,
                           head_weights=tuple(self.head_weights) if self.head_weights else None,
                           finetune_epochs=self.finetune_epochs, epochs=self.epochs,
                           distill_temperature=self.distill_temperature)


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


CACHE_CHOICES = ("ram", "ram-jpeg", "disk")
MAX_SEED = 2**32 - 1  # NumPy's seed range


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
    from utils.data.config import DATA_DIR

    if cfg.resume:
        return  # the run's own saved files are used; resume_config checks the path
    existing_weights(cfg.weights)
    if cfg.cfg:
        from models.yaml_config import find_model_yaml

        find_model_yaml(cfg.cfg)
    find_file(cfg.data, DATA_DIR, "--data YAML")
    load_hyp(cfg.hyp, cfg.hyp_override)
