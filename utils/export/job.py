"""One export run as the format exporters see it, and the steps they share.

:func:`utils.export.export_model` builds an :class:`ExportJob` (the prepared model, the flags, where each
artifact goes) and hands it to each format's exporter in turn; an exporter reads what earlier ones wrote from
``job.done`` (TensorRT builds from the ONNX) and takes the shared pieces from here: the sidecar of its
artifact, the INT8 calibration images and kept layers (measured once, for every INT8 format of the run), and
real images with the model's outputs on them (for choosing an INT8 ONNX's CPU runtime). Which images and how
they are prepared is the model's task's business (:mod:`utils.tasks`): the training split as its trainer lists
it, each image as its validation loader prepares it (letterbox for detectors, centre crop for classifiers).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.registry import task_of
from utils.common.errors import FlagError, MissingFileError
from utils.export.common import (
    ExportMetadata,
    ImageTransform,
    folder_images,
    letterbox_tensor,
    model_heads,
    model_stride,
)

if TYPE_CHECKING:
    from utils.export import ExportOptions
    from utils.export.registry import FormatRegistry
    from utils.export.spec import ExportFormat
    from utils.tasks import Task

LOGGER = logging.getLogger(__name__)

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "data" / "neu-det-sample" / "images" / "val"


@dataclass
class ExportJob:
    """The prepared model (float, eval, fused, decoded output), zeros of the export input shape, the class
    names, the flags, the export device, artifact key -> path, and the artifacts written so far."""

    model: nn.Module
    images: torch.Tensor
    names: list[str]
    options: ExportOptions
    device: torch.device
    paths: dict[str, Path]
    registry: FormatRegistry
    task: Task | None = None  # the model's task on --data (None without --data)
    done: dict[str, Path] = field(default_factory=dict)
    _calibration: tuple[list[Path], list[int]] | None = field(default=None, repr=False)

    def requested(self, fmt: ExportFormat) -> bool:
        """Whether ``--include`` names ``fmt`` (rather than another format being built from it)."""
        return fmt.name in self.options.include

    def metadata(self, fmt: ExportFormat, precision: str, batch: int | None = None) -> ExportMetadata:
        """The sidecar of ``fmt``'s artifact: the free axes it supports among those asked for, the opset of
        ONNX-built formats, the NMS settings of formats that put NMS into the graph."""
        options = self.options
        nms = None
        if options.nms and fmt.nms:
            nms = {"conf_thres": options.nms_settings.conf_thres, "iou_thres": options.nms_settings.iou_thres,
                   "max_det": options.nms_settings.max_det}
        return ExportMetadata(format=fmt.name, task=task_of(self.model), stride=model_stride(self.model),
                              imgsz=list(options.imgsz), batch=options.batch_size if batch is None else batch,
                              precision=precision, names=list(self.names), heads=model_heads(self.model),
                              dynamic=[a for a in options.dynamic_axes() if a in fmt.dynamic],
                              opset=options.opset if fmt.opset else None, nms=nms)

    def on_device(self, half: bool) -> tuple[nn.Module, torch.Tensor]:
        """A copy of the model and the images on the export device, in FP16 when ``half``."""
        model = copy.deepcopy(self.model).to(self.device)
        images = self.images.to(self.device)
        return (model.half(), images.half()) if half else (model, images)

    def calibration_files(self) -> list[Path]:
        """The ``--calib-images`` first training images of ``--data``."""
        return self.task.calibration_files("train")[: self.options.calib_images] if self.task else []

    def prepare_image(self, file: str | Path, imgsz: tuple[int, int]) -> torch.Tensor:
        """One image as the model's task validates it (letterboxed without --data: the embedded detection sample)."""
        return self.task.calibration_image(file, imgsz) if self.task else letterbox_tensor(file, imgsz)

    def check_calibration(self) -> None:
        """--int8 (post-training): the calibration set must hold at least one batch of the artifacts it calibrates
        (one image with a free batch axis, else --batch-size), checked before anything is written; a set that
        runs dry would leave the float artifacts of the run behind and a calibrator's bare "no data" error."""
        options = self.options
        try:
            count = len(self.calibration_files())
        except MissingFileError as exc:  # an empty or missing train split: say what the images were for
            raise FlagError(f"--int8 --data {options.data}: INT8 calibration reads the train split, and {exc}; point "
                            "'train' at images like those the model will see") from None
        batch = 1 if "batch" in options.dynamic_axes() else options.batch_size
        if count < batch:
            raise FlagError(f"--int8: the calibration set holds {count} image(s) (the first --calib-images "
                            f"{options.calib_images} of the train split of {options.data}), less than one batch of "
                            f"--batch-size {batch}; add training images, raise --calib-images, lower --batch-size or "
                            "export with --dynamic-batch")

    def calibration(self) -> tuple[list[Path], list[int]]:
        """The calibration images and the ``--int8-keep`` most sensitive layers, measured once per run and shared
        by every INT8 format."""
        if self._calibration is None:
            files = self.calibration_files()
            keep = self.options.int8_keep
            layers = sensitive_layers(self.model, files, self.options.imgsz, keep, self.prepare_image) if keep else []
            self._calibration = files, layers
        return self._calibration

    def cpu_runners(self, onnx_file: Path) -> list[ExportFormat]:
        """The registered formats that run ``onnx_file`` on the CPU, its own first (the runtime candidates)."""
        own = self.registry.for_artifact(onnx_file)
        return sorted(self.registry.runners(onnx_file, "cpu"), key=lambda fmt: fmt is not own)

    def runtime_check(self) -> tuple[torch.Tensor | None, Any]:
        """Real images (--data val, else the embedded sample) and the model's outputs on them, for choosing a
        runtime that reproduces the model (see utils/export/runtime.py); (None, None) when there are no images."""
        if task_of(self.model) != "detect":
            return None, None
        images = comparison_images(self.task, SAMPLE_IMAGES, self.options.imgsz, 8)
        if images is None:
            return None, None
        with torch.no_grad():
            return images, self.model(images)


