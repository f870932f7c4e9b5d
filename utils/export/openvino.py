"""OpenVINO IR export: converted from the ONNX graph (the most tested OpenVINO frontend), FP32 or FP16 weights,
or INT8 quantized by OpenVINO's own post-training quantizer (NNCF).

The artifact is a folder ``<stem>_openvino_model/`` holding ``<stem>.xml``, ``<stem>.bin`` and
``metadata.json``. FP16 stores half-precision weights (half the size); the CPU plugin still computes in FP32
unless told otherwise, GPUs/NPUs compute in FP16.

INT8 comes from NNCF rather than from the ONNX Runtime QDQ file because the quantizer decides where the
FakeQuantize nodes go, and OpenVINO's CPU kernels are fast only with NNCF's placement: it quantizes residual
adds and gives concatenated branches one scale, so whole blocks run in INT8 and SiLU stays fused into the
convolution. Measured on yolov5s at 640 (docs/deploy.md): about 3x OpenVINO f32 and 1.6x the ONNX Runtime
QDQ file run by OpenVINO.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from utils.export.common import ExportMetadata, read_metadata, write_metadata
from utils.export.onnx import DEFAULT_OPSET, export_onnx

LOGGER = logging.getLogger(__name__)


def export_openvino(model: nn.Module, images: torch.Tensor, folder: str | Path, metadata: ExportMetadata,
                    half: bool = False, dynamic: Sequence[str] = (), onnx_file: str | Path | None = None) -> Path:
    """Write the IR into ``folder``; reuses ``onnx_file`` when given (it must be a plain, NMS-free export).

    ``dynamic`` names the free input axes, as for :func:`utils.export.onnx.export_onnx` (the IR keeps the ONNX
    graph's shapes, so a reused ``onnx_file`` must have been exported with the same axes)."""
    import openvino as ov

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder.name.removesuffix("_openvino_model") or "model"
    with tempfile.TemporaryDirectory(prefix="ov-export-") as tmp:
        source = Path(onnx_file) if onnx_file else export_onnx(
            model, images, Path(tmp) / f"{stem}.onnx", metadata, DEFAULT_OPSET, dynamic)
        ov_model = ov.convert_model(str(source))
        ov.save_model(ov_model, str(folder / f"{stem}.xml"), compress_to_fp16=half)
    write_metadata(folder, metadata)
    LOGGER.info("OpenVINO IR saved to %s (%s weights)", folder, "FP16" if half else "FP32")
    return folder


def quantize_openvino_int8(folder: str | Path, calibration_files: Sequence[str | Path], imgsz: tuple[int, int],
                           keep_layers: Sequence[int] = ()) -> Path:
    """Replace the FP32 IR in ``folder`` by its INT8 copy, calibrated on ``calibration_files``; sidecar says int8.

    Activation ranges are the min/max over all calibration images (NNCF's default averages per-image ranges,
    which clipped enough on yolov5s to cost 2.5 points of mAP@.5; min/max costs 0.3-0.7). Layers in
    ``keep_layers`` (``--int8-keep``) stay in floating point.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from utils.export.quantize import CalibrationReader

    folder = Path(folder)
    metadata = read_metadata(folder)
    reader = CalibrationReader.for_artifact(calibration_files, metadata, imgsz)
    xml = next(folder.glob("*.xml"))
    ignored = nncf.IgnoredScope(patterns=[rf"^/model\.{int(i)}/.*" for i in keep_layers], validate=False)
    LOGGER.info("OpenVINO INT8 (NNCF): calibrating on %d images; layers %s kept in floating point",
                len(calibration_files), list(keep_layers))
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # it logs one INFO line per node left unquantized
    try:
        quantized = nncf.quantize(
            ov.Core().read_model(str(xml)), nncf.Dataset(reader, lambda item: item["images"]),
            subset_size=max(1, len(calibration_files) // reader.batch_size), ignored_scope=ignored,
            advanced_parameters=AdvancedQuantizationParameters(
                activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))
    finally:
        nncf_logger.setLevel(level)
    with tempfile.TemporaryDirectory(prefix="ov-int8-", dir=folder) as tmp:  # the FP32 .bin is memory-mapped
        ov.save_model(quantized, str(Path(tmp) / xml.name), compress_to_fp16=False)
        for suffix in (".xml", ".bin"):
            (Path(tmp) / xml.name).with_suffix(suffix).replace(xml.with_suffix(suffix))
    metadata.update(precision="int8", quantizer=f"nncf {nncf.__version__}", calibration_images=len(calibration_files),
                    fp32_layers=sorted(int(i) for i in keep_layers))
    write_metadata(folder, metadata)
    return folder
