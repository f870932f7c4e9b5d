"""A small detector for tests that export, time or quantize a model many times: yolov5n's rows down to two levels
(P3, P4), the same blocks (Conv, C3, SPPF, Upsample, Concat, Detect) in 16 layers instead of 25, so that cutting,
exporting and capturing it (torch.export for QAT) costs about half as much."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TINY = {
    "nc": 6, "depth_multiple": 0.33, "width_multiple": 0.25,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 3, "C3", [512]], [-1, 1, "SPPF", [512, 5]]],
    "head": [[-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
             [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]], [[-1, 8], 1, "Concat", [1]],
             [-1, 3, "C3", [512, False]], [[11, 14], 1, "Detect", ["nc", "anchors"]]],
}


def tiny_yaml(folder: Path) -> Path:
    """:data:`TINY` as a model YAML file in ``folder`` (for tools that take ``--cfg``)."""
    path = folder / "tiny-yolov5n.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(TINY), sort_keys=False))
    return path
