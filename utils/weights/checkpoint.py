"""Checkpoints: safe loading of YOLOv5 v7.0 pickles, our own plain-data format, atomic writes, transfer.

* v7.0 ``.pt`` files pickle whole modules (``models.yolo.DetectionModel``, ``models.common.C3`` ...); the PyPI
  ``yolov5`` package pickles the same classes under its package path (``yolov5.models.yolo.DetectionModel``).
  They are loaded with ``torch.load(weights_only=True)`` inside :func:`torch.serialization.safe_globals` holding
  an allow-list that maps those exact dotted names onto our classes, plus the ``torch.nn`` classes the models
  use: a pickle naming any other global is refused with the global named, never loaded with a blanket
  ``weights_only=False``.
* Our format holds only tensors and plain Python data: ``state_dict`` + the resolved model YAML + metadata +
  training-state slots. It loads with the default safe loader and no allow-list.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.common.errors import CheckpointError, MissingFileError, UnreadableFileError, UserError
from utils.common.flags import missing_weights_message

LOGGER = logging.getLogger(__name__)

FORMAT = "yolo-kit-checkpoint/1"

# torch.nn classes that appear inside YOLOv5-family pickles.
_TORCH_NN_CLASSES = (
    nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.Sequential,
    nn.ModuleList, nn.Linear, nn.Dropout, nn.Flatten, nn.GELU, nn.LayerNorm, nn.MultiheadAttention,
    nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Softmax, nn.Mish,
)


# Where YOLOv5 v7.0's model code lives in the pickles users bring: a clone of ultralytics/yolov5 (``models.*``)
# and the PyPI package ``yolov5`` (``yolov5.models.*``, e.g. 7.0.14). Only these exact prefixes are mapped.
LEGACY_MODULE_PREFIXES = ("", "yolov5.")
_HEAD_CLASSES = {"Detect", "Segment", "Classify"}  # in v7.0's models/yolo.py; the other blocks: models/common.py


@dataclass
class LoadedCheckpoint:
    """A model ready for use plus whatever else the file held (names, training state...)."""

    model: nn.Module
    path: Path
    format: str  # "yolo-kit" or "yolov5-v7-pickle"
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def legacy_allow_list() -> list:
    """(class, pickled dotted name) pairs allowed when unpickling YOLOv5 checkpoints.

    Blocks are allowed under the module paths YOLOv5 pickled them with (``models.common`` / ``models.yolo``, and
    the same under the PyPI package's ``yolov5.`` prefix), whatever file of ours defines them now, and under our
    own module path. The unpickler looks each global up by its exact dotted name in this list and never imports
    anything, so a look-alike (``yolov5x.models.yolo.DetectionModel``) or a function reached through a mapped
    module (``yolov5.models.common.os.system``) is not found and the file is refused.
    """
    from models.registry import REGISTRY  # importing the package registers every block
    from models.yolo import ClassificationModel, DetectionModel

    allowed: list = list(_TORCH_NN_CLASSES)
    for cls in REGISTRY.classes():
        if cls.__module__.startswith("torch."):
            continue
        allowed.append((cls, f"{cls.__module__}.{cls.__name__}"))
        legacy_module = "models.yolo" if cls.__name__ in _HEAD_CLASSES else "models.common"
        allowed += [(cls, f"{prefix}{legacy_module}.{cls.__name__}") for prefix in LEGACY_MODULE_PREFIXES]
    for prefix in LEGACY_MODULE_PREFIXES:
        allowed.append((DetectionModel, f"{prefix}models.yolo.DetectionModel"))
        allowed.append((DetectionModel, f"{prefix}models.yolo.Model"))
        allowed.append((ClassificationModel, f"{prefix}models.yolo.ClassificationModel"))
    return allowed


def _allowed_names(allow_list: list) -> set[str]:
    """The dotted names an allow-list accepts: the given name of a (class, name) pair, else the class's own."""
    return {item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}" for item in allow_list}


def _torch_load_safely(path: Path) -> Any:
    allow_list = legacy_allow_list()
    try:
        with torch.serialization.safe_globals(allow_list):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        allowed = _allowed_names(allow_list)
        refused = _refused_globals(path, allowed) or _globals_named(exc, allowed)
        if not refused:  # not a pickle of objects at all (random bytes, another format)
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (the unpickler stopped: "
                                  f"{torch_reason(exc)}); it may be truncated (an interrupted copy or save) or "
                                  "another kind of file") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: it names {', '.join(refused)}, outside the allow-list. Only YOLOv5 models "
            f"(v7.0 classes saved by a clone of ultralytics/yolov5 or by the PyPI 'yolov5' package), torch.nn "
            f"layers and yolo-kit checkpoints load; nothing else is unpickled (weights_only=True)"
        ) from None


