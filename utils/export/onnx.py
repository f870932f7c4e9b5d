"""ONNX export (TorchScript-based exporter, ``dynamo=False``), optional onnxslim and end-to-end NMS; the ONNX
Runtime backend and the format description (INT8: ONNX Runtime's static QDQ copy ``x_int8.onnx``, or a QAT
checkpoint's trained QDQ graph).

End-to-end NMS choice: the graph holds the standard ONNX ``NonMaxSuppression`` operator, emitted by a small
autograd Function with an ONNX symbolic. It is given boxes ``[bs, N, 4]`` and per-class scores
``[bs, nc, N]`` (each box scores only for its best class, zero when below ``conf_thres``), so suppression is
per image and per class with no coordinate-offset trick (which costs float precision at large batch x nc),
and batch stays dynamic. The selected (image, class, box) triples are scattered into a dense score map and a
``TopK`` gives the fixed-size output ``detections [bs, max_det, 6]`` (x1, y1, x2, y2, score, class; rows past
``num_dets`` are zero) plus ``num_dets [bs]`` (int64). Thresholds are baked in at export time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from utils.common.errors import FlagError
from utils.export.backend import Backend
from utils.export.common import ExportMetadata, embed_metadata, read_metadata, write_metadata
from utils.export.spec import ExportFormat, Requirement

if TYPE_CHECKING:
    import onnx

    from utils.export import ExportOptions
    from utils.export.job import ExportJob

LOGGER = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The opsets export.py accepts, measured with torch 2.14's TorchScript-based exporter (dynamo=False) on yolov5n:
# below 9 it cannot write YOLOv5's nearest Upsample; --nms needs 11 (the detection table's ScatterND: opset 9
# refuses, opset 10 crashed the exporter with a floating-point exception); ONNX Runtime's INT8 copy needs 13 (its
# per-channel QuantizeLinear has an axis only from 13). Some zoo blocks need more (unflatten: 13): the exporter's
# refusal names the operator (see export_onnx). The highest is what the installed torch's exporter supports.
MIN_OPSET = 9
MIN_OPSET_NMS = 11
MIN_OPSET_INT8 = 13


def highest_opset() -> int:
    """The highest opset the installed torch's TorchScript-based exporter supports (20 in torch 2.5-2.14); torch
    itself only warns above it and fails past its own table, after the model is loaded."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", DEFAULT_OPSET))


def check_opset(opset: int) -> None:
    """``--opset`` within what the exporter writes (a FlagError naming the range otherwise)."""
    if not MIN_OPSET <= opset <= highest_opset():
        raise FlagError(f"--opset {opset}: the ONNX exporter of torch {torch.__version__} writes opsets "
                        f"{MIN_OPSET} to {highest_opset()}; pass one of them (default {DEFAULT_OPSET})")


def check_flags(options: ExportOptions, requested: bool, trained_qdq: bool) -> None:
    """The opset and the features that need a higher one, before anything is loaded (a QAT checkpoint's trained
    QDQ graph has its own opset, see utils/export/qdq.py)."""
    if trained_qdq:
        return
    check_opset(options.opset)
    needs = [(MIN_OPSET_NMS, "--nms (NMS inside the graph)", options.nms),
             (MIN_OPSET_INT8, "--int8 (ONNX Runtime's per-channel INT8 copy)", options.int8 and requested)]
    for lowest, feature, asked in needs:
        if asked and options.opset < lowest:
            raise FlagError(f"--opset {options.opset}: {feature} needs opset {lowest} or higher; pass --opset "
                            f"{lowest} or higher (default {DEFAULT_OPSET}) or drop {feature.split()[0]}")


@dataclass(frozen=True)
class NMSSettings:
    """Thresholds baked into an end-to-end ONNX graph (single-label, class-aware, as detect.py uses)."""

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 300


