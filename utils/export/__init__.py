"""Export pipeline: one checkpoint -> TorchScript / ONNX / OpenVINO / NCNN / TensorRT artifacts + sidecars.

``export.py`` is a thin CLI over :func:`run_export`; each format lives in its own module. Errors are raised,
never logged-and-skipped, so a failed export gives a non-zero exit code (unlike YOLOv5, which carries on).
An artifact (or sidecar) that already exists is not replaced unless ``exist_ok`` is set: the check runs
before anything is loaded or written, so a refused export leaves every file as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.yolo import task_of
from utils.common.errors import UserError
from utils.export.common import (
    ExportMetadata,
    MetadataError,
    focus_to_conv,
    image_files,
    metadata_path,
    model_heads,
    model_stride,
    prepare_for_export,
    read_metadata,
    sample_images,
    write_metadata,
)
from utils.export.onnx import DEFAULT_OPSET, EndToEndDetector, NMSSettings

LOGGER = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "openvino", "ncnn", "engine")

__all__ = [
    "FORMATS",
    "ExportMetadata",
    "ExportOptionError",
    "ExportOptions",
    "MetadataError",
    "NMSSettings",
    "artifact_paths",
    "compare_with_pytorch",
    "focus_to_conv",
    "metadata_path",
    "parse_shape",
    "planned_outputs",
    "prepare_for_export",
    "read_metadata",
    "run_export",
    "write_metadata",
]

ALL_AXES = ("batch", "height", "width")


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
        """The free input axes of ONNX/OpenVINO artifacts (TorchScript keeps only the batch, NCNN none)."""
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
    """Where each format is written: beside the weights (YOLOv5 naming) unless ``output_dir`` is given."""
    folder = Path(output_dir) if output_dir else weights.parent
    stem = weights.stem
    return {"torchscript": folder / f"{stem}.torchscript", "onnx": folder / f"{stem}.onnx",
            "onnx_int8": folder / f"{stem}_int8.onnx", "openvino": folder / f"{stem}_openvino_model",
            "ncnn": folder / f"{stem}_ncnn_model", "engine": folder / f"{stem}.engine"}


def planned_outputs(options: ExportOptions, trained_qdq: bool = False) -> list[Path]:
    """Every file or folder :func:`run_export` will write for ``options``: artifacts and their JSON sidecars.

    ``trained_qdq``: the weights are a QAT checkpoint exported as its trained QDQ graph (``--qat-placement
    tensorrt``), which writes the INT8 ONNX and builds the other formats from it.
    """
    include = set(options.include)
    paths = artifact_paths(Path(options.weights), options.output_dir)
    names = [name for name in ("torchscript", "openvino", "ncnn", "engine") if name in include]
    if trained_qdq:
        names.append("onnx_int8")
    else:
        if {"onnx", "engine"} & include:
            names.append("onnx")  # the engine is built from the ONNX export, written beside it
        if options.int8 and "onnx" in include:
            names.append("onnx_int8")
    outputs = []
    for name in names:
        artifact = paths[name]
        outputs.append(artifact)
        if name not in {"openvino", "ncnn"}:  # folders carry their sidecar inside
            outputs.append(metadata_path(artifact))
    return outputs


def check_overwrite(options: ExportOptions, trained_qdq: bool = False) -> None:
    """Refuse (before anything is written) when an artifact or sidecar already exists, unless ``exist_ok``."""
    existing = [str(path) for path in planned_outputs(options, trained_qdq) if path.exists()]
    if existing and not options.exist_ok:
        raise ExportOptionError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass "
                                f"--exist-ok to replace {'it' if len(existing) == 1 else 'them'}, or --output-dir "
                                "DIR to export elsewhere")
    for path in existing:
        LOGGER.warning("replacing %s (--exist-ok)", path)


def check_options(options: ExportOptions, device: torch.device) -> None:
    """Fail before any work when the flags cannot be satisfied, with a message saying what to change."""
    unknown = [f for f in options.include if f not in FORMATS]
    if unknown:
        raise ExportOptionError(f"--include {unknown}: unknown format; choose from {', '.join(FORMATS)}")
    if not Path(options.weights).is_file():
        raise ExportOptionError(f"weights file {options.weights} not found; pass --weights PATH to a .pt checkpoint")
    if options.dynamic and options.dynamic_batch:
        raise ExportOptionError("--dynamic (batch, height and width, as YOLOv5 v7.0) and --dynamic-batch (batch "
                                "only) exclude each other: pass one")
    if options.half and device.type != "cuda" and {"torchscript", "onnx"} & set(options.include):
        raise ExportOptionError("--half exports FP16 TorchScript/ONNX and needs a CUDA device (--device 0); on CPU "
                                "export FP32 (OpenVINO/NCNN --half only store FP16 weights and work on CPU)")
    if options.int8 and options.nms:
        raise ExportOptionError("--int8 with --nms is not supported: quantize the plain graph and run NMS outside")
    if options.int8_keep < 0 or (options.int8_keep and not options.int8):
        raise ExportOptionError("--int8-keep N takes N >= 0 and goes with --int8")
    check_overwrite(options)  # before the checkpoint is read: refusing costs nothing
    if _qat_recipe(options.weights) is not None:
        _check_qat_export(options)
    elif options.int8 and not options.data:
        raise ExportOptionError("--int8 needs --data (a data YAML whose train images calibrate the quantization)")
    elif options.int8 and {"torchscript", "ncnn"} & set(options.include):
        raise ExportOptionError("--int8 applies to onnx, openvino and engine only")
    elif options.qat_placement != "tensorrt":
        LOGGER.warning("--qat-placement %s applies to quantization-aware-trained checkpoints only; %s is not one, "
                       "so it changes nothing", options.qat_placement, options.weights)
    if "engine" in options.include:
        from utils.export.tensorrt import import_tensorrt

        import_tensorrt()


def _qat_recipe(weights: Path) -> dict[str, Any] | None:
    from utils.weights.checkpoint import checkpoint_quantization

    return checkpoint_quantization(weights)


def _check_qat_export(options: ExportOptions) -> None:
    """A quantization-aware-trained checkpoint exports its INT8 graph (QDQ ONNX, OpenVINO IR, TensorRT engine)."""
    qat = f"{options.weights} is a quantization-aware-trained checkpoint"
    other = sorted(set(options.include) - {"onnx", "openvino", "engine"})
    if other:
        raise ExportOptionError(f"{qat}: it exports to onnx, openvino and engine (INT8), not {', '.join(other)}")
    if options.nms or options.half:
        raise ExportOptionError(f"{qat}: --nms and --half do not apply (its INT8 graph is fixed by training)")
    if options.qat_placement == "cpu" and not options.data:
        raise ExportOptionError("--qat-placement cpu re-quantizes the QAT-trained weights with each CPU runtime's "
                                "calibrated quantizer: pass --data (a data YAML whose train images calibrate it)")
    if options.qat_placement == "cpu" and "engine" in options.include:
        raise ExportOptionError(f"{qat}: --qat-placement cpu is for onnx and openvino; build the engine with the "
                                "default --qat-placement tensorrt (TensorRT reads the trained QDQ graph)")
    if options.int8_keep and options.qat_placement != "cpu":
        raise ExportOptionError(f"{qat}: --int8-keep applies only with --qat-placement cpu (the trained QDQ "
                                "graph is fixed by training)")
    if not options.int8:
        LOGGER.info("%s was trained with fake quantization: exporting its INT8 graph (as with --int8)",
                    options.weights)
        options.int8 = True
    check_overwrite(options, trained_qdq=options.qat_placement == "tensorrt")  # what a QAT export writes


def _metadata(model: nn.Module, names: list[str], options: ExportOptions, fmt: str, precision: str,
              batch: int) -> ExportMetadata:
    axes = options.dynamic_axes()
    dynamic = {"ncnn": [], "torchscript": [a for a in axes if a == "batch"]}.get(fmt, list(axes))
    nms = None
    if options.nms and fmt == "onnx":
        nms = {"conf_thres": options.nms_settings.conf_thres, "iou_thres": options.nms_settings.iou_thres,
               "max_det": options.nms_settings.max_det}
    return ExportMetadata(format=fmt, task=task_of(model), stride=model_stride(model), imgsz=list(options.imgsz),
                          batch=batch, precision=precision, names=list(names), heads=model_heads(model),
                          dynamic=dynamic, opset=options.opset if fmt in {"onnx", "openvino", "engine"} else None,
                          nms=nms)


def load_for_export(weights: Path) -> tuple[nn.Module, list[str]]:
    """The checkpoint's model (float, eval) and its class names."""
    from utils.weights.checkpoint import load_checkpoint

    loaded = load_checkpoint(weights)
    names = loaded.meta.get("names") or list(getattr(loaded.model, "names", []))
    return loaded.model, [str(n) for n in names]


