"""TensorRT engine builder (Python API): FP32/FP16/INT8, dynamic-shape profiles, entropy calibration.

Engines are tied to the GPU model and TensorRT version they are built with, so they must be built on the
deployment device (for Jetson: copy the ONNX over and run ``to_trt.sh`` there). Without a CUDA GPU or the
``tensorrt`` package this module raises :class:`~utils.export.spec.MissingPackageError` saying so (one
``error:`` line from the scripts); it never falls back silently. The engine is built from the run's ONNX export
(a QAT checkpoint's: its trained QDQ graph, no calibration).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from utils.common.errors import FlagError
from utils.export.backend import Backend
from utils.export.common import ImageTransform, letterbox_tensor, read_metadata, write_metadata
from utils.export.onnx import FORMAT as ONNX
from utils.export.spec import ExportFormat, MissingPackageError, Requirement

if TYPE_CHECKING:
    from utils.export.job import ExportJob

LOGGER = logging.getLogger(__name__)

BUILD_ON_DEVICE_HINT = ("build the engine on the target device: copy the .onnx there and run "
                        "`./to_trt.sh --onnx model.onnx --fp16 --output model.engine` (or export.py --include engine "
                        "on a machine with an NVIDIA GPU and TensorRT)")


@dataclass(frozen=True)
class ShapeProfile:
    """Input shapes (bs, 3, h, w) of one TensorRT optimisation profile."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def dynamic_axes(self) -> list[str]:
        """The input axes this profile leaves free (min differs from max): what the engine really accepts."""
        return [axis for index, axis in ((0, "batch"), (2, "height"), (3, "width"))
                if self.min[index] != self.max[index]]


