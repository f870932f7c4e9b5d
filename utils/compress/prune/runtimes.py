"""The runtimes a latency budget is measured on (``--runtime``): open a model, time it, profile it per node.

The pruning tools need three things of a runtime, and nothing else: open a module for a fixed batch-1 input
(exported the way ``export.py`` exports it), time whole calls with a stated thread count, and say how long
each graph node took (ONNX Runtime's session profiling, OpenVINO's performance counters). Keeping it to
that one small interface (:class:`Runtime`) lets a test register a fake runtime with known per-layer costs
(:func:`registered_runtime`), and adding a runtime is one subclass.

Timing follows :mod:`utils.export.runtime` and ``benchmarks/deploy.py``: several models are timed in
interleaved rounds (a busy moment of a shared machine hits them all alike), the first round is a warm-up,
the median is kept, and each call is followed by a short pause (``SETTLE_SECONDS``: ONNX Runtime's worker
threads spin after a call and would slow whatever runs next).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.common.errors import FlagError
from utils.common.timing import SETTLE_SECONDS, median_call_ms
from utils.export.onnx import DEFAULT_OPSET
from utils.export.spec import Requirement

LOGGER = logging.getLogger(__name__)

_ONNXRUNTIME = Requirement("onnxruntime", "pip install onnxruntime")
_OPENVINO = Requirement("openvino", "pip install openvino")
_NNCF = Requirement("nncf", "pip install nncf")


class Runtime:
    """One CPU runtime at ``threads`` threads; subclasses open models and profile them.

    ``open`` returns a handle the other methods take; ``samples`` (batch-1 input arrays) calibrate runtimes
    that quantize (``calibrated``); without them a quantizing runtime calibrates on random inputs (enough to
    time a probe, whose values do not matter)."""

    name = ""
    requires: tuple[Requirement, ...] = ()
    calibrated = False  # whether open() wants real calibration images

    def __init__(self, threads: int):
        self.threads = threads

    def check(self) -> None:
        """Raise (before any work) when a package this runtime needs is not installed."""
        for requirement in self.requires:
            requirement.check(f"--runtime {self.name}")

    def version(self) -> str:
        """What a cached measurement is only valid for (the runtime's package versions)."""
        raise NotImplementedError

    def open(self, model: nn.Module, example: torch.Tensor, folder: Path,
             samples: Sequence[np.ndarray] | None = None) -> Any:
        """A handle running ``model`` (a prepared, eval-mode module) on ``example``-shaped batch-1 inputs; files
        go into ``folder`` (the caller's temporary folder)."""
        raise NotImplementedError

    def profile(self, handle: Any, runs: int) -> dict[str, float]:
        """Node name -> median ms per call over ``runs`` calls (after a warm-up)."""
        raise NotImplementedError

    def latency(self, handles: Sequence[Any], runs: int) -> list[float]:
        """Median ms per batch-1 call of each handle, timed in ``runs`` interleaved rounds after a warm-up."""
        timed = median_call_ms({str(index): handle for index, handle in enumerate(handles)}, runs, SETTLE_SECONDS)
        return [timed[str(index)]["median"] for index in range(len(handles))]


def export_graph(model: nn.Module, example: torch.Tensor, file: Path) -> Path:
    """The ONNX graph export.py writes for ``model`` (TorchScript-based exporter, opset 17, fixed shape, no
    simplification), so what is timed is what a user deploys."""
    torch.onnx.export(model, (example,), str(file), dynamo=False, opset_version=DEFAULT_OPSET,
                      input_names=["images"], do_constant_folding=True)
    return file


class ONNXRuntime(Runtime):
    """ONNX Runtime's CPU provider with ``threads`` intra-op threads and one inter-op thread (as its backend in
    :mod:`utils.export.onnx` runs); per-node times from its session profiling (kernel time per node)."""

    name = "onnxruntime"
    requires = (_ONNXRUNTIME,)

    def version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def _session(self, file: Path, profile_prefix: Path | None = None) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_prefix)
        return onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def open(self, model: nn.Module, example: torch.Tensor, folder: Path,
             samples: Sequence[np.ndarray] | None = None) -> Any:
        file = export_graph(model, example, Path(tempfile.mkdtemp(dir=folder)) / "model.onnx")
        session = self._session(file)
        inputs = {session.get_inputs()[0].name: example.numpy()}
        return _Handle(lambda: session.run(None, inputs), file, inputs)

    def profile(self, handle: Any, runs: int) -> dict[str, float]:
        session = self._session(handle.file, handle.file.with_name("profile"))
        for _ in range(runs + 1):
            session.run(None, handle.inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
        per_node: dict[str, list[float]] = {}
        for event in events:
            name = event.get("name", "")
            if event.get("cat") == "Node" and name.endswith("_kernel_time"):
                per_node.setdefault(name.removesuffix("_kernel_time"), []).append(event["dur"] / 1e3)
        return {name: statistics.median(values[1:] or values) for name, values in per_node.items()}  # [0]: warm-up


class OpenVINORuntime(Runtime):
    """OpenVINO's CPU plugin, FP32 (``INFERENCE_PRECISION_HINT`` f32, as its backend in
    :mod:`utils.export.openvino` runs), ``threads`` inference threads; per-node times from its performance
    counters (``PERF_COUNT``, as ``benchmarks/openvino_profile.py`` reads them)."""

    name = "openvino"
    requires = (_OPENVINO,)
    precision = "f32"  # INFERENCE_PRECISION_HINT

    def version(self) -> str:
        import openvino

        return f"openvino {openvino.get_version()}"

    def _convert(self, model: nn.Module, example: torch.Tensor, folder: Path,
                 samples: Sequence[np.ndarray] | None) -> Any:
        import openvino

        file = export_graph(model, example, Path(tempfile.mkdtemp(dir=folder)) / "model.onnx")
        return openvino.convert_model(str(file))

    def _compile(self, ov_model: Any, profiling: bool) -> Any:
        from utils.export.openvino import openvino_core

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": self.threads}
        if profiling:
            config["PERF_COUNT"] = True
        with openvino_core() as core:
            return core.compile_model(ov_model, "CPU", config)

    def open(self, model: nn.Module, example: torch.Tensor, folder: Path,
             samples: Sequence[np.ndarray] | None = None) -> Any:
        ov_model = self._convert(model, example, folder, samples)
        request = self._compile(ov_model, False).create_infer_request()
        inputs = {0: example.numpy()}
        return _Handle(lambda: request.infer(inputs), ov_model, inputs)

    def profile(self, handle: Any, runs: int) -> dict[str, float]:
        request = self._compile(handle.file, True).create_infer_request()
        per_node: dict[str, list[float]] = {}
        for run in range(runs + 1):
            request.infer(handle.inputs)
            if not run:
                continue
            for info in request.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    per_node.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e3)
        return {name: statistics.median(values) for name, values in per_node.items()}


