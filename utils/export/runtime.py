"""Which CPU runtime runs an INT8 ONNX fastest, measured once at export and written into its sidecar.

An INT8 ONNX is not fast everywhere: ONNX Runtime only turns QDQ pairs into integer kernels when a quantizer
sits on every output (its own ``quantize_static`` graphs), while OpenVINO runs both that placement and the
TensorRT one (conv inputs and weights only, the QAT export) as INT8 convolutions; which one wins also depends
on the CPU (VNNI, AMX). So export.py times both on the artifact itself (batch of the artifact, its image size,
alternating, median of a few runs) and records ``cpu_runtime``; :func:`utils.backends.load_backend` then opens
the file with that runtime, and val.py / detect.py need no extra flag. Without OpenVINO nothing is measured and
ONNX Runtime is used.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np

from utils.export.common import read_metadata, write_metadata

LOGGER = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")


def _runners(onnx_file: Path, images: np.ndarray, threads: int | None) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runners = {"onnxruntime": lambda: session.run(None, {name: images})}
    try:
        import openvino
    except ImportError:
        return runners
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    request = openvino.Core().compile_model(str(onnx_file), "CPU", config).create_infer_request()
    runners["openvino"] = lambda: request.infer({0: images})
    return runners


def time_cpu_runtimes(onnx_file: str | Path, runs: int = 7, threads: int | None = None) -> dict[str, float]:
    """Median ms per call of each available runtime on zeros of the artifact's input shape, alternating."""
    onnx_file = Path(onnx_file)
    metadata = read_metadata(onnx_file)
    height, width = metadata["imgsz"]
    images = np.zeros((int(metadata.get("batch") or 1), 3, height, width), dtype=np.float32)
    runners = _runners(onnx_file, images, threads)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in range(runs + 1):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner()
            if run:  # the first call of each is a warm-up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def record_cpu_runtime(onnx_file: str | Path, runs: int = 7, threads: int | None = None) -> str:
    """Time the runtimes on ``onnx_file`` and write the fastest into its sidecar (``cpu_runtime``)."""
    timings = time_cpu_runtimes(onnx_file, runs, threads)
    fastest = min(timings, key=timings.get)
    metadata = read_metadata(onnx_file)
    metadata["cpu_runtime"] = fastest
    metadata["cpu_runtime_ms"] = timings
    write_metadata(onnx_file, metadata)
    LOGGER.info("%s: CPU runtime %s (median ms per batch: %s)", Path(onnx_file).name, fastest,
                ", ".join(f"{k} {v}" for k, v in timings.items()))
    return fastest
