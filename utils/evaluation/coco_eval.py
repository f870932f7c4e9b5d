"""Independent cross-check of our mAP with pycocotools on the same predictions (``val.py --cocoeval``).

Ground truth is rebuilt from the YOLO labels in original-image pixels; predictions come from the JSON that
validation wrote. COCO's AP differs from v7.0's by design in one place: v7.0 extends the precision envelope
to recall 1 with precision 0 and integrates that last segment, COCO stops at the highest recall reached.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from utils.data.detect import DetectionDataset


def coco_ground_truth(records: Iterable[tuple[str, tuple[int, int], np.ndarray]], nc: int) -> dict:
    """COCO dict from (image id, (h, w), labels n x 5 [cls, cx, cy, w, h] normalised) records."""
    images, annotations = [], []
    for image_id, (h, w), labels in records:
        images.append({"id": image_id, "height": int(h), "width": int(w), "file_name": f"{image_id}"})
        for cls, cx, cy, bw, bh in np.asarray(labels, dtype=float).reshape(-1, 5):
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": k, "name": str(k)} for k in range(nc)]
    return {"images": images, "annotations": annotations, "categories": categories}


def cocoeval_map(ground_truth: dict, predictions: list[dict]) -> dict[str, float]:
    """mAP50 and mAP50-95 by pycocotools (all areas, maxDets 100)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(predictions) if predictions else COCO()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"mAP50-95": float(evaluator.stats[0]), "mAP50": float(evaluator.stats[1])}


def cocoeval_cross_check(dataset: DetectionDataset, predictions_json: str | Path, nc: int) -> dict[str, float]:
    """Score ``predictions_json`` against ``dataset``'s labels (image ids are file stems)."""
    records = [(Path(f).stem, (int(shape[1]), int(shape[0])), labels)
               for f, shape, labels in zip(dataset.im_files, dataset.shapes, dataset.labels)]
    predictions = json.loads(Path(predictions_json).read_text())
    return cocoeval_map(coco_ground_truth(records, nc), predictions)
