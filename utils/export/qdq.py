"""QDQ ONNX of a quantization-aware-trained detector (explicit quantization, no calibrator needed downstream).

torchao's ``convert_pt2e`` turns the fake quantizers into INT8 weight tensors and quantize/dequantize ops;
the dynamo exporter (``torch.onnx.export(dynamo=True)``, the only one that understands those ops) writes them
as ``QuantizeLinear``/``DequantizeLinear`` pairs: symmetric INT8 with zero points of 0, activations per tensor,
weights per output channel. TensorRT builds such a file as an INT8 engine without a calibration cache, and
OpenVINO runs it (or the IR converted from it) with INT8 convolutions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from utils.export.common import ExportMetadata, write_metadata

LOGGER = logging.getLogger(__name__)

QDQ_OPSET = 17  # TensorRT 8.6 (JetPack 5/6.0) parses opsets up to 17; QDQ per-channel needs >= 13


def export_qdq_onnx(model: nn.Module, images: torch.Tensor, file: str | Path, metadata: ExportMetadata,
                    dynamic_batch: bool = False, dynamic_hw: bool = False, opset: int = QDQ_OPSET) -> Path:
    """Convert a prepared (eval, decoded-output) :class:`~utils.compress.quant.qat.QATDetector` to INT8 and
    export it."""
    import onnx

    from utils.compress.quant.qat import quantized_graph
    from utils.export.common import embed_metadata

    file = Path(file)
    module = quantized_graph(model)
    stride = int(metadata.stride)
    shapes = None
    if dynamic_batch or dynamic_hw:
        axes: dict[int, object] = {}
        if dynamic_batch:
            axes[0] = torch.export.Dim("batch", min=1, max=4096)
        if dynamic_hw:
            axes[2] = stride * torch.export.Dim("height_cells", min=1, max=1024)
            axes[3] = stride * torch.export.Dim("width_cells", min=1, max=1024)
        shapes = {"images": axes}
    program = torch.onnx.export(module, (images,), dynamo=True, opset_version=opset, input_names=["images"],
                                output_names=["output0"], dynamic_shapes=shapes, verbose=False)
    program.save(str(file))
    graph = onnx.load(str(file))
    onnx.checker.check_model(graph)
    embed_metadata(graph, metadata)
    onnx.save(graph, str(file))
    write_metadata(file, metadata)
    counts = quantize_node_counts(graph)
    LOGGER.info("QDQ ONNX saved to %s (opset %d, %d QuantizeLinear, %d DequantizeLinear)", file, opset,
                counts["QuantizeLinear"], counts["DequantizeLinear"])
    return file


def quantize_node_counts(graph) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes an ONNX graph holds."""
    ops = [node.op_type for node in graph.graph.node]
    return {op: ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear")}
