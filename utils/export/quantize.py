"""Static INT8 quantization of an ONNX detector with ONNX Runtime (QDQ format).

Calibration feeds real training images letterboxed exactly like the validation loader (long side to
``imgsz``, grey 114 padding to a square, RGB, /255), so activation ranges match what inference sees. The
box-decoding tail of the Detect head (sigmoid, grid/anchor arithmetic, concat of pixel boxes with [0, 1]
scores) is kept in FP32: one 8-bit scale cannot cover both 0..640 pixels and 0..1 scores.

Optionally (``keep_layers``, from ``export.py --int8-keep N``) whole YAML layers stay FP32: the N whose
INT8 rounding alone costs most at the head, measured per model by :mod:`utils.compress.quant.sensitivity`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from utils.export.common import (
    ImageTransform,
    letterbox_tensor,
    read_metadata,
    write_metadata,
)

LOGGER = logging.getLogger(__name__)


class CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` (and an iterable for NNCF): yields ``{input_name: batch}`` of images
    prepared by ``transform`` (the task's validation preprocessing: letterbox for detectors, centre crop for
    classifiers)."""

    def __init__(self, files: Sequence[str | Path], imgsz: tuple[int, int], input_name: str = "images",
                 batch_size: int = 1, transform: ImageTransform = letterbox_tensor):
        self.files = [Path(f) for f in files]
        self.imgsz = imgsz
        self.input_name = input_name
        self.batch_size = batch_size
        self.transform = transform
        self._batches: Iterator[dict[str, np.ndarray]] | None = None

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.files), self.batch_size):
            chunk = self.files[start:start + self.batch_size]
            if len(chunk) < self.batch_size:
                return
            yield {self.input_name: np.stack([self.transform(f, self.imgsz).numpy() for f in chunk])}

    @classmethod
    def for_artifact(cls, files: Sequence[str | Path], metadata: dict, imgsz: tuple[int, int],
                     transform: ImageTransform = letterbox_tensor) -> CalibrationReader:
        """Batches the artifact described by ``metadata`` takes (batch 1 when its batch axis is free), each image
        prepared by ``transform`` (the model's task prepares them as its validation loader does)."""
        if not files:
            raise ValueError("INT8 calibration needs images: pass --data with a train split")
        batch = 1 if "batch" in (metadata.get("dynamic") or []) else int(metadata["batch"])
        return cls(files, imgsz, "images", batch, transform)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """A fresh pass over the batches (NNCF walks calibration data more than once)."""
        return self._generate()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = None


def decode_tail_nodes(model_path: str | Path) -> list[str]:
    """Names of the head's final convolutions and of the box decoding after them, kept in FP32.

    The head convolutions are the last Conv nodes on every path to the output; the decoding is every node
    that (transitively) consumes a Conv output and from which no Conv is reachable. Keeping the 1x1 head
    convs in FP32 costs little time and recovers most of the mAP that 8-bit logits lose.
    """
    import onnx

    graph = onnx.load(str(model_path)).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reaches_conv: dict[str, bool] = {}

    def has_conv_below(node) -> bool:
        if node.name not in reaches_conv:
            reaches_conv[node.name] = False  # guards against cycles (there are none in a valid graph)
            below = [c for out in node.output for c in consumers.get(out, [])]
            reaches_conv[node.name] = any(c.op_type == "Conv" or has_conv_below(c) for c in below)
        return reaches_conv[node.name]

    return [node.name for node in graph.node if not has_conv_below(node)
            and (node.op_type == "Conv" or _downstream_of_conv(node, graph))]


def layer_nodes(model_path: str | Path, layers: Sequence[int]) -> list[str]:
    """Names of the ONNX nodes traced inside YAML layers ``layers`` (the exporter names them ``/model.<i>/...``)."""
    if not layers:
        return []
    import onnx

    prefixes = tuple(f"/model.{int(i)}/" for i in layers)
    names = [node.name for node in onnx.load(str(model_path)).graph.node if node.name.startswith(prefixes)]
    missing = [i for i, p in zip(layers, prefixes) if not any(n.startswith(p) for n in names)]
    if missing:
        raise ValueError(f"{model_path}: no ONNX nodes named /model.<i>/ for layers {missing}; export it with "
                         "export.py (the TorchScript exporter's node names)")
    return names


def _downstream_of_conv(node, graph) -> bool:
    producers = {out: n for n in graph.node for out in n.output}
    stack, seen = list(node.input), set()
    while stack:
        name = stack.pop()
        producer = producers.get(name)
        if producer is None or producer.name in seen:
            continue
        if producer.op_type == "Conv":
            return True
        seen.add(producer.name)
        stack.extend(producer.input)
    return False


def quantize_onnx_int8(onnx_in: str | Path, onnx_out: str | Path, calibration_files: Sequence[str | Path],
                       imgsz: tuple[int, int] | None = None, per_channel: bool = True,
                       max_calibration_megapixels: float = 20.0, method: str = "minmax",
                       keep_layers: Sequence[int] = (), transform: ImageTransform = letterbox_tensor) -> Path:
    """Write a QDQ INT8 copy of ``onnx_in`` calibrated on ``calibration_files``; sidecar gets precision int8.

    Activations are unsigned 8-bit (SiLU outputs are mostly positive), weights signed 8-bit per channel.
    ONNX Runtime's MinMax calibrator keeps every intermediate tensor of every calibration image in memory
    (its ``CalibMaxIntermediateOutputs`` flush discards data instead of merging it), so the image count is
    capped at ``max_calibration_megapixels`` of input (300 images at 256, 48 at 640: ~10-20 GB peak).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    metadata = read_metadata(onnx_in)
    size = tuple(imgsz or metadata["imgsz"])
    calibration_files = _within_memory_budget(list(calibration_files), size, max_calibration_megapixels)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method {method!r}: choose from {', '.join(methods)}")
    reader = CalibrationReader.for_artifact(calibration_files, metadata, size, transform)
    tail = decode_tail_nodes(onnx_in)
    kept = layer_nodes(onnx_in, keep_layers)
    excluded = sorted(set(tail) | set(kept))
    LOGGER.info("INT8: calibrating on %d images; FP32 kept for %d decode nodes and %d nodes of layers %s",
                len(calibration_files), len(tail), len(kept), list(keep_layers))
    quantize_static(str(onnx_in), str(onnx_out), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    calibrate_method=methods[method], nodes_to_exclude=excluded)
    metadata["precision"] = "int8"
    metadata["calibration_images"] = len(calibration_files)
    metadata["fp32_layers"] = sorted(int(i) for i in keep_layers)
    write_metadata(onnx_out, metadata)
    return onnx_out


def _within_memory_budget(files: list, size: tuple[int, int], max_megapixels: float) -> list:
    limit = max(1, int(max_megapixels * 1e6 // (size[0] * size[1])))
    if len(files) > limit:
        LOGGER.warning("INT8: calibrating on the first %d of %d images (memory budget %.0f megapixels at %dx%d)",
                       limit, len(files), max_megapixels, size[0], size[1])
    return files[:limit]
