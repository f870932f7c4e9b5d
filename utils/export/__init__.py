"""Export pipeline: one checkpoint -> the artifacts of the registered formats (TorchScript / ONNX / OpenVINO /
NCNN / TensorRT) + sidecars.

``export.py`` is a thin CLI over :func:`export_model`. Each format is described once, in its own module, by an
:class:`~utils.export.spec.ExportFormat` (naming, what it supports, exporter, backend) held by
:mod:`utils.export.registry`; this runner reads the descriptions and names no format. Errors are raised,
never logged-and-skipped, so a failed export gives a non-zero exit code (unlike YOLOv5, which carries on).
An artifact (or sidecar) that already exists is not replaced unless ``exist_ok`` is set: the check runs
before anything is loaded or written, so a refused export leaves every file as it was.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import task_of
from utils.common.errors import UserError
from utils.common.paths import check_writable_folder, restore_earlier_run, set_aside_earlier_files
from utils.export.backend import Backend
from utils.export.common import (
    ExportMetadata,
    MetadataError,
    focus_to_conv,
    metadata_path,
    model_stride,
    prepare_for_export,
    read_metadata,
    write_metadata,
)
from utils.export.job import ExportJob, export_task, sensitive_layers
from utils.export.onnx import DEFAULT_OPSET, NMSSettings
from utils.export.registry import REGISTRY, load_backend, register_format, registered_format, unregister_format
from utils.export.spec import ALL_AXES, ExportFormat, Requirement

LOGGER = logging.getLogger(__name__)

__all__ = [
    "REGISTRY",
    "Backend",
    "ExportFormat",
    "ExportJob",
    "ExportMetadata",
    "ExportOptionError",
    "ExportOptions",
    "MetadataError",
    "NMSSettings",
    "Requirement",
    "artifact_paths",
    "export_model",
    "focus_to_conv",
    "load_backend",
    "metadata_path",
    "parse_shape",
    "planned_outputs",
    "prepare_for_export",
    "read_metadata",
    "register_format",
    "registered_format",
    "sensitive_layers",
    "unregister_format",
    "write_metadata",
]


class ExportOptionError(UserError, ValueError):
    """Export flags that cannot be satisfied (or would overwrite the user's files); the message says what to do."""


@dataclass
class ExportOptions:
    """Everything ``export.py`` accepts (YOLOv5 v7.0 flag names)."""

    weights: Path
    include: tuple[str, ...] = ("torchscript",)
    imgsz: tuple[int, int] = (640, 640)
    batch_size: int = 1
    dynamic: bool = False  # YOLOv5 v7.0's --dynamic: batch, height and width
    dynamic_batch: bool = False  # batch only, height and width fixed at imgsz
    simplify: bool = False
    opset: int = DEFAULT_OPSET
    half: bool = False
    int8: bool = False
    data: Path | None = None
    calib_images: int = 300
    int8_keep: int = 0
    qat_placement: str = "tensorrt"  # QAT checkpoints: "tensorrt" (the trained QDQ graph) or "cpu" (re-quantized)
    workspace: float = 4.0
    nms: bool = False
    nms_settings: NMSSettings = field(default_factory=NMSSettings)
    device: str = "cpu"
    min_shape: tuple[int, ...] | None = None
    opt_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    output_dir: Path | None = None
    exist_ok: bool = False  # replace artifacts that already exist

    def dynamic_axes(self) -> tuple[str, ...]:
        """The free input axes asked for; each format keeps those it supports (``ExportFormat.dynamic``: ONNX and
        OpenVINO all, TorchScript only the batch, NCNN none)."""
        if self.dynamic:
            return ALL_AXES
        return ("batch",) if self.dynamic_batch else ()


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x640x640"`` (or comma separated) -> (1, 3, 640, 640)."""
    parts = text.replace(",", "x").split("x")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"shape must look like 1x3x640x640, got {text!r}")
    return tuple(int(p) for p in parts)


def artifact_paths(weights: Path, output_dir: Path | None = None) -> dict[str, Path]:
    """Where each registered format (and INT8 copy, ``onnx_int8``) is written: beside the weights (YOLOv5
    naming) unless ``output_dir`` is given."""
    folder = Path(output_dir) if output_dir else Path(weights).parent
    paths: dict[str, Path] = {}
    for fmt in REGISTRY.exportable():
        paths.update(fmt.artifacts(folder, Path(weights).stem))
    return paths


def planned_outputs(options: ExportOptions, trained_qdq: bool = False) -> list[Path]:
    """Every file or folder :func:`export_model` will write for ``options``: artifacts and their JSON sidecars.

    ``trained_qdq``: the weights are a QAT checkpoint exported as its trained QDQ graph (``--qat-placement
    tensorrt``), which writes the INT8 ONNX and builds the other formats from it.
    """
    paths = artifact_paths(Path(options.weights), options.output_dir)
    outputs = []
    for fmt in REGISTRY.plan(options.include, trained_qdq):
        for key in fmt.outputs(fmt.name in options.include, options.int8, trained_qdq):
            outputs.append(paths[key])
            if not fmt.folder:  # folders carry their sidecar inside
                outputs.append(metadata_path(paths[key]))
    return outputs


