"""Task plug-ins for the one training loop in :mod:`utils.engine` (detection, classification)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from utils.tasks.base import Task

__all__ = ["Task", "task_for_model"]


def task_for_model(model_or_cfg: nn.Module | str | Path | dict) -> str:
    """'detect' or 'classify', read from the model's last layer (or the YAML's last row)."""
    from models.yaml_config import load_model_yaml

    if hasattr(model_or_cfg, "model"):
        head = model_or_cfg.model[-1]
        return "detect" if hasattr(head, "anchors") else "classify"
    cfg = load_model_yaml(model_or_cfg)
    last = cfg["head"][-1][2] if cfg.get("head") else cfg["backbone"][-1][2]
    return "detect" if last in {"Detect", "Segment"} else "classify"