def run_export(options: ExportOptions) -> dict[str, Path]:
    """Export ``options.weights`` to every format in ``options.include``; returns format -> artifact path.

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
    paths = artifact_paths(Path(options.weights), options.output_dir)
    paths["onnx"].parent.mkdir(parents=True, exist_ok=True)
    images = torch.zeros(options.batch_size, 3, *options.imgsz)
    if getattr(model, "quantization", None):
        if options.qat_placement == "tensorrt":
            return _export_qat(prepare_for_export(model), images, names, options, paths)
        model = _qat_weights_for_cpu_runtimes(model)
    prepared = prepare_for_export(model)
    done: dict[str, Path] = {}
    if "torchscript" in options.include:
        done["torchscript"] = _export_torchscript(prepared, images, names, options, device, paths["torchscript"])
    if {"onnx", "engine"} & set(options.include):
        done["onnx"] = _export_onnx(prepared, images, names, options, device, paths["onnx"])
    calibration = _calibration(prepared, options)
    if options.int8 and "onnx" in options.include:
        done["onnx_int8"] = _quantize(prepared, done["onnx"], paths["onnx_int8"], options, *calibration)
    if "openvino" in options.include:
        done["openvino"] = _export_openvino(prepared, images, names, options, paths["openvino"], done, *calibration)
    if "ncnn" in options.include:
        from utils.export.ncnn import export_ncnn

        metadata = _metadata(prepared, names, options, "ncnn", "fp16" if options.half else "fp32", 1)
        done["ncnn"] = export_ncnn(prepared, images, paths["ncnn"], metadata, half=options.half)
    if "engine" in options.include:
        done["engine"] = _build_engine(done["onnx"], paths["engine"], options)
    return done


def _qat_weights_for_cpu_runtimes(model: nn.Module) -> nn.Module:
    """The float model carrying the QAT-trained weights, to go down the PTQ path below.

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


