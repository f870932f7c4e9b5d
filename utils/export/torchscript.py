"""TorchScript: a traced module with the metadata embedded (``config.txt``) and as a sidecar; its backend and
its format description."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from utils.export.backend import Backend
from utils.export.common import ExportMetadata, read_metadata, write_metadata
from utils.export.spec import ExportFormat

if TYPE_CHECKING:
    from utils.export.job import ExportJob

LOGGER = logging.getLogger(__name__)


def trace_model(model: nn.Module, images: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``images`` (torch.jit.trace is deprecated upstream but is what pnnx and C++ consume)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.trace.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(model, images, strict=False, check_trace=False)


def export_torchscript(model: nn.Module, images: torch.Tensor, file: str | Path,
                       metadata: ExportMetadata) -> Path:
    """Trace a prepared model (see :func:`utils.export.common.prepare_for_export`) and save it to ``file``."""
    file = Path(file)
    traced = trace_model(model, images)
    extra = {"config.txt": json.dumps(metadata.to_dict())}
    traced.save(str(file), _extra_files=extra)
    write_metadata(file, metadata)
    LOGGER.info("TorchScript saved to %s", file)
    return file


def export(job: ExportJob) -> dict[str, Path]:
    """Traced on the export device (FP16 with --half, which check_options allows on CUDA only); batch is the
    only axis that can stay free."""
    precision = "fp16" if job.options.half else "fp32"
    metadata = job.metadata(FORMAT, precision)
    model, images = job.on_device(job.options.half)
    return {FORMAT.name: export_torchscript(model, images, job.paths[FORMAT.name], metadata)}


class TorchScriptBackend(Backend):
    """A traced ``.torchscript`` file written by export.py."""

    format = "torchscript"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None):
        super().__init__(weights, read_metadata(weights), device, fp16)
        self.model = torch.jit.load(str(weights), map_location=self.device).eval()
        self.input_dtype = torch.float16 if self.metadata.get("precision") == "fp16" else torch.float32

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        output = self.model(images.to(self.device, self.input_dtype))
        return list(output) if isinstance(output, (tuple, list)) else [output]


FORMAT = ExportFormat(name="torchscript", title="TorchScript", suffix=".torchscript", backend=TorchScriptBackend,
                      export=export, dynamic=("batch",), half_devices=("cuda",), devices=("cpu", "cuda"))