def sensitive_layers(model: nn.Module, files: list[Path], imgsz: tuple[int, int], keep: int,
                     prepare: ImageTransform = letterbox_tensor, images: int = 8) -> list[int]:
    """The ``keep`` layers whose INT8 rounding alone costs the most at the head, measured on ``images`` of the
    calibration files prepared by ``prepare`` (the ranking is logged)."""
    from utils.compress.quant.sensitivity import format_sensitivity, measure_layer_sensitivity

    batch = torch.stack([prepare(f, imgsz) for f in files[:images]])
    ranking = measure_layer_sensitivity(model, batch)
    LOGGER.info("%s", format_sensitivity(ranking, keep))
    return sorted(item.layer for item in ranking[:keep])


def export_task(model: nn.Module, data: str | Path | None, imgsz: tuple[int, int]) -> Task | None:
    """The model's task on ``--data`` (None without it): INT8 calibration and comparison images come from it."""
    if not data:
        return None
    from utils.tasks import TaskOptions, build_task

    return build_task(task_of(model), data, TaskOptions(imgsz=int(imgsz[0])))


def comparison_images(task: Task | None, sample_folder: Path, imgsz: tuple[int, int], limit: int = 8
                      ) -> torch.Tensor | None:
    """Up to ``limit`` real images (RGB BCHW in [0, 1]) to compare an export with PyTorch: ``task``'s validation
    images prepared as it validates them, else the images of ``sample_folder`` letterboxed; None when none."""
    if task is not None:
        files = task.calibration_files("val")[:limit]
        return torch.stack([task.calibration_image(f, imgsz) for f in files]) if files else None
    files = folder_images(sample_folder)[:limit]
    return torch.stack([letterbox_tensor(f, imgsz) for f in files]) if files else None
