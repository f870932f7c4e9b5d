"""Inference backends: one class per runtime behind one interface, chosen by :func:`load_backend`.

Every backend takes float BCHW images in [0, 1] (torch) and returns torch tensors on the backend's device:
``(bs, N, 5 + nc)`` decoded detections for detectors (the PyTorch eval layout, so the same NMS, val and
predict code serve every artifact), ``(detections [bs, max_det, 6], num_dets [bs])`` for ONNX graphs exported
with ``--nms``, and logits (a dict head -> logits for multi-head classifiers) for classifiers. Names, stride,
image size and batch come from the export sidecar (see :mod:`utils.export.common`). A static-batch artifact
handed a different batch runs it in chunks of its own batch size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.common.errors import FlagError, MissingFileError
from utils.common.torch_utils import fastest_memory_format
from utils.export.common import model_stride, read_metadata

LOGGER = logging.getLogger(__name__)

BackendOutput = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


class Backend:
    """Common part: metadata, input checks, static-batch chunking, output packing, warm-up."""

    format = "base"

    def __init__(self, weights: Path, metadata: dict[str, Any], device: str = "cpu", fp16: bool = False):
        self.weights = Path(weights)
        self.metadata = metadata
        self.device = torch.device(device)
        self.fp16 = fp16
        self.names: list[str] = list(metadata.get("names") or [])
        self.heads: list[dict[str, Any]] | None = metadata.get("heads")
        self.stride = int(metadata.get("stride") or 32)
        imgsz = metadata.get("imgsz")
        self.imgsz: tuple[int, int] | None = tuple(imgsz) if imgsz else None
        self.task: str = metadata.get("task", "detect")
        dynamic = metadata.get("dynamic") or []
        self.dynamic_batch = "batch" in dynamic
        self.dynamic_hw = "height" in dynamic
        self.batch = int(metadata.get("batch") or 1)
        self.end2end = bool(metadata.get("nms"))

    def __call__(self, images: torch.Tensor) -> BackendOutput:
        """Run a batch; splits it when the artifact has a fixed batch size different from ``len(images)``."""
        self._check_input(images)
        if self.dynamic_batch or images.shape[0] == self.batch:
            outputs = self._forward(images)
        else:
            outputs = self._forward_in_chunks(images)
        return self._pack(outputs)

    def warmup(self, runs: int = 1) -> None:
        """Run zeros through the model so lazy initialisation is not timed as the first image."""
        height, width = self.imgsz or (640, 640)
        dummy = torch.zeros(self.batch, 3, height, width, device=self.device)
        for _ in range(runs):
            self(dummy.half() if self.fp16 else dummy)

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.weights}: expected images of shape (bs, 3, h, w), got {tuple(images.shape)}")
        if self.imgsz and not self.dynamic_hw and tuple(images.shape[2:]) != self.imgsz:
            raise ValueError(f"{self.weights} was exported for {self.imgsz[0]}x{self.imgsz[1]} inputs, got "
                             f"{images.shape[2]}x{images.shape[3]}: letterbox to that size or re-export with "
                             "--imgsz (or --dynamic for ONNX/OpenVINO)")

    def _forward_in_chunks(self, images: torch.Tensor) -> list[torch.Tensor]:
        total = images.shape[0]
        pieces: list[list[torch.Tensor]] = []
        for start in range(0, total, self.batch):
            chunk = images[start:start + self.batch]
            missing = self.batch - chunk.shape[0]
            if missing:  # pad the last chunk to the fixed batch, drop the padded rows afterwards
                chunk = torch.cat((chunk, chunk.new_zeros(missing, *chunk.shape[1:])))
            outputs = self._forward(chunk)
            pieces.append([o[: self.batch - missing] for o in outputs])
        return [torch.cat(parts) for parts in zip(*pieces)]

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _pack(self, outputs: list[torch.Tensor]) -> BackendOutput:
        if len(outputs) == 1:
            return outputs[0]
        if self.task == "classify" and self.heads and len(self.heads) == len(outputs):
            return {str(h.get("name", i)): o for i, (h, o) in enumerate(zip(self.heads, outputs))}
        return tuple(outputs)

    def _to_numpy(self, images: torch.Tensor) -> np.ndarray:
        dtype = np.float16 if self.metadata.get("precision") == "fp16" else np.float32
        return np.ascontiguousarray(images.detach().cpu().numpy().astype(dtype, copy=False))

    def _to_torch(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array)).to(self.device)


class PyTorchBackend(Backend):
    """A ``.pt`` checkpoint (ours or YOLOv5 v7.0), fused, eval mode; any batch and (stride-multiple) size."""

    format = "pytorch"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False):
        from models.yolo import task_of
        from utils.weights.checkpoint import load_checkpoint

        loaded = load_checkpoint(weights, fuse=True)
        model = loaded.model
        metadata = {"names": loaded.meta.get("names") or list(getattr(model, "names", [])),
                    "stride": model_stride(model), "task": task_of(model), "imgsz": None, "batch": 1,
                    "dynamic": ["batch", "height", "width"], "heads": loaded.meta.get("heads"),
                    "precision": "fp16" if fp16 else "fp32"}
        super().__init__(weights, metadata, device, fp16)
        self.model = model.to(self.device)
        if fp16:
            self.model.half()
        self.memory_format = fastest_memory_format(self.model)

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = images.to(self.device, torch.float16 if self.fp16 else torch.float32)
        output = self.model(images.contiguous(memory_format=self.memory_format))
        if self.task == "detect" and isinstance(output, (tuple, list)):
            return [output[0]]
        if isinstance(output, dict):
            self.heads = self.heads or [{"name": k} for k in output]
            return list(output.values())
        return list(output) if isinstance(output, (tuple, list)) else [output]


class TorchScriptBackend(Backend):
    """A traced ``.torchscript`` file written by export.py."""

    format = "torchscript"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False):
        super().__init__(weights, read_metadata(weights), device, fp16)
        self.model = torch.jit.load(str(weights), map_location=self.device).eval()
        self.input_dtype = torch.float16 if self.metadata.get("precision") == "fp16" else torch.float32

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        output = self.model(images.to(self.device, self.input_dtype))
        return list(output) if isinstance(output, (tuple, list)) else [output]


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


class OpenVINOBackend(Backend):
    """An OpenVINO IR folder; FP32 inference precision unless ``fp16`` (the CPU plugin defaults to BF16 on
    CPUs that have it, which moves outputs by ~1 pixel)."""

    format = "openvino"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None,
                 cpu_default_precision: bool = False):
        import openvino

        super().__init__(weights, read_metadata(weights), device, fp16)
        # an IR folder, or an .onnx file that OpenVINO reads directly (INT8 ONNX whose measured runtime it is)
        xml = Path(weights) if Path(weights).suffix == ".onnx" else _single_file(Path(weights), "*.xml")
        config: dict[str, Any] = {} if cpu_default_precision else {"INFERENCE_PRECISION_HINT": "f16" if fp16 else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = openvino.Core()
        self.compiled = core.compile_model(str(xml), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        results = self.request.infer({0: images.detach().cpu().float().numpy()})
        return [self._to_torch(results[output].copy()) for output in self.compiled.outputs]


class NCNNBackend(Backend):
    """An NCNN folder (``model.ncnn.param/.bin``); NCNN has no batch axis, so images run one at a time."""

    format = "ncnn"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None):
        import ncnn

        metadata = read_metadata(weights)
        metadata["batch"], metadata["dynamic"] = 1, []
        super().__init__(weights, metadata, device, fp16)
        self.ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.use_fp16_storage = fp16
        self.net.opt.use_fp16_arithmetic = fp16
        if threads:
            self.net.opt.num_threads = threads
        folder = Path(weights)
        if self.net.load_param(str(_single_file(folder, "*.param"))) or self.net.load_model(
                str(_single_file(folder, "*.bin"))):
            raise RuntimeError(f"{folder}: NCNN could not load the .param/.bin pair")
        self.input_name = self.net.input_names()[0]
        self.output_names = self.net.output_names()

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        per_image = []
        for image in images.detach().cpu().float().numpy():
            # ncnn.Mat wraps the array's buffer without keeping the array alive: hold it in a name until the
            # clone has copied it (a temporary, e.g. from ascontiguousarray, may be freed first: garbage input)
            pixels = np.ascontiguousarray(image)
            extractor = self.net.create_extractor()
            extractor.input(self.input_name, self.ncnn.Mat(pixels).clone())
            outputs = []
            for name in self.output_names:
                status, mat = extractor.extract(name)
                if status != 0:
                    raise RuntimeError(f"{self.weights}: NCNN failed to compute output {name} (status {status})")
                outputs.append(torch.from_numpy(np.array(mat)).unsqueeze(0))
            per_image.append(outputs)
        return [torch.cat(parts).to(self.device) for parts in zip(*per_image)]


class TensorRTBackend(Backend):
    """A serialized TensorRT engine; refused when built for another TensorRT version or GPU."""

    format = "engine"

    def __init__(self, weights: Path, device: str = "cuda:0", fp16: bool = False):
        from utils.export.tensorrt import check_engine_compatibility, device_description, import_tensorrt

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
        from utils.export.tensorrt import import_tensorrt

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


class BackendModule(torch.nn.Module):
    """Lets an exported-model backend stand where code expects an ``nn.Module`` (eval/train are no-ops)."""

    def __init__(self, backend: Any):
        super().__init__()
        self.backend = backend

    def forward(self, images: torch.Tensor) -> Any:
        return self.backend(images)


def _single_file(folder: Path, pattern: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        raise MissingFileError(f"{folder}: expected exactly one {pattern} file, found {[m.name for m in matches]}")
    return matches[0]


def backend_class(weights: str | Path) -> type[Backend]:
    """Which backend serves ``weights``: by suffix for files, by contents for folders."""
    path = Path(weights)
    if path.is_dir():
        if any(path.glob("*.xml")):
            return OpenVINOBackend
        if any(path.glob("*.param")):
            return NCNNBackend
        raise FlagError(f"{path}: a folder artifact must hold an OpenVINO .xml or an NCNN .param file")
    by_suffix = {".pt": PyTorchBackend, ".torchscript": TorchScriptBackend, ".onnx": ONNXRuntimeBackend,
                 ".engine": TensorRTBackend}
    if path.suffix not in by_suffix:
        raise FlagError(f"{path}: unknown artifact type; expected {', '.join(by_suffix)} or an export folder")
    return by_suffix[path.suffix]


def load_backend(weights: str | Path, device: str = "cpu", fp16: bool = False,
                 threads: int | None = None) -> Backend:
    """Open any artifact written by export.py (or a .pt checkpoint) behind the :class:`Backend` interface.

    ``threads`` caps the CPU threads of ONNX Runtime, OpenVINO and NCNN (PyTorch: ``torch.set_num_threads``).
    """
    path = Path(weights)
    if not path.exists():
        raise MissingFileError(f"{path} not found")
    cls = backend_class(path)
    if cls is ONNXRuntimeBackend and torch.device(device).type == "cpu" and _prefers_openvino(path):
        cls = OpenVINOBackend
    if cls in (ONNXRuntimeBackend, OpenVINOBackend, NCNNBackend):
        return cls(path, device=device, fp16=fp16, threads=threads)
    return cls(path, device=device, fp16=fp16)


def _prefers_openvino(onnx_file: Path) -> bool:
    """Whether export measured OpenVINO as this ONNX's fastest CPU runtime (INT8 files, ``cpu_runtime`` in the
    sidecar; see utils/export/runtime.py) and OpenVINO is installed here."""
    if read_metadata(onnx_file).get("cpu_runtime") != "openvino":
        return False
    try:
        import openvino  # noqa: F401
    except ImportError:
        LOGGER.info("%s runs fastest on OpenVINO, which is not installed: using ONNX Runtime", onnx_file)
        return False
    return True
