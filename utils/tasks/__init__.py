"""Tasks: what differs between detection and classification, behind one contract (:mod:`utils.tasks.base`).

Which task a model performs is declared once, on its head's registry entry (``@register(..., task="detect")``),
and asked in one place, :func:`models.yolo.task_of` (re-exported here). :func:`build_task` makes the task of that
name for a data YAML; :func:`model_info` says what a task needs to know of a model or an exported artifact.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from models.registry import task_of
from utils.common.errors import UserError
from utils.tasks.base import EpochPlan, EvalSettings, ModelInfo, ModelSource, Task, TaskOptions

__all__ = ["EpochPlan", "EvalSettings", "ModelInfo", "ModelSource", "Task", "TaskOptions", "build_task", "model_info",
           "task_of"]


def _task_classes() -> MappingProxyType:
    from utils.tasks.classify import ClassifyTask
    from utils.tasks.detect import DetectTask

    return MappingProxyType({"detect": DetectTask, "classify": ClassifyTask})


def build_task(kind: str, data: str | Path | dict, options: TaskOptions | None = None) -> Task:
    """The task named ``kind`` (see :func:`task_of`) for the data YAML ``data``."""
    classes = _task_classes()
    if kind not in classes:
        raise UserError(f"unknown task '{kind}'; known: {', '.join(classes)}")
    return classes[kind](data, options or TaskOptions())


def model_info(model: Any, names: list[str] | None = None) -> ModelInfo:
    """Task, class names, stride and class count (detectors) or heads (classifiers) of a model or a backend."""
    from models.classify import heads_of
    from utils.export.common import model_stride

    if not isinstance(model, nn.Module) or not hasattr(model, "model"):  # an exported artifact's backend
        return ModelInfo(task=model.task, names=list(model.names), stride=int(model.stride),
                         nc=len(model.names) or None if model.task == "detect" else None,
                         heads=getattr(model, "heads", None))
    kind = task_of(model)
    names = [str(n) for n in (names or getattr(model, "names", None) or [])]
    if kind == "detect":
        return ModelInfo(kind, names, model_stride(model), nc=int(model.model[-1].nc))
    return ModelInfo(kind, names, model_stride(model), heads=heads_of(model))
