"""AutoAnchor: check how well a model's anchors fit the data set's boxes, and re-cluster them if they fit badly.

Fit is measured like YOLOv5: a box matches an anchor when both width and height ratios are within
``thr`` (``anchor_t``); best possible recall (BPR) is the share of boxes with at least one matching anchor.
Below 0.98 BPR, new anchors come from k-means on whitened box sizes refined by a genetic search.

CLI (anchor clustering for a data set): ``python -m utils.train.autoanchor --data data.yaml --imgsz 640 --n 9``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.errors import DataConfigError
from utils.common.flags import IMGSZ_HELP, at_least, image_sizes, positive

if TYPE_CHECKING:
    from utils.data.detect import DetectionDataset

LOGGER = logging.getLogger(__name__)


def anchor_fit(wh: np.ndarray, anchors: np.ndarray, thr: float) -> tuple[float, float]:
    """(BPR, anchors above threshold per box) for boxes ``wh`` (n x 2) and anchors (k x 2), in pixels."""
    ratio = wh[:, None] / anchors[None]
    worst_side = np.minimum(ratio, 1 / ratio).min(2)
    best = worst_side.max(1)
    return float((best > 1 / thr).mean()), float((worst_side > 1 / thr).sum(1).mean())


def _fitness(wh: np.ndarray, anchors: np.ndarray, thr: float) -> float:
    ratio = wh[:, None] / anchors[None]
    best = np.minimum(ratio, 1 / ratio).min(2).max(1)
    return float((best * (best > 1 / thr)).mean())


def label_sizes(dataset: DetectionDataset, imgsz: int, jitter: bool = True, seed: int = 0) -> np.ndarray:
    """Box sizes in pixels at the training size (long side = imgsz), optionally scale-jittered by +-10%."""
    shapes = np.asarray(dataset.shapes, dtype=np.float64)  # (n, 2) as (w, h)
    shapes = imgsz * shapes / shapes.max(1, keepdims=True)
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.9, 1.1, size=(len(shapes), 1)) if jitter else np.ones((len(shapes), 1))
    sizes = [labels[:, 3:5] * s for s, labels in zip(shapes * scale, dataset.labels) if len(labels)]
    return np.concatenate(sizes, 0) if sizes else np.zeros((0, 2))


def kmean_anchors(wh: np.ndarray, n: int = 9, thr: float = 4.0, generations: int = 1000,
                  seed: int = 0) -> np.ndarray:
    """k-means on whitened sizes, then mutate-and-keep-if-better for ``generations`` rounds; sorted by area."""
    from scipy.cluster.vq import kmeans

    wh = wh[(wh >= 2.0).all(1)]  # boxes under 2 pixels carry no shape information
    if len(wh) < n:
        raise ValueError(f"need at least {n} labelled boxes >= 2 px to cluster {n} anchors, found {len(wh)}")
    rng = np.random.default_rng(seed)
    std = wh.std(0)
    centroids, _ = kmeans(wh / std, n, iter=30, seed=seed)
    anchors = centroids * std
    if len(anchors) != n:  # kmeans may drop empty clusters
        anchors = np.sort(rng.uniform(wh.min(0), wh.max(0), size=(n, 2)), 0)
    best = _fitness(wh, anchors, thr)
    for _ in tqdm(range(generations), desc="evolving anchors", bar_format="{l_bar}{bar:10}{r_bar}"):
        mutation = np.ones_like(anchors)
        while (mutation == 1).all():
            mask = rng.random(anchors.shape) < 0.9
            mutation = ((mask * rng.random() * rng.standard_normal(anchors.shape) * 0.1) + 1).clip(0.3, 3.0)
        candidate = (anchors * mutation).clip(min=2.0)
        score = _fitness(wh, candidate, thr)
        if score > best:
            best, anchors = score, candidate
    return anchors[np.argsort(anchors.prod(1))]


def check_anchors(dataset: DetectionDataset, model: nn.Module, thr: float = 4.0, imgsz: int = 640) -> float:
    """Log BPR; re-cluster and install new anchors when BPR < 0.98 and the new ones fit better."""
    head = model.model[-1]
    stride = head.stride.view(-1, 1, 1).to(head.anchors.device)
    anchors = (head.anchors * stride).view(-1, 2).cpu().numpy()
    wh = label_sizes(dataset, imgsz)
    if not len(wh):
        LOGGER.warning("AutoAnchor: no labels, anchors left unchanged")
        return 0.0
    bpr, aat = anchor_fit(wh, anchors, thr)
    LOGGER.info("AutoAnchor: %.2f anchors/target, %.3f best possible recall", aat, bpr)
    if bpr > 0.98:
        return bpr
    LOGGER.info("AutoAnchor: BPR < 0.98, computing new anchors")
    new = kmean_anchors(wh, head.na * head.nl, thr)
    new_bpr, _ = anchor_fit(wh, new, thr)
    if new_bpr <= bpr:
        LOGGER.info("AutoAnchor: new anchors are not better (%.3f), keeping the original ones", new_bpr)
        return bpr
    new_tensor = torch.tensor(new, device=head.anchors.device, dtype=head.anchors.dtype).view_as(head.anchors)
    head.anchors[:] = new_tensor / stride
    LOGGER.info("AutoAnchor: installed new anchors, BPR %.3f; update your YAML: %s", new_bpr,
                np.round(new).astype(int).reshape(head.nl, -1).tolist())
    return new_bpr


def main(argv: list[str] | None = None) -> int:
    from utils.data import create_dataloader, load_data_config

    parser = UserArgumentParser(description="Cluster anchors for a data set (k-means + genetic)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--imgsz", type=int, default=640, help=f"training size ({IMGSZ_HELP})")
    parser.add_argument("--n", type=int, default=9, help="number of anchors (levels x anchors per level)")
    parser.add_argument("--thr", type=float, default=4.0, help="anchor_t")
    parser.add_argument("--generations", type=int, default=1000)
    args = parser.parse_args(argv)
    image_sizes("--imgsz", args.imgsz)
    at_least("--n", args.n, 1)
    positive("--thr", args.thr)
    at_least("--generations", args.generations, 0)
    data = load_data_config(args.data)
    if not data.get("train"):
        raise DataConfigError(f"{data['yaml_file']}: no 'train' split to cluster anchors on")
    _, dataset = create_dataloader(data["train"], args.imgsz, 1, 32, augment=False, nc=data["nc"],
                                   require_labels=True)
    wh = label_sizes(dataset, args.imgsz, jitter=False)
    anchors = kmean_anchors(wh, args.n, args.thr, args.generations)
    bpr, aat = anchor_fit(wh, anchors, args.thr)
    print(f"anchors (pixels at {args.imgsz}): {np.round(anchors).astype(int).reshape(-1).tolist()}")
    print(f"best possible recall {bpr:.4f}, anchors above threshold {aat:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