def check_overwrite(options: ExportOptions, trained_qdq: bool = False) -> None:
    """Refuse (before anything is written) when an artifact or sidecar already exists, unless ``exist_ok``."""
    existing = [str(path) for path in planned_outputs(options, trained_qdq) if path.exists()]
    if existing and not options.exist_ok:
        raise ExportOptionError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass "
                                f"--exist-ok to set {'it' if len(existing) == 1 else 'them'} aside (into previous/), "
                                "or --output-dir DIR to export elsewhere")


def check_output_folder(options: ExportOptions) -> Path:
    """The folder the artifacts go to (--output-dir, else beside --weights) exists or can be created, and is
    writable: refused before the checkpoint is read, not after an export that could not be saved."""
    if options.output_dir:
        return check_writable_folder(options.output_dir, "--output-dir", options.output_dir)
    return check_writable_folder(Path(options.weights).parent, "--weights", options.weights,
                                 "artifacts are written beside the weights: pass --output-dir DIR, a folder you can "
                                 "write to")


def _listed(names: list[str]) -> str:
    """``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_options(options: ExportOptions, device: torch.device) -> None:
    """Fail before any work when the flags cannot be satisfied, with a message saying what to change."""
    known = REGISTRY.exportable_names()
    unknown = [f for f in options.include if f not in known]
    if unknown:
        raise ExportOptionError(f"--include {unknown}: unknown format; choose from {', '.join(known)}")
    if not Path(options.weights).is_file():
        raise ExportOptionError(f"weights file {options.weights} not found; pass --weights PATH to a .pt checkpoint")
    if options.dynamic and options.dynamic_batch:
        raise ExportOptionError("--dynamic (batch, height and width, as YOLOv5 v7.0) and --dynamic-batch (batch "
                                "only) exclude each other: pass one")
    included = [REGISTRY.get(name) for name in options.include]
    if options.half:
        _check_half(included, device)
    if options.int8 and options.nms:
        raise ExportOptionError("--int8 with --nms is not supported: quantize the plain graph and run NMS outside")
    if options.int8_keep < 0 or (options.int8_keep and not options.int8):
        raise ExportOptionError("--int8-keep N takes N >= 0 and goes with --int8")
    check_output_folder(options)  # before the checkpoint is read: refusing costs nothing
    check_overwrite(options)
    qat = _qat_recipe(options.weights) is not None
    if qat:
        _check_qat_export(options, included)
    elif options.int8 and not options.data:
        raise ExportOptionError("--int8 needs --data (a data YAML whose train images calibrate the quantization)")
    elif options.int8 and any(fmt.int8 is None for fmt in included):
        int8 = [fmt.name for fmt in REGISTRY.exportable() if fmt.int8]
        raise ExportOptionError(f"--int8 applies to {_listed(int8)} only")
    elif options.qat_placement != "tensorrt":
        LOGGER.warning("--qat-placement %s applies to quantization-aware-trained checkpoints only; %s is not one, "
                       "so it changes nothing", options.qat_placement, options.weights)
    trained_qdq = qat and options.qat_placement == "tensorrt"
    for fmt in REGISTRY.plan(options.include, trained_qdq):
        fmt.check_export(options, trained_qdq)


def _check_half(included: list[ExportFormat], device: torch.device) -> None:
    """--half of a format whose FP16 graph needs a CUDA device (TorchScript, ONNX), on another device."""
    refused = [fmt.title for fmt in included if fmt.half_devices is not None and device.type not in fmt.half_devices]
    if refused:
        on_cpu = [fmt.title for fmt in REGISTRY.exportable() if fmt.half_devices is None and "cpu" in fmt.devices]
        raise ExportOptionError(f"--half exports FP16 {'/'.join(refused)} and needs a CUDA device (--device 0); on "
                                f"CPU export FP32 ({'/'.join(on_cpu)} --half only store FP16 weights and work on CPU)")


def _qat_recipe(weights: Path) -> dict[str, Any] | None:
    from utils.weights.checkpoint import checkpoint_quantization

    return checkpoint_quantization(weights)


def _check_qat_export(options: ExportOptions, included: list[ExportFormat]) -> None:
    """A quantization-aware-trained checkpoint exports its INT8 graph (QDQ ONNX, OpenVINO IR, TensorRT engine)."""
    qat = f"{options.weights} is a quantization-aware-trained checkpoint"
    other = sorted(fmt.name for fmt in included if fmt.export_qat is None)
    if other:
        takers = [fmt.name for fmt in REGISTRY.exportable() if fmt.export_qat is not None]
        raise ExportOptionError(f"{qat}: it exports to {_listed(takers)} (INT8), not {', '.join(other)}")
    if options.nms or options.half:
        raise ExportOptionError(f"{qat}: --nms and --half do not apply (its INT8 graph is fixed by training)")
    if options.qat_placement == "cpu" and not options.data:
        raise ExportOptionError("--qat-placement cpu re-quantizes the QAT-trained weights with each CPU runtime's "
                                "calibrated quantizer: pass --data (a data YAML whose train images calibrate it)")
    off_cpu = [fmt.name for fmt in included if "cpu" not in fmt.devices]
    if options.qat_placement == "cpu" and off_cpu:
        cpu = [fmt.name for fmt in REGISTRY.exportable() if fmt.int8 and fmt.export_qat and "cpu" in fmt.devices]
        raise ExportOptionError(f"{qat}: --qat-placement cpu is for {_listed(cpu)}; build the {_listed(off_cpu)} with "
                                "the default --qat-placement tensorrt (TensorRT reads the trained QDQ graph)")
    if options.int8_keep and options.qat_placement != "cpu":
        raise ExportOptionError(f"{qat}: --int8-keep applies only with --qat-placement cpu (the trained QDQ "
                                "graph is fixed by training)")
    if not options.int8:
        LOGGER.info("%s was trained with fake quantization: exporting its INT8 graph (as with --int8)",
                    options.weights)
        options.int8 = True
    check_overwrite(options, trained_qdq=options.qat_placement == "tensorrt")  # what a QAT export writes


def load_for_export(weights: Path) -> tuple[nn.Module, list[str]]:
    """The checkpoint's model (float, eval) and its class names."""
    from utils.weights.checkpoint import load_checkpoint

    loaded = load_checkpoint(weights)
    names = loaded.meta.get("names") or list(getattr(loaded.model, "names", []))
    return loaded.model, [str(n) for n in names]


