"""detect.py --visualize: the feature maps every layer of a PyTorch model produces for one image.

Looking at what a backbone stage responds to is the quickest check that a swapped backbone or a pruned
model still sees the objects. Drawn with OpenCV (no matplotlib figure per layer), so it stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from utils.common.plots import tile_grid

MAX_CHANNELS = 32  # v7.0 draws the first 32 channels of each stage
COLUMNS = 8
MIN_TILE = 64  # small maps (8x8 at the last stage) are enlarged so that they stay readable


@contextmanager
def capture_feature_maps(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the 4-D output of every layer of ``model.model`` but the head while the context is open.

    Keys are ``stage{i}_{ClassName}`` as in v7.0's file names; the head (last layer) is skipped because
    its output is predictions, not a feature map.
    """
    captured: dict[str, torch.Tensor] = {}
    layers = list(model.model)[:-1]
    handles = [layer.register_forward_hook(_recorder(captured, f"stage{i}_{type(layer).__name__}"))
               for i, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _recorder(captured: dict[str, torch.Tensor], key: str):
    def hook(_module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            captured[key] = output.detach()
    return hook


def save_feature_maps(captured: dict[str, torch.Tensor], out_dir: Path,
                      max_channels: int = MAX_CHANNELS) -> list[Path]:
    """One PNG per layer (first ``max_channels`` channels of the first image, 8 per row) plus a .npy of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, features in captured.items():
        maps = features[0, :max_channels].float().cpu().numpy()
        path = out_dir / f"{key}_features.png"
        cv2.imwrite(str(path), feature_grid(maps))
        np.save(out_dir / f"{key}_features.npy", maps)
        paths.append(path)
    return paths


def feature_grid(maps: np.ndarray) -> np.ndarray:
    """Tile (C, H, W) maps, each min-max scaled on its own and coloured with viridis, into a BGR image."""
    count, h, w = maps.shape
    scale = max(1, int(np.ceil(MIN_TILE / min(h, w))))
    tiles = []
    for channel in maps:
        low, high = float(channel.min()), float(channel.max())
        gray = np.zeros_like(channel) if high <= low else (channel - low) / (high - low)
        tile = cv2.applyColorMap((gray * 255).round().astype(np.uint8), cv2.COLORMAP_VIRIDIS)
        tiles.append(cv2.resize(tile, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST))
    return tile_grid(tiles, cols=min(COLUMNS, count), gap=2)