def _export_qat(model: nn.Module, images: torch.Tensor, names: list[str], options: ExportOptions,
                paths: dict[str, Path]) -> dict[str, Path]:
    """QDQ ONNX (then OpenVINO IR / TensorRT engine built from it) of a quantization-aware-trained detector."""
    from utils.export.qdq import QDQ_OPSET, export_qdq_onnx
    from utils.export.runtime import record_cpu_runtime

    metadata = _metadata(model, names, options, "onnx", "int8", options.batch_size)
    metadata.opset, metadata.quantization = QDQ_OPSET, dict(model.quantization)
    axes = options.dynamic_axes()
    done = {"onnx_int8": export_qdq_onnx(model, images, paths["onnx_int8"], metadata, "batch" in axes,
                                         "height" in axes)}
    images, reference = _runtime_check(model, options)
    record_cpu_runtime(done["onnx_int8"], images, reference)
    if "openvino" in options.include:
        from utils.export.openvino import export_openvino

        ov_metadata = _metadata(model, names, options, "openvino", "int8", options.batch_size)
        ov_metadata.quantization = metadata.quantization
        done["openvino"] = export_openvino(model, images, paths["openvino"], ov_metadata, onnx_file=done["onnx_int8"])
    if "engine" in options.include:
        done["engine"] = _build_engine(done["onnx_int8"], paths["engine"], options, calibrate=False)
    return done


def _export_torchscript(model: nn.Module, images: torch.Tensor, names: list[str], options: ExportOptions,
                        device: torch.device, file: Path) -> Path:
    from utils.export.torchscript import export_torchscript

    precision = "fp16" if options.half else "fp32"
    metadata = _metadata(model, names, options, "torchscript", precision, options.batch_size)
    model, images = _on_device(model, images, device, options.half)
    return export_torchscript(model, images, file, metadata)


def _export_onnx(model: nn.Module, images: torch.Tensor, names: list[str], options: ExportOptions,
                 device: torch.device, file: Path) -> Path:
    from utils.export.onnx import export_onnx

    precision = "fp16" if options.half and device.type == "cuda" else "fp32"
    metadata = _metadata(model, names, options, "onnx", precision, options.batch_size)
    model, images = _on_device(model, images, device, precision == "fp16")
    nms = options.nms_settings if options.nms else None
    return export_onnx(model, images, file, metadata, options.opset, options.dynamic_axes(), options.simplify, nms)


def _on_device(model: nn.Module, images: torch.Tensor, device: torch.device, half: bool):
    import copy

    model = copy.deepcopy(model).to(device)
    images = images.to(device)
    return (model.half(), images.half()) if half else (model, images)


def _calibration(model: nn.Module, options: ExportOptions) -> tuple[list[Path], list[int]]:
    """The calibration images and the ``--int8-keep`` most sensitive layers, shared by every INT8 format."""
    if not (options.int8 and {"onnx", "openvino"} & set(options.include)):
        return [], []
    files = image_files(options.data, "train")[: options.calib_images]
    keep = sensitive_layers(model, files, options.imgsz, options.int8_keep) if options.int8_keep else []
    return files, keep


