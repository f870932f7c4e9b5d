"""Label converters and split tools: VOC XML -> YOLO, COCO JSON -> YOLO, stratified split, class subsets.

Functions do the work; the CLI (``python -m utils.data.converters voc2yolo|coco2yolo|split|subset``) only parses
arguments. Output label files are ``class cx cy w h`` normalised, 6 decimals.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.errors import DataConfigError, FlagError
from utils.common.flags import at_least, existing_path, fraction
from utils.common.user_files import read_user_text
from utils.data.scan import img2label_paths, list_image_files, read_label_file

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def _write_labels(path: Path, rows: list[tuple[int, float, float, float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows), encoding="utf-8")


def _clip01(*values: float) -> tuple[float, ...]:
    return tuple(min(max(v, 0.0), 1.0) for v in values)


# --------------------------------------------------------------------------- VOC
def _voc_objects(xml_file: Path, include_difficult: bool) -> tuple[tuple[float, float], list[tuple]]:
    try:
        root = ET.parse(xml_file).getroot()
        size = root.find("size")
        width = float(size.findtext("width", "0")) if size is not None else 0.0
        height = float(size.findtext("height", "0")) if size is not None else 0.0
        objects = []
        for obj in root.iter("object"):
            if not include_difficult and int(obj.findtext("difficult", "0") or 0) == 1:
                continue
            box = obj.find("bndbox")
            coords = tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((obj.findtext("name", "").strip(), *coords))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise DataConfigError(f"{xml_file}: not a VOC annotation (<size>, <object><bndbox> with numbers): {exc}"
                              ) from None
    return (width, height), objects


def voc_box_to_yolo(size: tuple[float, float], xmin: float, ymin: float, xmax: float, ymax: float,
                    ) -> tuple[float, float, float, float]:
    """VOC pixel box (1-based, as in VOC XML) -> normalised cx cy w h.

    VOC pixel indices start at 1, so the centre moves by -1 px (the convention of yolov5's VOC.yaml converter);
    width and height are xmax - xmin, ymax - ymin.
    """
    w, h = size
    cx, cy = (xmin + xmax) / 2 - 1, (ymin + ymax) / 2 - 1
    return _clip01(cx / w, cy / h, (xmax - xmin) / w, (ymax - ymin) / h)


def voc_to_yolo(xml_source: str | Path | list, out_dir: str | Path, names: list[str] | None = None,
                include_difficult: bool = False) -> list[str]:
    """Convert VOC XML files (a folder or a list) to ``out_dir/<stem>.txt``; returns the class names used.

    Without ``names`` the classes are collected from all files and sorted by name (stable across runs); with
    ``names``, objects of other classes are skipped and counted in a warning.
    """
    files = sorted(Path(xml_source).glob("*.xml")) if not isinstance(xml_source, list) else map(Path, xml_source)
    parsed = {f: _voc_objects(f, include_difficult) for f in files}
    if names is None:
        names = sorted({obj[0] for _, objects in parsed.values() for obj in objects})
    index = {name: i for i, name in enumerate(names)}
    skipped: Counter = Counter()
    for xml_file, (size, objects) in parsed.items():
        if size[0] <= 0 or size[1] <= 0:
            LOGGER.warning("%s: no image size in <size>, skipped", xml_file)
            continue
        rows = []
        for name, *coords in objects:
            if name not in index:
                skipped[name] += 1
                continue
            rows.append((index[name], *voc_box_to_yolo(size, *coords)))
        _write_labels(Path(out_dir) / f"{xml_file.stem}.txt", rows)
    if skipped:
        LOGGER.warning("objects of classes not in names skipped: %s", dict(skipped))
    return list(names)


# --------------------------------------------------------------------------- COCO
def coco_to_yolo(json_file: str | Path, out_dir: str | Path) -> list[str]:
    """COCO detection JSON -> one YOLO label file per image (empty for images without boxes); returns names.

    Category ids (sparse in COCO: 1..90) map to contiguous indices in id order; ``iscrowd`` annotations and
    boxes without area are skipped; image sizes come from the JSON's ``images`` entries.
    """
    try:
        return _coco_to_yolo(json.loads(read_user_text(json_file, "--json")), out_dir)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise DataConfigError(f"{json_file}: not a COCO detection JSON (images, annotations, categories): "
                              f"{type(exc).__name__} {exc}") from None


def _coco_to_yolo(coco: dict, out_dir: str | Path) -> list[str]:
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    rows: dict[int, list] = {img["id"]: [] for img in coco["images"]}
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    for ann in coco.get("annotations", []):
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or w <= 0 or h <= 0 or ann["image_id"] not in sizes:
            continue
        width, height = sizes[ann["image_id"]]
        box = _clip01((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
        rows[ann["image_id"]].append((class_of[ann["category_id"]], *box))
    for img in coco["images"]:
        _write_labels(Path(out_dir) / f"{Path(img['file_name']).stem}.txt", rows[img["id"]])
    return [c["name"] for c in categories]


# --------------------------------------------------------------------------- split
def dominant_class(labels: np.ndarray) -> int:
    """Most frequent class of an image (ties: the one that appears first); -1 for backgrounds."""
    if not len(labels):
        return -1
    classes = labels[:, 0].astype(int)
    counts = Counter(classes.tolist())
    best = max(counts.values())
    return next(c for c in classes.tolist() if counts[c] == best)


def split_dataset(images: str | Path | list, out_dir: str | Path, fractions: tuple[float, ...] = (0.8, 0.2, 0.0),
                  counts: dict[int, tuple[int, ...]] | None = None, seed: int = 0,
                  copy: bool = False) -> dict[str, list[str]]:
    """Stratified split by each image's dominant class; writes ``train.txt``/``val.txt``/``test.txt``.

    ``fractions`` (train, val, test) apply per class; ``counts`` {class: (n_train, n_val, n_test)} instead fixes
    the numbers per class (classes missing from it are left out). ``copy`` also copies images and labels into
    ``out_dir/images/<split>`` and ``out_dir/labels/<split>``. Same seed, same split.
    """
    files = list_image_files(images)
    strata: dict[int, list[str]] = {}
    for f, lb in zip(files, img2label_paths(files)):
        strata.setdefault(dominant_class(read_label_file(lb).labels), []).append(f)
    rng = np.random.default_rng(seed)
    result: dict[str, list[str]] = {s: [] for s in SPLITS}
    for cls in sorted(strata):
        members = [strata[cls][i] for i in rng.permutation(len(strata[cls]))]
        if counts is not None:
            cuts = np.cumsum(counts.get(cls, (0, 0, 0)))
        else:
            cuts = np.round(np.cumsum(fractions) * len(members)).astype(int)
        cuts = np.minimum(cuts, len(members))
        for split, start, stop in zip(SPLITS, np.concatenate(([0], cuts[:-1])), cuts):
            result[split] += members[start:stop]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, members in result.items():
        members.sort()
        if members:
            (out / f"{split}.txt").write_text("".join(f"{m}\n" for m in members), encoding="utf-8")
            if copy:
                _copy_pairs(members, out, split)
    return result


def _copy_pairs(images: list[str], out: Path, split: str) -> None:
    for im, lb in zip(images, img2label_paths(images)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        shutil.copy2(im, out / "images" / split / Path(im).name)
        if Path(lb).exists():
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy2(lb, out / "labels" / split / Path(lb).name)


# --------------------------------------------------------------------------- subset
def make_subset(images: str | Path | list, out_dir: str | Path, n: int, class_id: int | None = None,
                seed: int = 0, split: str = "train") -> list[Path]:
    """Copy ``n`` random images (seeded) with their labels to ``out_dir/images/<split>``.

    With ``class_id`` only images containing that class are eligible and only its boxes are kept, remapped to
    class 0 (a one-class data set for quick experiments).
    """
    files = list_image_files(images)
    labels = [read_label_file(lb).labels for lb in img2label_paths(files)]
    if class_id is not None:
        eligible = [i for i, lb in enumerate(labels) if (lb[:, 0] == class_id).any()]
    else:
        eligible = list(range(len(files)))
    chosen = sorted(np.random.default_rng(seed).permutation(eligible)[:n].tolist())
    out = Path(out_dir)
    written = []
    for i in chosen:
        lb = labels[i]
        if class_id is not None:
            lb = lb[lb[:, 0] == class_id].copy()
            lb[:, 0] = 0
        target = out / "images" / split / Path(files[i]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(files[i], target)
        rows = [(int(r[0]), *map(float, r[1:])) for r in lb]
        _write_labels(out / "labels" / split / f"{target.stem}.txt", rows)
        written.append(target)
    return written


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = UserArgumentParser(description="YOLO label converters and split tools")
    sub = parser.add_subparsers(dest="command", required=True)
    voc = sub.add_parser("voc2yolo", help="VOC XML folder -> YOLO txt folder")
    voc.add_argument("--xml", required=True)
    voc.add_argument("--out", required=True)
    voc.add_argument("--names", nargs="*", help="class names in index order (default: collected, sorted)")
    voc.add_argument("--include-difficult", action="store_true")
    coco = sub.add_parser("coco2yolo", help="COCO JSON -> YOLO txt folder")
    coco.add_argument("--json", required=True)
    coco.add_argument("--out", required=True)
    split = sub.add_parser("split", help="stratified train/val/test split of an image folder or list")
    split.add_argument("--images", required=True)
    split.add_argument("--out", required=True)
    split.add_argument("--fractions", nargs="+", type=float, default=[0.8, 0.2, 0.0])
    split.add_argument("--counts", help='per-class counts as JSON, e.g. \'{"0": [40, 10, 0]}\'')
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--copy", action="store_true", help="also copy images/labels into out/images/<split>")
    subset = sub.add_parser("subset", help="N training images of a data YAML, optionally one class only")
    subset.add_argument("--data", required=True)
    subset.add_argument("--out", required=True)
    subset.add_argument("--n", type=int, required=True)
    subset.add_argument("--class-id", type=int)
    subset.add_argument("--seed", type=int, default=0)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Inputs exist and numbers are in their domain before anything is read or written."""
    for flag in ("xml", "json", "images", "data"):
        existing_path(f"--{flag}", getattr(args, flag, None), "file or folder")
    if args.command == "split":
        for value in args.fractions:
            fraction("--fractions", value)
        if len(args.fractions) not in (2, 3) or abs(sum(args.fractions) - 1) > 1e-6:
            raise FlagError(f"--fractions {' '.join(map(str, args.fractions))}: give 2 or 3 fractions summing to 1")
        if args.counts and not _valid_counts(args.counts):
            raise FlagError(f"--counts {args.counts}: expected JSON like '{{\"0\": [40, 10, 0]}}'")
    if args.command == "subset":
        at_least("--n", args.n, 1)
        at_least("--class-id", args.class_id, 0)


def _valid_counts(text: str) -> bool:
    try:
        counts = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(counts, dict) and all(isinstance(v, list) and len(v) in (2, 3) for v in counts.values())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.command == "voc2yolo":
        print("names:", voc_to_yolo(args.xml, args.out, args.names, args.include_difficult))
    elif args.command == "coco2yolo":
        print("names:", coco_to_yolo(args.json, args.out))
    elif args.command == "split":
        counts = {int(k): tuple(v) for k, v in json.loads(args.counts).items()} if args.counts else None
        result = split_dataset(args.images, args.out, tuple(args.fractions), counts, args.seed, args.copy)
        print({k: len(v) for k, v in result.items()})
    else:
        _subset_cli(args)
    return 0


def _subset_cli(args: argparse.Namespace) -> None:
    from utils.data.config import load_data_config

    data = load_data_config(args.data)
    if args.class_id is not None and args.class_id >= data["nc"]:
        raise FlagError(f"--class-id {args.class_id}: {args.data} has {data['nc']} classes (ids 0-{data['nc'] - 1})")
    written = make_subset(data["train"], args.out, args.n, args.class_id, args.seed)
    names = [data["names"][args.class_id]] if args.class_id is not None else data["names"]
    config = {"path": str(Path(args.out).resolve()), "train": "images/train", "val": data.get("val"),
              "nc": len(names), "names": names}
    if args.class_id is not None:
        config.pop("val")  # the original val set has other classes; split the subset or convert val too
    (Path(args.out) / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    print(f"{len(written)} images written to {args.out}, data YAML {Path(args.out) / 'data.yaml'}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
