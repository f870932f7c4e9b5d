"""Which CPU runtime runs an INT8 ONNX fastest, measured once at export and written into its sidecar.

An INT8 ONNX is not fast everywhere: ONNX Runtime only turns QDQ pairs into integer kernels when a quantizer
sits on every output (its own ``quantize_static`` graphs), while OpenVINO runs both that placement and the
TensorRT one (conv inputs and weights only, the QAT export) as INT8 convolutions; which one wins also depends
on the CPU (VNNI, AMX). So export.py times both on the artifact itself (batch of the artifact, its image size,
alternating, median of a few runs) and records ``cpu_runtime``; :func:`utils.export.backend.load_backend` then
opens the file with that runtime, and val.py / detect.py need no extra flag. The candidates are the registered
formats whose backend runs such a file on the CPU and is installed here (:mod:`utils.export.registry`). Speed
only counts among runtimes whose outputs match the model the file came from (on real images): OpenVINO 2026.4
runs the QAT graph (symmetric INT8 on conv inputs) with a score error of 0.25 where ONNX Runtime stays within
0.05. Without OpenVINO nothing is measured and the file's own runtime (ONNX Runtime) is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from utils.common.timing import median_call_ms
from utils.export.common import read_metadata, write_metadata

if TYPE_CHECKING:
    from utils.export.backend import Backend
    from utils.export.spec import ExportFormat

LOGGER = logging.getLogger(__name__)


def cpu_backends(onnx_file: Path, runners: Sequence[ExportFormat], threads: int | None = None) -> dict[str, Backend]:
    """Runtime name -> an open backend, for each of ``runners`` (the registered formats that run ``onnx_file`` on
    the CPU, its own first) that is installed here."""
    extra = {"threads": threads} if threads else {}
    return {fmt.runtime: fmt.backend(onnx_file, **extra) for fmt in runners if fmt.can_run()}


def time_cpu_runtimes(metadata: dict, backends: dict[str, Backend], runs: int = 7) -> dict[str, float]:
    """Median ms per call of each open backend on zeros of the artifact's input shape (its sidecar ``metadata``),
    alternating."""
    height, width = metadata["imgsz"]
    images = torch.zeros((int(metadata.get("batch") or 1), 3, height, width))
    timings = median_call_ms({name: partial(backend, images) for name, backend in backends.items()}, runs)
    return {name: round(values["median"], 2) for name, values in timings.items()}


def score_errors(backends: dict[str, Backend], images, reference) -> dict[str, float]:
    """Max |objectness x class score - reference| of each open backend on ``images`` (a detector's decoded
    output): a runtime that computes the INT8 graph differently from the model it came from shows up here."""
    expected = reference[..., 4:5] * reference[..., 5:]
    errors = {}
    for name, backend in backends.items():
        output = backend(images)
        errors[name] = round(float((output[..., 4:5] * output[..., 5:] - expected).abs().max()), 4)
    return errors


def eligible_runtimes(errors: dict[str, float], floor: float = 0.05) -> list[str]:
    """Runtimes whose score error is at most twice the best one's (or ``floor``): INT8 rounding differs a little
    between correct runtimes, a runtime that mis-executes the graph differs a lot."""
    best = min(errors.values())
    return [name for name, error in errors.items() if error <= max(2 * best, floor)]


def record_cpu_runtime(onnx_file: str | Path, runners: Sequence[ExportFormat], images=None, reference=None,
                       runs: int = 7, threads: int | None = None) -> str:
    """Time the runtimes ``runners`` on ``onnx_file`` and write the fastest into its sidecar (``cpu_runtime``).

    With ``images`` and the source model's ``reference`` outputs (detectors), only runtimes that reproduce the
    model qualify (:func:`eligible_runtimes`); their errors go into the sidecar too.
    """
    metadata = read_metadata(onnx_file)
    backends = cpu_backends(Path(onnx_file), runners, threads)  # opened (compiled) once for both checks
    timings = time_cpu_runtimes(metadata, backends, runs)
    candidates = list(timings)
    if images is not None and reference is not None and metadata.get("task") == "detect":
        errors = score_errors(backends, images, reference)
        candidates = [name for name in eligible_runtimes(errors) if name in timings] or list(timings)[:1]
        metadata["cpu_runtime_score_error"] = errors
        if set(candidates) != set(timings):
            LOGGER.warning("%s: %s left out, its outputs differ from the model's (max score error %s)",
                           Path(onnx_file).name, sorted(set(timings) - set(candidates)), errors)
    fastest = min(candidates, key=timings.get)
    metadata["cpu_runtime"] = fastest
    metadata["cpu_runtime_ms"] = timings
    write_metadata(onnx_file, metadata)
    LOGGER.info("%s: CPU runtime %s (median ms per batch: %s)", Path(onnx_file).name, fastest,
                ", ".join(f"{k} {v}" for k, v in timings.items()))
    return fastest
