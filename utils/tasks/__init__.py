"""Task plug-ins for the one training loop in :mod:`utils.train.engine` (detection, classification)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from utils.tasks.base import Task

__all__ = ["Task", "task_for_model"]


def task_for_model(model_or_cfg: nn.Module | str | Path | dict) -> str:
    """'detect' or 'classify', read from the model's last layer (or the YAML's last row)."""
    from models.yaml_config import ModelConfigError, layer_rows, load_model_yaml

    if hasattr(model_or_cfg, "model"):
        head = model_or_cfg.model[-1]
        return "detect" if hasattr(head, "anchors") else "classify"
    cfg = load_model_yaml(model_or_cfg)
    rows = layer_rows(cfg)  # a YAML without its sections or with malformed rows is refused here, by name
    if not rows:
        raise ModelConfigError(f"{cfg.get('yaml_file', '<dict>')}: no layers in 'backbone' and 'head'")
    return "detect" if rows[-1][1][2] in {"Detect", "Segment"} else "classify"
