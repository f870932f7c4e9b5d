"""OpenVINO IR export: converted from the ONNX graph (the most tested OpenVINO frontend), FP32 or FP16 weights.

The artifact is a folder ``<stem>_openvino_model/`` holding ``<stem>.xml``, ``<stem>.bin`` and
``metadata.json``. FP16 stores half-precision weights (half the size); the CPU plugin still computes in FP32
unless told otherwise, GPUs/NPUs compute in FP16.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from utils.export.common import ExportMetadata, write_metadata
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
