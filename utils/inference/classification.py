"""Classifier predictions on image files or decoded frames (detect.py on a classifier), and their CSV."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.classify import as_head_dict


def predict_images(model: nn.Module, paths: Sequence[str | Path], imgsz: int, heads: Sequence[dict] | None = None,
                   device: torch.device | str | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
    """Classify image files (centre crop, as in validation); one row per image with each head's top class.

    Row keys: ``path``, then per head ``<head>`` (class name), ``<head>_index`` and ``<head>_conf`` (softmax).
    """
    from utils.data.classify import read_image

    images = ((str(p), read_image(str(p))) for p in paths)
    return classify_images(model, images, imgsz, heads, device, batch_size)


def classify_images(model: nn.Module, images: Iterable[tuple[str, np.ndarray]], imgsz: int,
                    heads: Sequence[dict] | None = None, device: torch.device | str | None = None,
                    batch_size: int = 32) -> list[dict[str, Any]]:
    """:func:`predict_images` for already decoded ``(name, BGR image)`` pairs (detect.py's frames)."""
    from models.classify import heads_of
    from utils.data.classify import center_crop, to_chw_tensor

    heads = list(heads or heads_of(model))
    if device is None:
        device = next(model.parameters()).device if isinstance(model, nn.Module) else getattr(model, "device", "cpu")
    rows: list[dict[str, Any]] = []
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    pending = iter(images)
    try:
        while chunk := list(itertools.islice(pending, batch_size)):
            batch = torch.stack([to_chw_tensor(center_crop(image, imgsz)) for _, image in chunk])
            with torch.no_grad():
                preds = as_head_dict(model(batch.to(device).float() / 255), heads)
            rows += _prediction_rows([name for name, _ in chunk], preds, heads)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return rows


def _prediction_rows(paths: list[str], preds: dict[str, torch.Tensor], heads: Sequence[dict]) -> list[dict]:
    rows = [{"path": p} for p in paths]
    for head in heads:
        probs = preds[head["name"]].float().softmax(1)
        conf, index = probs.max(1)
        for row, c, i in zip(rows, conf.tolist(), index.tolist()):
            row[head["name"]] = head["names"][i]
            row[f"{head['name']}_index"] = i
            row[f"{head['name']}_conf"] = round(c, 5)
    return rows


def write_predictions_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`predict_images` rows as CSV (header from the first row's keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return path
