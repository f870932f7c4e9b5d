"""The ``.pt`` checkpoint as a format: nothing exports to it, but it opens through the same registry and
:func:`~utils.export.backend.load_backend` as the exported artifacts (benchmarks compare them side by side)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.registry import task_of
from utils.common.torch_utils import fastest_memory_format
from utils.export.backend import Backend
from utils.export.common import model_stride
from utils.export.spec import ALL_AXES, ExportFormat


class PyTorchBackend(Backend):
    """A ``.pt`` checkpoint (ours or YOLOv5 v7.0), fused, eval mode; any batch and (stride-multiple) size."""

    format = "pytorch"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None):
        from utils.weights.checkpoint import load_checkpoint

        loaded = load_checkpoint(weights, fuse=True)
        model = loaded.model
        metadata = {"names": loaded.meta.get("names") or list(getattr(model, "names", [])),
                    "stride": model_stride(model), "task": task_of(model), "imgsz": None, "batch": 1,
                    "dynamic": list(ALL_AXES), "heads": loaded.meta.get("heads"),
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


FORMAT = ExportFormat(name="pytorch", title="PyTorch", suffix=".pt", backend=PyTorchBackend, devices=("cpu", "cuda"))
