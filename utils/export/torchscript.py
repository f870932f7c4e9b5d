"""TorchScript export: a traced module with the metadata embedded (``config.txt``) and as a sidecar."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from utils.export.common import ExportMetadata, write_metadata

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
