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

The backend runs IR folders and, on the CPU, ``.onnx`` files whose export measured OpenVINO as their fastest
runtime (:mod:`utils.export.runtime`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from utils.common.signal_stack import install_own_signal_stack
from utils.export.backend import Backend, single_file
from utils.export.common import ExportMetadata, ImageTransform, letterbox_tensor, read_metadata, write_metadata
from utils.export.onnx import DEFAULT_OPSET, export_onnx
from utils.export.onnx import FORMAT as ONNX
from utils.export.spec import ExportFormat, Requirement

if TYPE_CHECKING:
    from utils.export.job import ExportJob

LOGGER = logging.getLogger(__name__)


@contextmanager
def openvino_core() -> Iterator[Any]:
    """An ``openvino.Core`` for the block; on leaving it (however), this thread's alternate signal stack is the
    process's own again, so that the CPU plugins the block created cannot leave an unmapped one behind when they are
    destroyed (:mod:`utils.common.signal_stack`). Every OpenVINO compile of this project goes through here."""
    import openvino

    try:
        yield openvino.Core()
    finally:
        install_own_signal_stack()


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
                           keep_layers: Sequence[int] = (), transform: ImageTransform = letterbox_tensor) -> Path:
    """Replace the FP32 IR in ``folder`` by its INT8 copy, calibrated on ``calibration_files``; sidecar says int8.

    Activation ranges are the min/max over all calibration images (NNCF's default averages per-image ranges,
    which clipped enough on yolov5s to cost 2.5 points of mAP@.5; min/max costs 0.3-0.7). Layers in
    ``keep_layers`` (``--int8-keep``) stay in floating point.
    """
    import nncf
    import openvino as ov

    from utils.export.quantize import CalibrationReader

    folder = Path(folder)
    metadata = read_metadata(folder)
    reader = CalibrationReader.for_artifact(calibration_files, metadata, imgsz, transform)
    xml = next(folder.glob("*.xml"))
    LOGGER.info("OpenVINO INT8 (NNCF): calibrating on %d images; layers %s kept in floating point",
                len(calibration_files), list(keep_layers))
    with openvino_core() as core:
        ov_model = core.read_model(str(xml))
    quantized = nncf_quantize(ov_model, reader, len(calibration_files) // reader.batch_size, keep_layers,
                              lambda item: item["images"])
    with tempfile.TemporaryDirectory(prefix="ov-int8-", dir=folder) as tmp:  # the FP32 .bin is memory-mapped
        ov.save_model(quantized, str(Path(tmp) / xml.name), compress_to_fp16=False)
        for suffix in (".xml", ".bin"):
            (Path(tmp) / xml.name).with_suffix(suffix).replace(xml.with_suffix(suffix))
    metadata.update(precision="int8", quantizer=f"nncf {nncf.__version__}", calibration_images=len(calibration_files),
                    fp32_layers=sorted(int(i) for i in keep_layers))
    write_metadata(folder, metadata)
    return folder


def nncf_quantize(ov_model: Any, batches: Iterable[Any], count: int, keep_layers: Sequence[int] = (),
                  transform: Callable[[Any], Any] | None = None) -> Any:
    """``ov_model`` quantized by NNCF on the ``count`` items of ``batches`` (a re-iterable: NNCF walks it more
    than once; ``transform`` turns an item into the input array), activation ranges min/max over all of them,
    layers in ``keep_layers`` left in floating point. The one place export and the pruning tools' latency
    measurement (``--runtime openvino-int8``) quantize, so both time the same INT8 graph."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    ignored = nncf.IgnoredScope(patterns=[rf"^/model\.{int(i)}/.*" for i in keep_layers], validate=False)
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # it logs one INFO line per node left unquantized
    try:
        return nncf.quantize(ov_model, nncf.Dataset(batches, transform), subset_size=max(1, count),
                             ignored_scope=ignored, advanced_parameters=AdvancedQuantizationParameters(
                                 activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))
    finally:
        nncf_logger.setLevel(level)
        install_own_signal_stack()  # NNCF compiles the model with its own Cores (see openvino_core)


def export(job: ExportJob) -> dict[str, Path]:
    """FP32/FP16 IR from the plain ONNX; with --int8, that IR quantized by OpenVINO's own quantizer (NNCF)."""
    options = job.options
    metadata = job.metadata(FORMAT, "fp16" if options.half else "fp32")
    folder = export_openvino(job.model, job.images, job.paths[FORMAT.name], metadata, options.half,
                             options.dynamic_axes(), onnx_file=_plain_onnx(job))
    if options.int8:
        files, keep = job.calibration()
        folder = quantize_openvino_int8(folder, files, options.imgsz, keep, job.prepare_image)
    return {FORMAT.name: folder}


def _plain_onnx(job: ExportJob) -> Path | None:
    """The run's ONNX export when OpenVINO can reuse it as is (FP32, no NMS), else None (export a fresh one)."""
    onnx_file = job.done.get(ONNX.name)
    if onnx_file is not None and not job.options.nms and read_metadata(onnx_file)["precision"] == "fp32":
        return onnx_file
    return None


def export_qat(job: ExportJob) -> dict[str, Path]:
    """A QAT checkpoint's IR: converted from its trained QDQ ONNX (written first by the ONNX format)."""
    metadata = job.metadata(FORMAT, "int8")
    metadata.quantization = dict(job.model.quantization)
    return {FORMAT.name: export_openvino(job.model, job.images, job.paths[FORMAT.name], metadata,
                                         onnx_file=job.done[ONNX.int8_key])}


class OpenVINOBackend(Backend):
    """An OpenVINO IR folder (or an ``.onnx`` file, which OpenVINO reads directly); FP32 inference precision
    unless ``fp16`` (the CPU plugin defaults to BF16 on CPUs that have it, which moves outputs by ~1 pixel)."""

    format = "openvino"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None,
                 cpu_default_precision: bool = False):
        super().__init__(weights, read_metadata(weights), device, fp16)
        model_file = Path(weights) if Path(weights).is_file() else single_file(Path(weights), FORMAT.marker)
        config: dict[str, Any] = {} if cpu_default_precision else {"INFERENCE_PRECISION_HINT": "f16" if fp16 else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        with openvino_core() as core:
            self.compiled = core.compile_model(str(model_file), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        results = self.request.infer({0: images.detach().cpu().float().numpy()})
        return [self._to_torch(results[output].copy()) for output in self.compiled.outputs]


_OPENVINO = Requirement("openvino", "pip install openvino")

FORMAT = ExportFormat(
    name="openvino", title="OpenVINO", suffix="_openvino_model", marker="*.xml", backend=OpenVINOBackend,
    export=export, export_qat=export_qat, qat_built_from=(ONNX.name,), int8="OpenVINO NNCF", opset=True,
    also_runs=(".onnx",), export_requires=(_OPENVINO,), run_requires=(_OPENVINO,))