def default_profile(imgsz: tuple[int, int], batch_size: int) -> ShapeProfile:
    """YOLOv5 v7.0's ``--dynamic`` engine profile: batch 1 .. ``batch_size`` (optimised for half of it) at the
    export size. Height and width stay fixed even though the ONNX allows others; ``--min/opt/max-shape``
    (or ``to_trt.sh --shapes``) open them."""
    height, width = imgsz
    if batch_size <= 1:
        LOGGER.warning("TensorRT --dynamic: the profile's largest batch is --batch-size (1); pass --batch-size N "
                       "for batches of up to N")
    return ShapeProfile(min=(1, 3, height, width), opt=(max(1, batch_size // 2), 3, height, width),
                        max=(batch_size, 3, height, width))


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a :class:`MissingPackageError` (a user error, also a RuntimeError) telling the
    user to build on the device: no GPU or no TensorRT here is the machine's limit, not a bug."""
    if not torch.cuda.is_available():
        raise MissingPackageError(f"TensorRT needs an NVIDIA GPU and none is visible here; {BUILD_ON_DEVICE_HINT}")
    try:
        import tensorrt
    except ImportError:
        raise MissingPackageError(f"the 'tensorrt' Python package is not installed; {BUILD_ON_DEVICE_HINT}") from None
    return tensorrt


def device_description() -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine (engines are only valid there)."""
    trt = import_tensorrt()
    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def check_engine_compatibility(engine_info: dict[str, Any], runtime_info: dict[str, Any], engine: str = "") -> None:
    """Refuse an engine built with another TensorRT version or GPU than the ones running it."""
    mismatches = [f"{key}: engine built with {engine_info.get(key)!r}, this device has {runtime_info.get(key)!r}"
                  for key in ("tensorrt", "gpu", "compute_capability")
                  if _normalised(key, engine_info.get(key)) != _normalised(key, runtime_info.get(key))]
    if mismatches:
        raise RuntimeError(f"{engine or 'engine'} does not match this device ({'; '.join(mismatches)}); rebuild it "
                           f"on this device with to_trt.sh (./to_trt.sh --onnx model.onnx --output model.engine)")


def _normalised(key: str, value: Any) -> str:
    """Versions compared on major.minor.patch (trtexec prints 3 parts, the Python package 4)."""
    text = str(value).strip()
    return ".".join(text.split(".")[:3]) if key == "tensorrt" else text


def make_calibrator(trt: Any, files: Sequence[str | Path], imgsz: tuple[int, int], batch: int, cache: Path,
                    transform: ImageTransform = letterbox_tensor):
    """An ``IInt8EntropyCalibrator2`` over images prepared by ``transform`` (as the model's task validates: letterbox
    for detectors, centre crop for classifiers); reuses/writes ``cache`` so reruns skip it."""

    class ImageEntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = [files[i:i + batch] for i in range(0, len(files) - batch + 1, batch)]
            self.index = 0
            self.device_buffer = torch.empty((batch, 3, *imgsz), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            images = torch.stack([transform(f, imgsz) for f in self.batches[self.index]])
            self.device_buffer.copy_(images)
            self.index += 1
            return [int(self.device_buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

    return ImageEntropyCalibrator()


def build_engine(onnx_file: str | Path, engine_file: str | Path, half: bool = False, int8: bool = False,
                 workspace_gb: float = 4.0, profile: ShapeProfile | None = None,
                 calibration_files: Sequence[str | Path] = (), calibration_cache: str | Path | None = None,
                 transform: ImageTransform = letterbox_tensor) -> Path:
    """Build ``engine_file`` from ``onnx_file`` and write its sidecar (with TensorRT version and GPU)."""
    trt = import_tensorrt()
    onnx_file, engine_file = Path(onnx_file), Path(engine_file)
    metadata = read_metadata(onnx_file)
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_file.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _add_profile(builder, network, config, profile)
    precision = _set_precision(trt, builder, config, half, int8)
    if int8 and calibration_files:  # an explicitly quantized (QDQ) ONNX carries its own scales
        size = tuple(metadata["imgsz"])
        batch = profile.opt[0] if profile else int(metadata["batch"])
        cache = Path(calibration_cache or engine_file.with_suffix(".cache"))
        config.int8_calibrator = make_calibrator(trt, list(calibration_files), size, batch, cache, transform)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file} (see the log above)")
    engine_file.write_bytes(bytes(serialized))
    metadata.update(format="engine", precision=precision, engine=device_description(),
                    profile=profile.to_dict() if profile else None, dynamic=profile.dynamic_axes() if profile else [])
    write_metadata(engine_file, metadata)
    return engine_file


def network_flags(trt: Any) -> int:
    """``create_network`` flags: explicit batch where the ONNX parser needs it (TensorRT 8.x: JetPack 5 and 6.0);
    TensorRT 10 is always explicit-batch and only warns about the deprecated flag, so it gets none."""
    major = int(str(trt.__version__).split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return 1 << int(flag) if major < 10 and flag is not None else 0


def _add_profile(builder, network, config, profile: ShapeProfile | None) -> None:
    if profile is None:
        return
    optimisation = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        optimisation.set_shape(network.get_input(index).name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimisation)


def _set_precision(trt, builder, config, half: bool, int8: bool) -> str:
    if int8:
        if not getattr(builder, "platform_has_fast_int8", True):  # deprecated attribute; may go away
            LOGGER.warning("this GPU has no fast INT8; the engine may be slower than FP16")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot take fall back to FP16, not FP32
        return "int8"
    if half:
        config.set_flag(trt.BuilderFlag.FP16)
        return "fp16"
    return "fp32"



def export(job: ExportJob) -> dict[str, Path]:
    """The engine built from the run's ONNX export; --int8 calibrates on the --data train images."""
    return {FORMAT.name: _build(job, job.done[ONNX.name], calibrate=True)}


def export_qat(job: ExportJob) -> dict[str, Path]:
    """A QAT checkpoint's engine: built as INT8 from the scales of its trained QDQ graph."""
    return {FORMAT.name: _build(job, job.done[ONNX.int8_key], calibrate=False)}


def _build(job: ExportJob, onnx_file: Path, calibrate: bool) -> Path:
    options = job.options
    profile = None
    if options.dynamic_axes():  # v7.0: a batch profile at the export size; --min/opt/max-shape override it
        default = default_profile(options.imgsz, options.batch_size)
        profile = ShapeProfile(min=options.min_shape or default.min, opt=options.opt_shape or default.opt,
                               max=options.max_shape or default.max)
    calibration = job.calibration_files() if options.int8 and calibrate else []
    batch = profile.opt[0] if profile else options.batch_size  # the calibrator's batch
    if calibration and len(calibration) < batch:  # the ONNX is written by now: export_model removes it again
        raise FlagError(f"--int8: the calibration set holds {len(calibration)} image(s), less than one batch of the "
                        f"engine's optimisation profile ({batch}); add training images, raise --calib-images or "
                        "lower --opt-shape")
    int8 = options.int8 or not calibrate  # a QDQ ONNX builds as INT8 from its own scales
    return build_engine(onnx_file, job.paths[FORMAT.name], options.half, int8, options.workspace, profile,
                        calibration, transform=job.prepare_image)


class TensorRTBackend(Backend):
    """A serialized TensorRT engine; refused when built for another TensorRT version or GPU."""

    format = "engine"

    def __init__(self, weights: Path, device: str = "cuda:0", fp16: bool = False, threads: int | None = None):
        trt = import_tensorrt()
        metadata = read_metadata(weights)
        check_engine_compatibility(metadata.get("engine") or {}, device_description(), str(weights))
        super().__init__(weights, metadata, device if str(device).startswith("cuda") else "cuda:0", fp16)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(weights).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{weights}: TensorRT could not deserialize the engine; rebuild it with to_trt.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if n != self.input_name]
        self.input_dtype = torch.float16 if metadata.get("precision") == "fp16" else torch.float32
        self.dynamic_batch = self.dynamic_batch or -1 in tuple(self.engine.get_tensor_shape(self.input_name))[:1]

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        trt = import_tensorrt()
        images = images.to(self.device, self.input_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            output = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, output.data_ptr())
            outputs.append(output)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.weights}: TensorRT execution failed")
        stream.synchronize()
        return outputs


_TENSORRT = Requirement("tensorrt", BUILD_ON_DEVICE_HINT, probe=import_tensorrt)

FORMAT = ExportFormat(
    name="engine", title="TensorRT", suffix=".engine", backend=TensorRTBackend, export=export, export_qat=export_qat,
    built_from=(ONNX.name,), qat_built_from=(ONNX.name,), int8="TensorRT calibrator", opset=True, devices=("cuda",),
    runtime="tensorrt", export_requires=(_TENSORRT,), run_requires=(_TENSORRT,))