class OpenVINOBf16Runtime(OpenVINORuntime):
    """OpenVINO's CPU plugin in bfloat16 (``INFERENCE_PRECISION_HINT`` bf16): its default on CPUs with AVX512-BF16
    or AMX, and there the fastest non-INT8 way to run a model, so the baseline a compressed model has to beat.
    Refused (``check``) on a CPU without bf16, where OpenVINO would silently run f32 under this name."""

    name = "openvino-bf16"
    precision = "bf16"

    def check(self) -> None:
        super().check()
        from utils.export.openvino import openvino_core

        with openvino_core() as core:
            capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            raise FlagError(f"--runtime {self.name}: this CPU has no bfloat16 support (OpenVINO would run f32); "
                            "use --runtime openvino")


class OpenVINOInt8Runtime(OpenVINORuntime):
    """The OpenVINO IR quantized by NNCF, as ``export.py --include openvino --int8`` writes it (the same
    quantizer settings: :func:`utils.export.openvino.nncf_quantize`), calibrated on the training images the
    tool is given (``samples``)."""

    name = "openvino-int8"
    requires = (_OPENVINO, _NNCF)
    calibrated = True

    def version(self) -> str:
        import nncf

        return f"{super().version()}, nncf {nncf.__version__}"

    def _convert(self, model: nn.Module, example: torch.Tensor, folder: Path,
                 samples: Sequence[np.ndarray] | None) -> Any:
        from utils.export.openvino import nncf_quantize

        if not samples:
            generator = torch.Generator().manual_seed(0)
            samples = [torch.rand(example.shape, generator=generator).numpy() for _ in range(4)]
        return nncf_quantize(super()._convert(model, example, folder, samples), list(samples), len(samples))


class _Handle:
    """A runnable opened model: calling it runs one batch; ``file`` (the ONNX file, or the converted OpenVINO
    model) and ``inputs`` let the runtime open a profiling twin."""

    def __init__(self, run: Callable[[], Any], file: Any, inputs: dict):
        self._run = run
        self.file = file
        self.inputs = inputs

    def __call__(self) -> None:
        self._run()


class RuntimeRegistry:
    """``--runtime`` name -> :class:`Runtime` subclass; tests register fakes for the duration of a block."""

    def __init__(self, runtimes: Sequence[type[Runtime]] = ()):
        self._runtimes: dict[str, type[Runtime]] = {}
        for runtime in runtimes:
            self.register(runtime)

    def register(self, runtime: type[Runtime]) -> type[Runtime]:
        if runtime.name in self._runtimes:
            raise ValueError(f"runtime '{runtime.name}' is registered already")
        self._runtimes[runtime.name] = runtime
        return runtime

    def unregister(self, name: str) -> type[Runtime]:
        return self._runtimes.pop(name)

    def names(self) -> list[str]:
        return list(self._runtimes)

    def create(self, name: str, threads: int) -> Runtime:
        """The runtime ``name`` at ``threads`` threads; a FlagError naming the known ones otherwise."""
        if name not in self._runtimes:
            raise FlagError(f"--runtime {name}: unknown runtime; choose from {', '.join(self._runtimes)}")
        return self._runtimes[name](threads)


RUNTIMES = RuntimeRegistry((ONNXRuntime, OpenVINORuntime, OpenVINOBf16Runtime, OpenVINOInt8Runtime))


@contextlib.contextmanager
def registered_runtime(runtime: type[Runtime]) -> Iterator[type[Runtime]]:
    """``runtime`` selectable by ``--runtime`` inside the ``with`` block only."""
    RUNTIMES.register(runtime)
    try:
        yield runtime
    finally:
        RUNTIMES.unregister(runtime.name)