def _quantize(model: nn.Module, onnx_file: Path, out: Path, options: ExportOptions, files: list[Path],
              keep: list[int]) -> Path:
    from utils.export.quantize import quantize_onnx_int8
    from utils.export.runtime import record_cpu_runtime

    quantized = quantize_onnx_int8(onnx_file, out, files, options.imgsz, keep_layers=keep)
    record_cpu_runtime(quantized, *_runtime_check(model, options))
    return quantized


def _runtime_check(model: nn.Module, options: ExportOptions) -> tuple[torch.Tensor | None, Any]:
    """Real images (--data val, else the embedded sample) and ``model``'s outputs on them, for choosing a runtime
    that reproduces the model (see utils/export/runtime.py); (None, None) when there are no images."""
    sample = Path(__file__).resolve().parents[2] / "data" / "neu-det-sample" / "images" / "val"
    images = sample_images(options.data or sample, options.imgsz, 8)
    if images is None or task_of(model) != "detect":
        return None, None
    with torch.no_grad():
        return images, model(images)


def sensitive_layers(model: nn.Module, files: list[Path], imgsz: tuple[int, int], keep: int,
                     images: int = 8) -> list[int]:
    """The ``keep`` layers whose INT8 rounding alone costs the most at the head, measured on ``images`` of the
    calibration files (the ranking is logged)."""
    from utils.compress.quant.sensitivity import format_sensitivity, measure_layer_sensitivity
    from utils.export.common import letterbox_tensor

    batch = torch.stack([letterbox_tensor(f, imgsz) for f in files[:images]])
    ranking = measure_layer_sensitivity(model, batch)
    LOGGER.info("%s", format_sensitivity(ranking, keep))
    return sorted(item.layer for item in ranking[:keep])


def _export_openvino(model: nn.Module, images: torch.Tensor, names: list[str], options: ExportOptions,
                     folder: Path, done: dict[str, Path], files: list[Path], keep: list[int]) -> Path:
    """FP32/FP16 IR from the plain ONNX; with --int8, that IR quantized by OpenVINO's own quantizer (NNCF)."""
    from utils.export.openvino import export_openvino, quantize_openvino_int8

    metadata = _metadata(model, names, options, "openvino", "fp16" if options.half else "fp32", options.batch_size)
    folder = export_openvino(model, images, folder, metadata, options.half, options.dynamic_axes(),
                             onnx_file=_plain_onnx(done, options))
    return quantize_openvino_int8(folder, files, options.imgsz, keep) if options.int8 else folder


def _plain_onnx(done: dict[str, Path], options: ExportOptions) -> Path | None:
    """The ONNX export when OpenVINO can reuse it as is (FP32, no NMS), else None (export a fresh one)."""
    if "onnx" in done and not options.nms and read_metadata(done["onnx"])["precision"] == "fp32":
        return done["onnx"]
    return None


def _build_engine(onnx_file: Path, engine_file: Path, options: ExportOptions, calibrate: bool = True) -> Path:
    from utils.export.tensorrt import ShapeProfile, build_engine, default_profile

    profile = None
    if options.dynamic_axes():  # v7.0: a batch profile at the export size; --min/opt/max-shape override it
        default = default_profile(options.imgsz, options.batch_size)
        profile = ShapeProfile(min=options.min_shape or default.min, opt=options.opt_shape or default.opt,
                               max=options.max_shape or default.max)
    calibration = image_files(options.data, "train")[: options.calib_images] if options.int8 and calibrate else []
    int8 = options.int8 or not calibrate  # a QDQ ONNX builds as INT8 from its own scales
    return build_engine(onnx_file, engine_file, options.half, int8, options.workspace, profile, calibration)


def compare_with_pytorch(options: ExportOptions, artifacts: dict[str, Path],
                         images: torch.Tensor) -> dict[str, float]:
    """Max |exported - PyTorch| over ``images`` for each artifact (the same decoded output, or the NMS table)."""
    from utils.inference.backends import load_backend

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


def comparison_images(options: ExportOptions, sample_folder: Path, limit: int = 8) -> tuple[torch.Tensor | None, str]:
    """Real images to compare on: --data val images, else the embedded sample, else none (with the reason)."""
    if options.data:
        return sample_images(options.data, options.imgsz, limit), f"{options.data} val images"
    if sample_folder.is_dir():
        return sample_images(sample_folder, options.imgsz, limit), str(sample_folder)
    return None, f"no --data given and {sample_folder} does not exist: outputs were not compared with PyTorch"

