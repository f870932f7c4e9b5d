"""Shared export pieces: the sidecar metadata every artifact carries, model preparation, Focus -> strided conv.

Every exported artifact gets a JSON sidecar so an inference backend can be built from the artifact alone
(class names, stride, input size, batch and precision) and so a TensorRT engine can be refused when it is
run on another GPU or TensorRT version than the one it was built for. File artifacts (``x.onnx``) get
``x.onnx.json`` beside them (the full name is kept so ``x.onnx`` and ``x.engine`` never share a sidecar);
folder artifacts (OpenVINO, NCNN) get ``metadata.json`` inside.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.common.errors import UserError

LOGGER = logging.getLogger(__name__)

TOOLKIT_NAME = "yolo-kit"
TOOLKIT_VERSION = "0.1.0"
METADATA_SCHEMA = 1
FOLDER_METADATA_NAME = "metadata.json"
REQUIRED_KEYS = ("task", "stride", "imgsz", "batch", "precision", "format")


class MetadataError(UserError, RuntimeError):
    """A sidecar that is missing, unreadable or inconsistent with its artifact."""


@dataclass
class ExportMetadata:
    """What a backend needs to run an artifact without the original checkpoint.

    ``names`` is set for detectors, ``heads`` (list of {name, names}) for multi-head classifiers.
    ``dynamic`` lists the dynamic input axes ("batch", "height", "width"); ``profile`` holds TensorRT
    min/opt/max shapes. ``engine`` holds the TensorRT version, GPU name and compute capability.
    """

    format: str
    task: str
    stride: int
    imgsz: list[int]
    batch: int
    precision: str = "fp32"
    names: list[str] = field(default_factory=list)
    heads: list[dict[str, Any]] | None = None
    dynamic: list[str] = field(default_factory=list)
    profile: dict[str, list[int]] | None = None
    opset: int | None = None
    nms: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    toolkit: str = f"{TOOLKIT_NAME} {TOOLKIT_VERSION}"
    torch: str = torch.__version__
    created: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    schema: int = METADATA_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metadata_path(artifact: str | Path) -> Path:
    """``metadata.json`` inside a folder artifact, ``<artifact>.json`` beside a file artifact."""
    artifact = Path(artifact)
    if artifact.is_dir() or artifact.suffix == "":
        return artifact / FOLDER_METADATA_NAME
    return artifact.with_name(artifact.name + ".json")


def write_metadata(artifact: str | Path, metadata: ExportMetadata | dict[str, Any]) -> Path:
    """Write the sidecar of ``artifact`` (validated first, so a bad sidecar is never written)."""
    data = metadata.to_dict() if isinstance(metadata, ExportMetadata) else dict(metadata)
    check_metadata(data, source=str(artifact))
    path = metadata_path(artifact)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_metadata(artifact: str | Path) -> dict[str, Any]:
    """The checked sidecar of ``artifact``; raises :class:`MetadataError` naming the file when it is absent."""
    path = metadata_path(artifact)
    if not path.is_file():
        raise MetadataError(f"{artifact}: no metadata sidecar at {path}; re-export with export.py (or to_trt.sh "
                            "for engines) so names, stride and image size are known")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{path}: not valid JSON ({exc})") from exc
    check_metadata(data, source=str(path))
    return data


def check_metadata(data: dict[str, Any], source: str = "metadata") -> None:
    """Raise :class:`MetadataError` listing every problem (missing keys, wrong types, no class names)."""
    problems = [f"missing '{key}'" for key in REQUIRED_KEYS if key not in data]
    imgsz = data.get("imgsz")
    if imgsz is not None and not (isinstance(imgsz, list) and len(imgsz) == 2
                                  and all(isinstance(v, int) for v in imgsz)):
        problems.append(f"'imgsz' must be [height, width] ints, got {imgsz!r}")
    if "batch" in data and not (isinstance(data["batch"], int) and data["batch"] >= 1):
        problems.append(f"'batch' must be a positive int, got {data['batch']!r}")
    if data.get("task") == "detect" and not data.get("names"):
        problems.append("a detector needs 'names'")
    if data.get("task") == "classify" and not (data.get("names") or data.get("heads")):
        problems.append("a classifier needs 'names' or 'heads'")
    unknown_axes = set(data.get("dynamic") or []) - {"batch", "height", "width"}
    if unknown_axes:
        problems.append(f"unknown dynamic axes {sorted(unknown_axes)}")
    if problems:
        raise MetadataError(f"{source}: invalid export metadata: {'; '.join(problems)}")


def model_heads(model: nn.Module) -> list[dict[str, Any]] | None:
    """Per-head names of a multi-head classifier (``model.heads``), else None."""
    heads = getattr(model, "heads", None)
    if not heads:
        return None
    return [dict(h) if isinstance(h, dict) else {"name": str(h)} for h in heads]


def model_stride(model: nn.Module) -> int:
    stride = getattr(model, "stride", None)
    return int(torch.as_tensor(stride).max()) if stride is not None else 32


def prepare_for_export(model: nn.Module, fuse: bool = True) -> nn.Module:
    """A float, eval-mode, fused copy whose detection head returns only the decoded tensor.

    A copy, so the caller's model (and the class-level ``Detect.export_decoded_only``) are left untouched;
    the flag is set on the head instance only. Focus stems become their equivalent strided conv (exact, see
    :func:`focus_to_conv`) so every backend gets one plain convolution graph.
    """
    prepared = copy.deepcopy(model).float().eval()
    with torch.no_grad():  # fusing under autograd would leave non-leaf (grad-tracking) conv weights
        if fuse and hasattr(prepared, "fuse"):
            prepared.fuse()
        focus_to_conv(prepared)
    for module in prepared.modules():
        if hasattr(module, "export_decoded_only"):
            module.export_decoded_only = True
        if hasattr(module, "inplace"):
            module.inplace = False
    for parameter in prepared.parameters():
        parameter.requires_grad_(False)
    return prepared


def focus_to_conv(model: nn.Module) -> nn.Module:
    """Replace every Focus block (space-to-depth + Conv) by one exactly equivalent strided Conv, in place.

    Focus computes ``conv_k,s(cat(x[::2,::2], x[1::2,::2], x[::2,1::2], x[1::2,1::2]))``. The same output is a
    conv on ``x`` with kernel 2k, stride 2s and padding 2p whose weight puts the channel block (dy, dx) of the
    original kernel tap (u, v) at tap (2u+dy, 2v+dx). Backends without strided slicing (NCNN) or where
    slicing is slow get a single convolution instead. Returns ``model`` for chaining.
    """
    from models.common import Focus

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Focus):
                setattr(parent, child_name, _focus_as_conv(child))
    return model


# space_to_depth channel-block order -> (row offset dy, column offset dx)
_FOCUS_BLOCK_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))


def _focus_as_conv(focus: nn.Module) -> nn.Module:
    from models.common import Conv

    inner = focus.conv.conv
    if inner.groups != 1 or inner.dilation != (1, 1) or not isinstance(inner.padding, tuple):
        raise ValueError(f"focus_to_conv supports groups=1, dilation=1, numeric padding; got {inner}")
    c2, c4, kh, kw = inner.weight.shape
    c1 = c4 // 4
    weight = inner.weight.new_zeros(c2, c1, 2 * kh, 2 * kw)
    for block, (dy, dx) in enumerate(_FOCUS_BLOCK_OFFSETS):
        weight[:, :, dy::2, dx::2] = inner.weight[:, block * c1:(block + 1) * c1]
    strided = nn.Conv2d(c1, c2, (2 * kh, 2 * kw), tuple(2 * s for s in inner.stride),
                        tuple(2 * p for p in inner.padding), bias=inner.bias is not None)
    strided.weight.data.copy_(weight)
    if inner.bias is not None:
        strided.bias.data.copy_(inner.bias.data)
    replacement = Conv(c1, c2, 1, 1)
    replacement.conv, replacement.bn, replacement.act = strided, focus.conv.bn, focus.conv.act
    for attr in ("i", "f", "type", "np"):
        if hasattr(focus, attr):
            setattr(replacement, attr, getattr(focus, attr))
    return replacement.train(focus.training)


def sample_images(folder: str | Path, imgsz: tuple[int, int], limit: int = 8) -> torch.Tensor | None:
    """Up to ``limit`` images of ``folder`` letterboxed to ``imgsz`` (RGB BCHW float in [0, 1]); None when it
    holds none."""
    files = folder_images(folder)[:limit]
    if not files:
        return None
    return torch.stack([letterbox_tensor(f, imgsz) for f in files])


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def folder_images(folder: str | Path) -> list[Path]:
    """Sorted image files under ``folder`` (or ``folder`` itself when it is one image); [] when there are none.
    The images of a data YAML's split come from the model's task (:meth:`utils.tasks.base.Task.calibration_files`),
    which reads the YAML as its trainer does."""
    folder = Path(folder)
    if folder.is_file():
        return [folder] if folder.suffix.lower() in IMAGE_SUFFIXES else []
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


ImageTransform = Callable[[str | Path, tuple[int, int]], torch.Tensor]  # (image file, (h, w)) -> RGB CHW in [0, 1]


def center_crop_tensor(file: str | Path, imgsz: tuple[int, int]) -> torch.Tensor:
    """One image as the classification val loader sees it (central square resized to ``imgsz``), RGB CHW [0, 1]."""
    from utils.data.classify import center_crop, read_image, to_chw_tensor

    return to_chw_tensor(center_crop(read_image(str(file)), int(imgsz[0]))).float() / 255


def letterbox_tensor(file: str | Path, imgsz: tuple[int, int]) -> torch.Tensor:
    """One image letterboxed to exactly ``imgsz`` (h, w) with grey padding like the val loader, RGB CHW [0, 1]."""
    import cv2
    import numpy as np

    from utils.data.augment import letterbox

    image = cv2.imread(str(file))
    if image is None:
        raise FileNotFoundError(f"cannot read image {file}")
    padded, _, _ = letterbox(image, tuple(imgsz), auto=False, scaleup=True)
    chw = np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1))
    return torch.from_numpy(chw).float() / 255


def embed_metadata(graph, metadata: ExportMetadata) -> None:
    """Also keep stride/names in the ONNX file itself, for tools that only see the .onnx."""
    del graph.metadata_props[:]
    for key in ("task", "stride", "names", "imgsz", "batch", "precision"):
        prop = graph.metadata_props.add()
        prop.key, prop.value = key, str(getattr(metadata, key))