def export_model(options: ExportOptions) -> dict[str, Path]:
    """Export ``options.weights`` to every format in ``options.include``; returns artifact key -> path (the format
    names, ``onnx_int8`` for the INT8 copy, and the artifacts the requested ones were built from).

    ``options.imgsz`` is rounded up to a multiple of the model's largest stride first (logged), as train.py,
    val.py and detect.py do, so the caller's comparison images match the artifacts.
    """
    from utils.common.flags import check_img_size
    from utils.common.torch_utils import select_device

    device = select_device(options.device)
    check_options(options, device)
    model, names = load_for_export(Path(options.weights))
    if options.nms and task_of(model) != "detect":
        raise ExportOptionError(f"--nms: {options.weights} is a classifier; NMS inside the graph applies to detectors "
                                "only")
    stride = max(int(model_stride(model)), 32)
    options.imgsz = tuple(check_img_size(size, stride) for size in options.imgsz)
    trained_qdq = bool(getattr(model, "quantization", None)) and options.qat_placement == "tensorrt"
    if getattr(model, "quantization", None) and not trained_qdq:
        model = _qat_weights_for_cpu_runtimes(model)
    paths = artifact_paths(Path(options.weights), options.output_dir)
    job = ExportJob(prepare_for_export(model), torch.zeros(options.batch_size, 3, *options.imgsz), names, options,
                    device, paths, REGISTRY, export_task(model, options.data, options.imgsz))
    if options.int8 and not trained_qdq:
        job.check_calibration()
    planned = planned_outputs(options, trained_qdq)
    folder = Path(options.output_dir) if options.output_dir else Path(options.weights).parent
    created = _missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = set_aside_earlier_files(planned, folder)  # --exist-ok (without it, check_overwrite refused them)
    try:
        for fmt in REGISTRY.plan(options.include, trained_qdq):
            job.done.update((fmt.export_qat if trained_qdq else fmt.export)(job))
    except BaseException:  # re-raised as it is, after removing what this run wrote and putting back what it moved
        _remove_partial(planned, created)
        if earlier:
            restore_earlier_run(folder, earlier)
        raise
    return job.done


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first (what ``mkdir(parents=True)`` creates)."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_partial(outputs: list[Path], created: list[Path]) -> None:
    """A failed export leaves nothing of its own behind: the artifacts and sidecars it wrote (never one that existed
    before the run) and the folders it made, where they are empty again."""
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    for folder in created:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _qat_weights_for_cpu_runtimes(model: nn.Module) -> nn.Module:
    """The float model carrying the QAT-trained weights, to go down the PTQ path of each format.

    Why: each CPU runtime is fast only with its own quantizer's placement of the quantize/dequantize pairs
    (ONNX Runtime fuses them into integer kernels only where every output carries one; OpenVINO wants residual
    adds and concatenations quantized too). The trained graph's TensorRT placement runs 2-3x slower than FP32 on
    ONNX Runtime. Re-quantizing the trained weights keeps most of what QAT learned (measured in docs/deploy.md)
    at PTQ's speed; activation ranges are calibrated again on ``--data``.
    """
    from utils.compress.quant.qat import float_model_with_qat_weights

    LOGGER.info("QAT checkpoint, --qat-placement cpu: exporting its trained weights as a float model and quantizing "
                "that with each CPU runtime's own quantizer (calibrated on --data)")
    return float_model_with_qat_weights(model)