# torch's advice around its own reason: load with weights_only=False, or allow-list the class "if you trust it".
# For a file of unknown origin both are the arbitrary-code-execution risk the safe loader exists to avoid.
_TORCH_ADVICE = re.compile(r"weights_only|arbitrary code|trusted source|if you trust|safe_globals|file an issue|"
                           r"documentation of torch\.load|load failed", re.IGNORECASE)


def torch_reason(exc: BaseException, limit: int = 160) -> str:
    """torch's own reason for not loading a file, without the advice torch wraps it in (see ``_TORCH_ADVICE``):
    a message of ours must never suggest ``weights_only=False``."""
    text = str(exc).rsplit("WeightsUnpickler error:", 1)[-1]
    sentences = (part.strip() for part in re.split(r"(?<=[.!?])\s+|\n+", text))
    kept = [sentence for sentence in sentences if sentence and not _TORCH_ADVICE.search(sentence)]
    return kept[0].rstrip(".")[:limit] if kept else type(exc).__name__


def _globals_named(exc: BaseException, allowed: set[str]) -> list[str]:
    """The globals torch's message names as refused (a legacy, non-zip pickle cannot be scanned beforehand)."""
    found = (name.rstrip(".,;") for name in re.findall(r"GLOBAL (\S+)", str(exc)))
    return sorted({name for name in found if name not in allowed})


def _refused_globals(path: Path, allowed: set[str]) -> list[str]:
    """The globals the pickle names that the allow-list lacks (empty if the file cannot be scanned)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) or damaged file: the unpickler's own message is reported instead
        return []
    return sorted(name for name in found if name not in allowed)


# What torch.load raises on a file that is not a checkpoint (empty, text, truncated, another archive).
_NOT_A_CHECKPOINT = (EOFError, KeyError, IndexError, ValueError, RuntimeError, UnicodeDecodeError, zipfile.BadZipFile)


def read_checkpoint(path: str | Path) -> Any:
    """The unpickled contents of a user's ``.pt`` (allow-listed); anything that is not one is a CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; give the .pt file (e.g. "
                              f"{path / 'weights' / 'best.pt'})")
    if not path.is_file():
        raise MissingFileError(missing_weights_message(path))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), probably an interrupted copy or save; use "
                              f"another checkpoint (e.g. last.pt or best.pt of the run)")
    try:
        return _torch_load_safely(path)
    except PermissionError:
        raise UnreadableFileError(f"{path}: not readable (permission denied); fix its permissions") from None
    except UserError:  # already says what is wrong (e.g. a refused class in the pickle)
        raise
    except _NOT_A_CHECKPOINT as exc:
        reason = torch_reason(exc, limit=120)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason}); it may be truncated (an "
                              f"interrupted copy or save) or another kind of file") from exc