class _NonMaxSuppressionOp(torch.autograd.Function):
    """Eager: torchvision NMS per image and class; ONNX: one ``NonMaxSuppression`` node.

    Returns ``selected [K, 3]`` int64 rows (image, class, box) as the ONNX operator does.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_thres: float,
                score_thres: float) -> torch.Tensor:
        rows = []
        for image_index in range(boxes.shape[0]):
            cls_idx, box_idx = (scores[image_index] > score_thres).nonzero(as_tuple=True)
            box_scores = scores[image_index, cls_idx, box_idx]
            keep = torchvision.ops.batched_nms(boxes[image_index, box_idx], box_scores, cls_idx, iou_thres)
            keep = _first_per_class(keep, cls_idx, max_per_class)
            image_col = torch.full_like(keep, image_index)
            rows.append(torch.stack((image_col, cls_idx[keep], box_idx[keep]), 1))
        return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_thres: float, score_thres: float):
        max_output = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_thres], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([score_thres], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_output, iou, score, center_point_box_i=0)


def _first_per_class(keep: torch.Tensor, cls_idx: torch.Tensor, limit: int) -> torch.Tensor:
    """Cap kept indices (sorted by score) at ``limit`` per class, as ``max_output_boxes_per_class`` does."""
    kept_cls = cls_idx[keep]
    rank = torch.zeros_like(keep)
    for cls in kept_cls.unique():
        members = (kept_cls == cls).nonzero(as_tuple=True)[0]
        rank[members] = torch.arange(len(members), device=keep.device)
    return keep[rank < limit]


class EndToEndDetector(nn.Module):
    """Wrap a decoded-output detector so its graph ends with NMS and a fixed-size detection table."""

    def __init__(self, detector: nn.Module, nc: int, settings: NMSSettings = NMSSettings()):
        super().__init__()
        self.detector = detector
        self.nc = nc
        self.settings = settings

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.detector(images)
        pred = pred[0] if isinstance(pred, (tuple, list)) else pred
        boxes = _xywh_to_xyxy(pred[..., :4])
        objectness = pred[..., 4]
        best_score, best_cls = (pred[..., 5:] * pred[..., 4:5]).max(-1)
        candidate = (objectness > self.settings.conf_thres) & (best_score > self.settings.conf_thres)
        best_score = best_score * candidate
        class_ids = torch.arange(self.nc, device=pred.device)[None, :, None]
        per_class = (class_ids == best_cls[:, None, :]) * best_score[:, None, :]
        selected = _NonMaxSuppressionOp.apply(boxes, per_class, self.settings.max_det, self.settings.iou_thres,
                                              self.settings.conf_thres)
        image_idx, box_idx = selected[:, 0], selected[:, 2]
        kept = torch.zeros_like(best_score).index_put((image_idx, box_idx), best_score[image_idx, box_idx])
        k = min(self.settings.max_det, pred.shape[1])
        top_scores, top_idx = kept.topk(k, dim=1)
        valid = top_scores > 0
        top_boxes = boxes.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, 4))
        top_cls = best_cls.gather(1, top_idx).to(pred.dtype)
        table = torch.cat((top_boxes, top_scores.unsqueeze(-1), top_cls.unsqueeze(-1)), -1)
        return table * valid.unsqueeze(-1).to(pred.dtype), valid.sum(1)


def _xywh_to_xyxy(xywh: torch.Tensor) -> torch.Tensor:
    xy, wh = xywh[..., :2], xywh[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def export_onnx(model: nn.Module, images: torch.Tensor, file: str | Path, metadata: ExportMetadata,
                opset: int = DEFAULT_OPSET, dynamic: Sequence[str] = (), simplify: bool = False,
                nms: NMSSettings | None = None) -> Path:
    """Export a prepared detector/classifier to ``file``; returns the path (sidecar written beside it).

    ``images`` fixes the traced shape and dtype (FP16 only on CUDA: the caller checks). ``dynamic`` names the
    free input axes ("batch", "height", "width"; v7.0's ``--dynamic`` is all three). ``nms`` wraps a detector
    in :class:`EndToEndDetector`.
    """
    import onnx

    file = Path(file)
    module = EndToEndDetector(model, len(metadata.names), nms) if nms is not None else model
    output_names = ["detections", "num_dets"] if nms is not None else ["output0"]
    axes = _dynamic_axes(output_names, dynamic, detector_boxes=nms is None and metadata.task == "detect")
    try:
        torch.onnx.export(module, (images,), str(file), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=output_names, dynamic_axes=axes or None, do_constant_folding=True)
    except torch.onnx.errors.OnnxExporterError as exc:
        if opset >= DEFAULT_OPSET:  # at the default or above, an operator the exporter refuses is a bug of ours
            raise
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].split("[Caused by")[0].strip()[:200]
        raise FlagError(f"--opset {opset}: this model cannot be written at opset {opset} ({reason}); pass a higher "
                        f"--opset, e.g. the default {DEFAULT_OPSET}") from exc
    graph = onnx.load(str(file))
    onnx.checker.check_model(graph)
    if simplify:
        graph = simplify_onnx(graph)
    embed_metadata(graph, metadata)
    onnx.save(graph, str(file))
    write_metadata(file, metadata)
    LOGGER.info("ONNX saved to %s (opset %d)", file, opset)
    return file


def _dynamic_axes(output_names: list[str], dynamic: Sequence[str], detector_boxes: bool) -> dict:
    """``torch.onnx.export``'s dynamic axes: the named input axes, every output's batch, and (free height and
    width) the box count of a detector's decoded output, as YOLOv5 v7.0 names them."""
    unknown = set(dynamic) - {"batch", "height", "width"}
    if unknown:
        raise ValueError(f"unknown dynamic axes {sorted(unknown)}")
    axes: dict[str, dict[int, str]] = {}
    if "batch" in dynamic:
        axes["images"] = {0: "batch"}
        for name in output_names:
            axes[name] = {0: "batch"}
    for index, axis in ((2, "height"), (3, "width")):
        if axis in dynamic:
            axes.setdefault("images", {})[index] = axis
    if detector_boxes and {"height", "width"} & set(dynamic):
        axes.setdefault(output_names[0], {})[1] = "anchors"
    return axes


def simplify_onnx(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal by onnxslim (the maintained successor of onnx-simplifier)."""
    import onnxslim

    return onnxslim.slim(graph)


def export(job: ExportJob) -> dict[str, Path]:
    """The ONNX graph (FP16 only on CUDA); with --int8, when ``--include onnx`` asked for it (not only the
    engine built from it), its ONNX Runtime INT8 copy too."""
    options = job.options
    precision = "fp16" if options.half and job.device.type == "cuda" else "fp32"
    metadata = job.metadata(FORMAT, precision)
    model, images = job.on_device(precision == "fp16")
    nms = options.nms_settings if options.nms else None
    done = {FORMAT.name: export_onnx(model, images, job.paths[FORMAT.name], metadata, options.opset,
                                     options.dynamic_axes(), options.simplify, nms)}
    if options.int8 and job.requested(FORMAT):
        done[FORMAT.int8_key] = _quantize(job, done[FORMAT.name])
    return done


def _quantize(job: ExportJob, onnx_file: Path) -> Path:
    """ONNX Runtime's static INT8 (QDQ) copy, calibrated on --data; its fastest CPU runtime is measured and
    recorded in its sidecar."""
    from utils.export.quantize import quantize_onnx_int8
    from utils.export.runtime import record_cpu_runtime

    files, keep = job.calibration()
    quantized = quantize_onnx_int8(onnx_file, job.paths[FORMAT.int8_key], files, job.options.imgsz, keep_layers=keep,
                                   transform=job.prepare_image)
    record_cpu_runtime(quantized, job.cpu_runners(quantized), *job.runtime_check())
    return quantized


def export_qat(job: ExportJob) -> dict[str, Path]:
    """A quantization-aware-trained detector's trained QDQ graph (the other formats of a QAT export are built from
    it), with its fastest CPU runtime recorded."""
    from utils.export.qdq import QDQ_OPSET, export_qdq_onnx
    from utils.export.runtime import record_cpu_runtime

    metadata = job.metadata(FORMAT, "int8")
    metadata.opset, metadata.quantization = QDQ_OPSET, dict(job.model.quantization)
    axes = job.options.dynamic_axes()
    onnx_file = export_qdq_onnx(job.model, job.images, job.paths[FORMAT.int8_key], metadata, "batch" in axes,
                                "height" in axes)
    record_cpu_runtime(onnx_file, job.cpu_runners(onnx_file), *job.runtime_check())
    return {FORMAT.int8_key: onnx_file}


class ONNXRuntimeBackend(Backend):
    """An ``.onnx`` file (FP32, FP16 or INT8 QDQ) on ONNX Runtime; CUDA provider when asked for and present."""

    format = "onnx"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None):
        import onnxruntime

        super().__init__(weights, read_metadata(weights), device, fp16)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(weights), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.session.run(None, {self.input_name: self._to_numpy(images)})
        return [self._to_torch(o) for o in outputs]


FORMAT = ExportFormat(
    name="onnx", title="ONNX", suffix=".onnx", backend=ONNXRuntimeBackend, export=export, export_qat=export_qat,
    half_devices=("cuda",), int8="ONNX Runtime static QDQ", int8_suffix="_int8.onnx", opset=True, nms=True,
    devices=("cpu", "cuda"), runtime="onnxruntime", check_flags=check_flags,
    export_requires=(Requirement("onnx", "pip install onnx"),),
    run_requires=(Requirement("onnxruntime", "pip install onnxruntime (or onnxruntime-gpu)"),))
