"""Drawing boxes and image grids with OpenCV only (no font files, so nothing is ever downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

# 20 well-separated colours (BGR), cycled by class index
_PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
            (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
            (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203),
            (200, 149, 255), (199, 55, 255)]


def class_color(index: int) -> tuple[int, int, int]:
    return _PALETTE[int(index) % len(_PALETTE)]


def draw_box(image: np.ndarray, xyxy: Sequence[float], label: str = "", color: tuple[int, int, int] = (56, 56, 255),
             thickness: int = 2) -> None:
    """Rectangle plus a filled label tag above it (inside the image when the box touches the top)."""
    x1, y1, x2, y2 = (round(v) for v in xyxy)
    cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
    if not label:
        return
    scale = max(thickness / 3, 0.35)
    (w, h), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(thickness - 1, 1))
    above = y1 - h - baseline >= 0
    top = y1 - h - baseline if above else y1
    cv2.rectangle(image, (x1, top), (x1 + w, top + h + baseline), color, -1, cv2.LINE_AA)
    cv2.putText(image, label, (x1, top + h), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                max(thickness - 1, 1), cv2.LINE_AA)


def draw_detections(image: np.ndarray, detections: np.ndarray, names: Sequence[str], thickness: int = 2,
                    hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """Draw n x 6 [x1, y1, x2, y2, conf, cls] detections on ``image`` (in place) and return it."""
    for *xyxy, conf, cls in detections.tolist():
        name = class_name(names, cls)
        label = "" if hide_labels else (name if hide_conf else f"{name} {conf:.2f}")
        draw_box(image, xyxy, label, class_color(cls), thickness)
    return image


def plot_batch(images: np.ndarray, targets: np.ndarray, names: Sequence[str], path: str | Path,
               max_images: int = 16) -> Path:
    """A grid of a batch with its labels: ``images`` uint8 B x 3 x H x W (RGB), ``targets`` n x 6 (image index,
    cls, cx, cy, w, h normalised)."""
    h, w = images.shape[2:]
    boxes = []
    for k in range(min(len(images), max_images)):
        rows = targets[targets[:, 0] == k].tolist()
        boxes.append([(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h),
                       class_name(names, cls), cls) for _, cls, cx, cy, bw, bh in rows])
    return _save_grid(images[:max_images], boxes, path)


def plot_batch_predictions(images: np.ndarray, detections: Sequence[np.ndarray], names: Sequence[str],
                           path: str | Path, conf_thres: float = 0.25, max_images: int = 16) -> Path:
    """A grid of a batch with its detections (per image n x 6: x1, y1, x2, y2 in the batch's pixels, conf, cls);
    like v7.0's val_batch*_pred.jpg it leaves out boxes at or below ``conf_thres``."""
    boxes = [[(det[:4], f"{class_name(names, det[5])} {det[4]:.1f}", det[5]) for det in dets.tolist()
              if det[4] > conf_thres] for dets in detections[:max_images]]
    return _save_grid(images[:len(boxes)], boxes, path)


def tile_grid(tiles: Sequence[np.ndarray], cols: int, gap: int = 0) -> np.ndarray:
    """Same-size H x W x 3 uint8 tiles in rows of ``cols``, ``gap`` white pixels between them, on white."""
    h, w = tiles[0].shape[:2]
    rows = int(np.ceil(len(tiles) / cols))
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return canvas


def class_name(names: Sequence[str], cls: float) -> str:
    """The class's name, or its index when the model or data set carries fewer names."""
    return names[int(cls)] if int(cls) < len(names) else str(int(cls))


def _save_grid(images: np.ndarray, boxes: Sequence[Sequence[tuple]], path: str | Path) -> Path:
    """Tile RGB CHW ``images`` into a square-ish grid, draw each tile's (xyxy, label, cls) boxes, write BGR."""
    tiles = []
    for k, image in enumerate(images):
        tile = np.ascontiguousarray(image.transpose(1, 2, 0)[..., ::-1])
        for xyxy, label, cls in boxes[k]:
            draw_box(tile, xyxy, label, class_color(cls), 1)
        tiles.append(tile)
    canvas = tile_grid(tiles, cols=int(np.ceil(np.sqrt(len(tiles)))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
    return path


def plot_label_stats(labels: Sequence[np.ndarray], names: Sequence[str], path: str | Path) -> Path:
    """labels.png: instances per class, box centres and box sizes (normalised) of the training labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [lab for lab in labels if len(lab)]
    table = np.concatenate(rows, 0) if rows else np.zeros((0, 5))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    counts = np.bincount(table[:, 0].astype(int), minlength=len(names)) if len(table) else np.zeros(len(names))
    axes[0].bar(range(len(counts)), counts, color=[np.array(class_color(i)[::-1]) / 255 for i in range(len(counts))])
    axes[0].set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes[0].set_ylabel("instances")
    axes[1].scatter(table[:, 1], table[:, 2], s=2, alpha=0.3)
    axes[1].set(xlabel="x", ylabel="y", xlim=(0, 1), ylim=(1, 0), title="box centres")
    axes[2].scatter(table[:, 3], table[:, 4], s=2, alpha=0.3)
    axes[2].set(xlabel="width", ylabel="height", xlim=(0, 1), ylim=(0, 1), title="box sizes")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