def load_checkpoint(path: str | Path, fuse: bool = False) -> LoadedCheckpoint:
    """Load our format or a YOLOv5 v7.0 pickle (a clone's or the PyPI package's) into an eval-mode float model."""
    path = Path(path)
    data = read_checkpoint(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        loaded = _from_our_format(data, path)
    elif isinstance(data, dict) and isinstance(data.get("ema") or data.get("model"), nn.Module):
        loaded = _from_legacy_pickle(data, path)
    else:
        raise CheckpointError(f"{path}: neither a yolo-kit checkpoint nor a YOLOv5 checkpoint with a 'model' entry")
    loaded.model.float().eval()
    if fuse and hasattr(loaded.model, "fuse"):
        loaded.model.fuse()
    return loaded


def checkpoint_quantization(path: str | Path) -> dict[str, Any] | None:
    """The quantization recipe a yolo-kit checkpoint was trained with (QAT), else None; loads nothing else."""
    data = read_checkpoint(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data.get("quantization")
    return None


def _from_legacy_pickle(data: dict, path: Path) -> LoadedCheckpoint:
    model = (data.get("ema") or data["model"]).float()
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    source = (f"yolov5 package {data['yolov5pip_version']} pickle" if data.get("yolov5pip_version")
              else "yolov5 v7.0 pickle")
    meta = {"names": list(names or []), "stride": model.stride.tolist(), "yaml": getattr(model, "yaml", {}),
            "epoch": data.get("epoch"), "date": data.get("date"), "source": source}
    model.names = meta["names"]
    return LoadedCheckpoint(model, path, "yolov5-v7-pickle", meta, data)


def _from_our_format(data: dict, path: Path) -> LoadedCheckpoint:
    from models.yolo import build_model

    if data.get("quantization"):  # quantization-aware training: float model + the same preparation + tensors
        from utils.compress.quant.qat import rebuild_qat_model

        model = rebuild_qat_model(data, str(path))
    else:
        model = build_model(data["yaml"])
        load_state_strict(model, data["state_dict"], path)
    model.names = list(data.get("names") or model.names)
    meta = {k: v for k, v in data.items() if k not in {"state_dict", "train_state"}}
    return LoadedCheckpoint(model, path, "yolo-kit", meta, data)


def load_state_strict(model: nn.Module, state_dict: dict, path: str | Path) -> None:
    """Load every tensor or fail naming the first missing/unexpected/mis-shaped keys and the file."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{path}: checkpoint does not fit this architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {misshaped[:3]})"
        )
    model.load_state_dict(state_dict)


def transfer_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "",
                     exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """Copy tensors whose name and shape match (e.g. into a model with another ``nc``); logs Transferred X/Y."""
    own = model.state_dict()
    matched = {k: v for k, v in state_dict.items()
               if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(matched, strict=False)
    LOGGER.info("Transferred %d/%d items from %s", len(matched), len(own), source or "state_dict")
    return len(matched), len(own)


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__}
    return {name: str(version) for name, version in versions.items()}


def checkpoint_dict(model: nn.Module, train_state: dict | None = None, **meta: Any) -> dict[str, Any]:
    """Our format: only tensors and plain data (safe to load with ``weights_only=True``)."""
    from models.registry import task_of
    from utils.common.torch_utils import de_parallel

    bare = de_parallel(model)
    yaml_cfg = {k: v for k, v in bare.yaml.items() if k != "yaml_file"}
    return {
        "format": FORMAT,
        "yaml": yaml_cfg,
        # Contiguous copies: a channels-last training model must not leave its strides in the file.
        "state_dict": {k: v.detach().clone(memory_format=torch.contiguous_format)
                       for k, v in bare.state_dict().items()},
        "names": list(getattr(bare, "names", [])),
        "stride": bare.stride.tolist() if getattr(bare, "stride", None) is not None else None,
        "task": meta.pop("task", task_of(bare)),
        "versions": library_versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "train_state": train_state,
        **({"quantization": bare.quantization} if getattr(bare, "quantization", None) else {}),
        **meta,
    }


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write to a temp file in the same folder, then ``os.replace``: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.pt.*.tmp`` files :func:`save_atomic` leaves when a process is killed mid-save.

    Call where no save can be in flight (a run's setup, before training or resuming in ``folder``).
    """
    stale = sorted(Path(folder).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        LOGGER.info("removed %d incomplete checkpoint file(s) left by an interrupted save in %s: %s", len(stale),
                    folder, ", ".join(p.name for p in stale))
    return stale


def save_checkpoint(model: nn.Module, path: str | Path, train_state: dict | None = None, **meta: Any) -> Path:
    return save_atomic(checkpoint_dict(model, train_state, **meta), path)


def transfer_from_detector(cls_model: nn.Module, det_checkpoint_path: str | Path) -> tuple[int, int]:
    """Copy a detector's backbone into a classifier (same layer indices, matching shapes).

    The ``-cls`` YAMLs keep the detection backbone's rows, so ``model.0`` .. ``model.8`` line up with a v7.0
    detector's. Logs (and returns) ``Transferred X/Y items`` like YOLOv5.
    """
    source = load_checkpoint(det_checkpoint_path).model
    n_backbone = len(getattr(source, "yaml", {}).get("backbone", [])) or len(source.model)
    shared = {k: v for k, v in source.state_dict().items() if _layer_of(k) is not None and _layer_of(k) < n_backbone}
    transferred, total = transfer_weights(cls_model, shared, str(det_checkpoint_path))
    return transferred, total


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None
