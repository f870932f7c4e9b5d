"""Data-set report: class balance, box sizes at the training size, backgrounds, duplicate/leaked images.

``python -m utils.data.report --data X.yaml --imgsz 640``. Box sizes are measured in pixels after the long-side
resize to ``imgsz`` because that is what the anchors and strides see. Small/medium/large use the COCO
thresholds (area 32^2 and 96^2 pixels on ~640 px COCO images) scaled by imgsz / 640.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.flags import IMGSZ_HELP, image_sizes
from utils.data.config import SPLIT_KEYS, load_data_config
from utils.data.scan import list_image_files, scan_dataset

PERCENTILES = (5, 25, 50, 75, 95)
COCO_SMALL, COCO_MEDIUM, COCO_REFERENCE_SIZE = 32, 96, 640


def content_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def box_size_stats(labels: list[np.ndarray], shapes_wh: np.ndarray, imgsz: int) -> dict[str, Any]:
    """Pixel sizes of all boxes at the training size: small/medium/large counts and percentiles."""
    scale = imgsz / shapes_wh.max(1)
    sizes = [lb[:, 3:5] * wh * s for lb, wh, s in zip(labels, shapes_wh, scale) if len(lb)]
    wh = np.concatenate(sizes, 0) if sizes else np.zeros((0, 2))
    side = np.sqrt(wh.prod(1))
    small, medium = (t * imgsz / COCO_REFERENCE_SIZE for t in (COCO_SMALL, COCO_MEDIUM))
    stats: dict[str, Any] = {"thresholds_px": (small, medium), "small": int((side < small).sum()),
                             "medium": int(((side >= small) & (side < medium)).sum()),
                             "large": int((side >= medium).sum())}
    for name, values in (("width", wh[:, 0]), ("height", wh[:, 1]), ("sqrt_area", side)):
        stats[f"{name}_percentiles"] = dict(zip(PERCENTILES, np.percentile(values, PERCENTILES).round(1).tolist()
                                                if len(values) else [0.0] * len(PERCENTILES)))
    return stats


def split_report(files: list[str], names: list[str], imgsz: int, cache_dir: str | Path | None) -> dict[str, Any]:
    scan = scan_dataset(files, nc=len(names), cache_dir=cache_dir)
    images_per_class, instances_per_class = np.zeros(len(names), int), np.zeros(len(names), int)
    for lb in scan.labels:
        classes = lb[:, 0].astype(int)
        instances_per_class += np.bincount(classes, minlength=len(names))
        images_per_class[np.unique(classes)] += 1
    return {"images": len(scan.im_files), "instances": int(instances_per_class.sum()),
            "backgrounds": int(sum(len(lb) == 0 for lb in scan.labels)),
            "per_class": {n: {"images": int(i), "instances": int(k)}
                          for n, i, k in zip(names, images_per_class, instances_per_class)},
            "box_sizes": box_size_stats(scan.labels, scan.shapes, imgsz), "scan": scan.report.summary(),
            "files": scan.im_files}


def duplicate_report(split_files: dict[str, list[str]]) -> dict[str, Any]:
    """Groups of byte-identical images inside each split, and images shared between splits (leakage)."""
    by_hash: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split, files in split_files.items():
        for f in files:
            by_hash[content_hash(f)][split].append(f)
    within = {s: [sorted(g[s]) for g in by_hash.values() if len(g.get(s, [])) > 1] for s in split_files}
    splits = list(split_files)
    across = {}
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            if split_files[a] == split_files[b]:
                across[f"{a}/{b}"] = "same image list"
                continue
            across[f"{a}/{b}"] = [sorted(g[a] + g[b]) for g in by_hash.values() if g.get(a) and g.get(b)]
    return {"within": within, "across": across}


def dataset_report(data_yaml: str | Path, imgsz: int = 640, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the printer shows, as a dict (per split: counts, per class, box sizes; duplicates)."""
    data = load_data_config(data_yaml)
    splits = {}
    for key in SPLIT_KEYS:
        if data.get(key):
            splits[key] = split_report(list_image_files(data[key]), data["names"], imgsz, cache_dir)
    duplicates = duplicate_report({k: v.pop("files") for k, v in splits.items()})
    return {"data": str(data_yaml), "imgsz": imgsz, "names": data["names"], "splits": splits,
            "duplicates": duplicates}


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text of :func:`dataset_report`."""
    lines = [f"data set {report['data']} at imgsz {report['imgsz']}"]
    for split, info in report["splits"].items():
        lines.append(f"\n[{split}] {info['images']} images, {info['instances']} instances, "
                     f"{info['backgrounds']} backgrounds\n  scan: {info['scan']}")
        lines.append(f"  {'class':<20}{'images':>8}{'instances':>11}")
        lines += [f"  {name:<20}{c['images']:>8}{c['instances']:>11}" for name, c in info["per_class"].items()]
        sizes = info["box_sizes"]
        small, medium = sizes["thresholds_px"]
        lines.append(f"  box sizes (px at {report['imgsz']}): small (<{small:g}) {sizes['small']}, medium "
                     f"{sizes['medium']}, large (>={medium:g}) {sizes['large']}")
        for key in ("width", "height", "sqrt_area"):
            pct = ", ".join(f"p{p} {v:g}" for p, v in sizes[f"{key}_percentiles"].items())
            lines.append(f"    {key:<10} {pct}")
    lines.append("\nduplicates (byte-identical images):")
    for split, groups in report["duplicates"]["within"].items():
        lines.append(f"  within {split}: {len(groups)} groups" + "".join(f"\n    {' = '.join(g)}" for g in groups))
    for pair, groups in report["duplicates"]["across"].items():
        text = groups if isinstance(groups, str) else f"{len(groups)} shared images (leakage)" + "".join(
            f"\n    {' = '.join(g)}" for g in groups)
        lines.append(f"  across {pair}: {text}")
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    print(format_report(report))


def main(argv: list[str] | None = None) -> int:
    parser = UserArgumentParser(description="Data-set statistics and leakage check")
    parser.add_argument("--data", required=True, help="data YAML")
    parser.add_argument("--imgsz", type=int, default=640,
                        help=f"training size (long side) for box sizes ({IMGSZ_HELP})")
    parser.add_argument("--cache-dir", help="where scan caches go (default: beside the labels, or the user cache)")
    args = parser.parse_args(argv)
    image_sizes("--imgsz", args.imgsz)
    print_report(dataset_report(args.data, args.imgsz, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, log_level=logging.WARNING))
