"""Preview grid of augmented training samples: ``python -m utils.data.preview --data X --hyp Y --n 16 --out grid.png``.

Looking at a grid of what the model will see is the quickest check that labels, mosaic and hyperparameters are
sane. Drawing uses cv2 only (cv2.putText, no font download).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.errors import FlagError
from utils.common.flags import IMGSZ_HELP, at_least, image_sizes
from utils.data.config import load_data_config
from utils.data.detect import DEFAULT_HYP, DetectionDataset, load_hyp

COLOURS = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0)]


def draw_sample(img: torch.Tensor, labels: torch.Tensor, names: list[str]) -> np.ndarray:
    """CxHxW RGB tensor + (n, 6) normalised labels -> BGR image with boxes and class names."""
    canvas = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[..., ::-1])
    h, w = canvas.shape[:2]
    for _, cls, cx, cy, bw, bh in labels.tolist():
        x1, y1, x2, y2 = (round(v) for v in ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                                                    (cy + bh / 2) * h))
        colour = COLOURS[int(cls) % len(COLOURS)]
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 2)
        text = names[int(cls)] if int(cls) < len(names) else str(int(cls))
        cv2.putText(canvas, text, (x1 + 2, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return canvas


def make_grid(tiles: list[np.ndarray]) -> np.ndarray:
    """Square-ish grid of equally sized tiles, grey where the grid has no tile."""
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0].shape[:2]
    grid = np.full((rows * h, cols * w, 3), 114, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * h:r * h + tile.shape[0], c * w:c * w + tile.shape[1]] = tile
    return grid


def write_preview(data_yaml: str | Path, out: str | Path, hyp: str | Path = DEFAULT_HYP, n: int = 16,
                  imgsz: int = 640, seed: int = 0, split: str = "train") -> Path:
    """Draw ``n`` augmented samples of ``split`` into a PNG grid; returns the written path."""
    data = load_data_config(data_yaml)
    if not data.get(split):
        raise FlagError(f"--split {split}: {data['yaml_file']} has no '{split}' entry; use one of "
                        f"{', '.join(k for k in ('train', 'val', 'test') if data.get(k))}")
    dataset = DetectionDataset(data[split], imgsz, batch_size=n, augment=True, hyp=load_hyp(hyp), seed=seed,
                               nc=data["nc"])
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    tiles = [draw_sample(*dataset[int(i)][:2], data["names"]) for i in order]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), make_grid(tiles)):
        raise OSError(f"could not write {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = UserArgumentParser(description="PNG grid of augmented training samples with their boxes")
    parser.add_argument("--data", required=True)
    parser.add_argument("--hyp", default=str(DEFAULT_HYP))
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=640, help=f"sample size ({IMGSZ_HELP})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", default="preview.png")
    args = parser.parse_args(argv)
    at_least("--n", args.n, 1)
    image_sizes("--imgsz", args.imgsz)
    print(write_preview(args.data, args.out, args.hyp, args.n, args.imgsz, args.seed, args.split))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, log_level=logging.WARNING))
