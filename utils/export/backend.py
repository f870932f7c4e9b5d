"""The runtime-independent part of inference: the :class:`Backend` interface and :func:`load_backend`.

Every backend takes float BCHW images in [0, 1] (torch) and returns torch tensors on the backend's device:
``(bs, N, 5 + nc)`` decoded detections for detectors (the PyTorch eval layout, so the same NMS, val and
predict code serve every artifact), ``(detections [bs, max_det, 6], num_dets [bs])`` for ONNX graphs exported
with ``--nms``, and logits (a dict head -> logits for multi-head classifiers) for classifiers. Names, stride,
image size and batch come from the export sidecar (see :mod:`utils.export.common`). A static-batch artifact
handed a different batch runs it in chunks of its own batch size.

Each runtime's backend lives in its format's module (``utils/export/onnx.py`` ...); which one opens an
artifact is read from the format registry (:mod:`utils.export.registry`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from utils.common.errors import MissingFileError

if TYPE_CHECKING:
    pass

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


def single_file(folder: Path, pattern: str) -> Path:
    """The one file of a folder artifact matching ``pattern`` (``*.xml``), or a MissingFileError naming them."""
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        raise MissingFileError(f"{folder}: expected exactly one {pattern} file, found {[m.name for m in matches]}")
    return matches[0]


class BackendModule(torch.nn.Module):
    """Lets an exported-model backend stand where code expects an ``nn.Module`` (eval/train are no-ops)."""

    def __init__(self, backend: Any):
        super().__init__()
        self.backend = backend

    def forward(self, images: torch.Tensor) -> Any:
        return self.backend(images)
