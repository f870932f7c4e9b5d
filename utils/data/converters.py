"""Label converters and split tools: VOC XML -> YOLO, COCO JSON -> YOLO, stratified split, class subsets.

Functions do the work; the CLI (``python -m utils.data.converters voc2yolo|coco2yolo|split|subset``) only parses
arguments. Output label files are ``class cx cy w h`` normalised, 6 decimals.

The VOC and COCO converters read every annotation before writing anything and report each one they drop or
repair (a :class:`ConversionReport`: counts per reason, the first few by file and row), so that nothing is lost
silently; ``--strict`` refuses any such annotation and then writes nothing. The source files are only read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.errors import DataConfigError, FlagError, MissingFileError, UnreadableFileError
from utils.common.flags import at_least, existing_path, fraction
from utils.common.user_files import read_user_text
from utils.data.scan import img2label_paths, list_image_files, read_label_file

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


Row = tuple[int, float, float, float, float]  # class cx cy w h, normalised
EDGE_TOLERANCE = 1.0  # pixels a corner may lie beyond the image and be clipped unreported (0- vs 1-based tools)
EXAMPLES_PER_REASON = 3
SKIP_REASONS = {"difficult": ("difficult objects", "--include-difficult keeps them"),
                "iscrowd": ("iscrowd annotations", "crowd regions, not single objects; YOLOv5's COCO labels leave "
                                                   "them out too")}


@dataclass
class ConversionReport:
    """Every annotation a converter dropped or repaired, counted per reason, with the first few of each reason
    by file and row; ``skipped`` counts what is left out by choice (difficult objects, crowd regions)."""

    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> "where: what" (first few)
    first: str = ""  # the first problem in file and row order

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.dropped[reason] += 1
        self._example(reason, f"{where}: {detail}, dropped")

    def repair(self, reason: str, where: str, detail: str) -> None:
        self.repaired[reason] += 1
        self._example(reason, f"{where}: {detail}")

    def _example(self, reason: str, text: str) -> None:
        self.first = self.first or text
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(text)

    @property
    def problems(self) -> int:
        """Dropped plus repaired annotations: what ``--strict`` refuses."""
        return sum(self.dropped.values()) + sum(self.repaired.values())

    def summary(self) -> str:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))

        return (f"{sum(self.dropped.values())} annotations dropped ({counts(self.dropped) or 'none'}), "
                f"{sum(self.repaired.values())} repaired ({counts(self.repaired) or 'none'})")

    def lines(self) -> list[str]:
        """The summary, then the first few cases of each reason and how many more there are."""
        lines = [self.summary()]
        for reason, shown in sorted(self.examples.items()):
            lines += [f"{reason}: {text}" for text in shown]
            more = (self.dropped + self.repaired)[reason] - len(shown)
            lines += [f"{reason}: ... and {more} more"] if more else []
        return lines


@dataclass
class Conversion:
    """A converter's result before anything is written: class names, rows per output label file, the report."""

    names: list[str]
    labels: dict[str, list[Row]]  # label file name (image stem + .txt) -> rows
    report: ConversionReport


def _write_labels(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows), encoding="utf-8")


def write_conversion(conversion: Conversion, out_dir: str | Path) -> None:
    """One label file per image; nothing but these ``.txt`` files is written."""
    for name, rows in conversion.labels.items():
        _write_labels(Path(out_dir) / name, rows)


def _finish(conversion: Conversion, out_dir: str | Path, strict: bool, command: str, source: str | Path) -> None:
    """Log the report; with ``strict`` refuse any dropped or repaired annotation before writing anything."""
    report = conversion.report
    for reason, n in sorted(report.skipped.items()):
        LOGGER.info("%s: %d %s left out (%s)", command, n, *SKIP_REASONS[reason])
    log = LOGGER.warning if report.problems else LOGGER.info
    for line in report.lines():
        log("%s: %s", command, line)
    if strict and report.problems:
        raise DataConfigError(f"{command} --strict: {source}: {report.summary()}; first: {report.first}; nothing was "
                              f"written to {out_dir} (without --strict the labels are written with these drops and "
                              "repairs)")
    write_conversion(conversion, out_dir)
    LOGGER.info("%s: %d label files written to %s", command, len(conversion.labels), out_dir)


def _number(value: object, text: bool = False) -> float | None:
    """A finite number (or, with ``text``, the XML text of one), else None."""
    if isinstance(value, bool) or (isinstance(value, str) and not text):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pixel_box(corners: tuple[float, float, float, float], size: tuple[float, float], report: ConversionReport,
               where: str, written: str) -> tuple[float, float, float, float] | None:
    """0-based pixel corners (x0, y0, x1, y1) -> normalised (cx, cy, w, h), or None when dropped.

    Swapped corners are put in order and a box reaching beyond the image is clipped to it (both repairs,
    reported); a box of zero width or height, or one wholly outside the image, is dropped (reported). Corners
    within EDGE_TOLERANCE pixels outside are clipped unreported: the 0- or 1-based habit of the tool that wrote
    them. ``written`` is the box as the user's file has it, for the report.
    """
    width, height = size
    x0, y0, x1, y1 = corners
    if x0 > x1 or y0 > y1:
        which = " and ".join(axis for axis, bad in (("xmin > xmax", x0 > x1), ("ymin > ymax", y0 > y1)) if bad)
        report.repair("swapped_corners", where, f"{written}: {which}, swapped")
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    if x0 == x1 or y0 == y1:
        report.drop("zero_size", where, f"{written}: zero width or height")
        return None
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        report.drop("outside_image", where, f"{written}: outside the {width:g}x{height:g} image")
        return None
    beyond = max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1)
    if beyond > EDGE_TOLERANCE:
        report.repair("clipped", where, f"{written}: {beyond:g} px beyond the {width:g}x{height:g} image, clipped")
    return (cx0 + cx1) / 2 / width, (cy0 + cy1) / 2 / height, (cx1 - cx0) / width, (cy1 - cy0) / height


# --------------------------------------------------------------------------- VOC
VOC_CORNERS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class VocObject:
    name: str
    difficult: bool
    corners: tuple[str | None, ...]  # xmin ymin xmax ymax as written (None: absent)


def _voc_file(xml_file: Path) -> tuple[tuple[float, float] | None, list[VocObject]]:
    """(image size or None when <size> is absent or not positive, objects as written) of one VOC XML file."""
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as exc:
        raise DataConfigError(f"{xml_file}: not a readable VOC annotation (XML {exc}): fix or remove the file"
                              ) from None
    except PermissionError:
        raise UnreadableFileError(f"{xml_file}: not readable (permission denied); fix its permissions") from None
    size = root.find("size")
    width, height = (_number(size.findtext(k), text=True) if size is not None else None for k in ("width", "height"))
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        corners = tuple(box.findtext(k) if box is not None else None for k in VOC_CORNERS)
        objects.append(VocObject((obj.findtext("name") or "").strip(), (obj.findtext("difficult") or "").strip() == "1",
                                 corners))
    return ((width, height) if width and height and width > 0 and height > 0 else None), objects


def _xml_files(xml_source: str | Path | list) -> list[Path]:
    """The XML files of a folder, one file, or a list; none at all is a mistake worth an error."""
    if isinstance(xml_source, list):
        return list(map(Path, xml_source))
    source = Path(xml_source)
    files = [source] if source.is_file() else sorted(source.glob("*.xml"))
    if not files:
        raise MissingFileError(f"--xml {xml_source}: no .xml files in this folder")
    return files


def read_voc(xml_source: str | Path | list, names: list[str] | None = None,
             include_difficult: bool = False) -> Conversion:
    """VOC XML files (a folder or a list) -> rows per label file and the report; nothing is written.

    Without ``names`` the classes are collected from all files and sorted by name (stable across runs); with
    ``names``, objects of other classes are dropped (reported: a misspelt name would drop a whole class). A file
    without an image size in <size> gets no label file when it has objects (they cannot be normalised).
    """
    files = _xml_files(xml_source)
    parsed = {f: _voc_file(f) for f in files}  # every file is read before anything is written
    report = ConversionReport()
    wanted = {f: [(k, o) for k, o in enumerate(objects, 1) if include_difficult or not o.difficult]
              for f, (_, objects) in parsed.items()}
    report.skipped["difficult"] = sum(len(objects) for _, objects in parsed.values()) - sum(map(len, wanted.values()))
    if names is None:
        names = sorted({o.name for objects in wanted.values() for _, o in objects if o.name})
    index = {name: i for i, name in enumerate(names)}
    labels: dict[str, list[Row]] = {}
    for xml_file, (size, _) in parsed.items():
        rows = [_voc_row(o, size, index, report, f"{xml_file} object {k}") for k, o in wanted[xml_file]]
        if size is not None or not rows:
            labels[f"{xml_file.stem}.txt"] = [row for row in rows if row is not None]
    return Conversion(list(names), labels, report)


def _voc_row(obj: VocObject, size: tuple[float, float] | None, index: dict[str, int], report: ConversionReport,
             where: str) -> Row | None:
    """One object -> a label row, or None (dropped, reported).

    VOC pixel indices start at 1, so the corners move by -1 px (the convention of yolov5's VOC.yaml converter:
    centre (xmin + xmax) / 2 - 1, width xmax - xmin).
    """
    if not obj.name:
        report.drop("no_name", where, "no <name>")
        return None
    if obj.name not in index:
        report.drop("class_not_in_names", where, f"class '{obj.name}' is not in --names")
        return None
    if size is None:
        report.drop("no_image_size", where, "no positive <width> and <height> in <size>")
        return None
    corners = [_number(v, text=True) for v in obj.corners]
    written = " ".join(f"{k} {v}" for k, v in zip(VOC_CORNERS, obj.corners))
    if any(v is None for v in corners):
        report.drop("bad_box", where, f"<bndbox> {written}: needs numbers xmin ymin xmax ymax")
        return None
    box = _pixel_box(tuple(v - 1 for v in corners), size, report, where, written)
    return None if box is None else (index[obj.name], *box)


def voc_to_yolo(xml_source: str | Path | list, out_dir: str | Path, names: list[str] | None = None,
                include_difficult: bool = False, strict: bool = False) -> list[str]:
    """Convert VOC XML files to ``out_dir/<stem>.txt``, reporting every dropped or repaired object; returns the
    class names. ``strict``: any such object raises DataConfigError and nothing is written."""
    conversion = read_voc(xml_source, names, include_difficult)
    _finish(conversion, out_dir, strict, "voc2yolo", xml_source)
    return conversion.names


# --------------------------------------------------------------------------- COCO
def read_coco(json_file: str | Path) -> Conversion:
    """COCO detection JSON -> rows per image (empty for images without boxes) and the report; nothing is written.

    Category ids (sparse in COCO: 1..90) map to contiguous indices in id order; image sizes come from the JSON's
    ``images`` entries; ``iscrowd`` annotations are left out (counted). An annotation with an unknown image or
    category id, a bbox that is not 4 numbers, a negative or zero width or height, or one wholly outside its
    image is dropped; one reaching beyond its image is clipped (all reported).
    """
    try:
        return _read_coco(json.loads(read_user_text(json_file, "--json")), str(json_file))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DataConfigError(f"{json_file}: not a COCO detection JSON (images, annotations, categories): "
                              f"{type(exc).__name__} {exc}") from None


def _read_coco(coco: dict, source: str) -> Conversion:
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    images = {img["id"]: img for img in coco["images"]}
    label_names = _coco_label_names(coco["images"], source)
    report = ConversionReport()
    rows: dict[object, list[Row]] = {image_id: [] for image_id in images}
    boxed = set()  # images with annotations: without a size they get no label file (not a false background)
    for i, ann in enumerate(coco.get("annotations", [])):
        if isinstance(ann, dict) and ann.get("iscrowd", 0):
            report.skipped["iscrowd"] += 1
            continue
        row = _coco_row(ann, images, class_of, report, f"{source} annotations[{i}]")
        if row is not None:
            rows[ann["image_id"]].append(row)
        if isinstance(ann, dict) and isinstance(ann.get("image_id"), int | str):
            boxed.add(ann["image_id"])
    labels = {label_names[image_id]: image_rows for image_id, image_rows in rows.items()
              if _coco_size(images[image_id]) is not None or image_id not in boxed}
    return Conversion([c["name"] for c in categories], labels, report)


def _coco_label_names(images: list[dict], source: str) -> dict[object, str]:
    """Image id -> label file name; two images whose names differ only by folder would share one: refused."""
    names: dict[object, str] = {}
    first_of: dict[str, str] = {}
    for img in images:
        name = f"{Path(img['file_name']).stem}.txt"
        if name in first_of:
            raise DataConfigError(f"{source}: images '{first_of[name]}' and '{img['file_name']}' would both be "
                                  f"labelled by {name} (label files are named after the image without its folder): "
                                  "give the images distinct names")
        first_of[name], names[img["id"]] = img["file_name"], name
    return names


def _coco_size(img: dict) -> tuple[float, float] | None:
    width, height = _number(img.get("width")), _number(img.get("height"))
    return (width, height) if width and height and width > 0 and height > 0 else None


def _coco_row(ann: object, images: dict, class_of: dict, report: ConversionReport, where: str) -> Row | None:
    """One annotation -> a label row, or None (dropped, reported)."""
    if not isinstance(ann, dict):
        report.drop("bad_box", where, "not an annotation object")
        return None
    where = f"{where} (id {ann.get('id')})"
    image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
    if not isinstance(image_id, int | str) or image_id not in images:
        report.drop("unknown_image", where, f"image_id {image_id!r} is not in images")
        return None
    if not isinstance(category_id, int | str) or category_id not in class_of:
        report.drop("unknown_category", where, f"category_id {category_id!r} is not in categories")
        return None
    size = _coco_size(images[image_id])
    if size is None:
        report.drop("no_image_size", where, f"image {image_id!r} has no positive width and height")
        return None
    values = [_number(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else [None]
    if any(v is None for v in values):
        report.drop("bad_box", where, f"bbox {bbox!r} is not [x, y, width, height]")
        return None
    x, y, w, h = values
    if w < 0 or h < 0:
        report.drop("negative_size", where, f"bbox {bbox}: negative width or height")
        return None
    box = _pixel_box((x, y, x + w, y + h), size, report, where, f"bbox {bbox}")
    return None if box is None else (class_of[category_id], *box)


def coco_to_yolo(json_file: str | Path, out_dir: str | Path, strict: bool = False) -> list[str]:
    """Convert a COCO detection JSON to one YOLO label file per image, reporting every dropped or repaired
    annotation; returns the class names. ``strict``: any such annotation raises DataConfigError, nothing written."""
    conversion = read_coco(json_file)
    _finish(conversion, out_dir, strict, "coco2yolo", json_file)
    return conversion.names


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
REPORT_HELP = ("Every dropped or repaired annotation is reported: a count per reason and the first "
               f"{EXAMPLES_PER_REASON} of each by file and row. The source files are only read.")
VOC_HELP = ("VOC XML -> YOLO labels. Repaired: xmin > xmax (or ymin > ymax) swapped, a box more than "
            f"{EDGE_TOLERANCE:g} px beyond the image clipped. Dropped: no <name>, a class not in --names, no image "
            "size, a non-numeric box, zero width or height, a box wholly outside the image. " + REPORT_HELP)
COCO_HELP = ("COCO JSON -> YOLO labels. Repaired: a box more than "
             f"{EDGE_TOLERANCE:g} px beyond its image clipped. Dropped: an unknown image_id or category_id, a bbox "
             "that is not 4 numbers, a negative or zero width or height, a box wholly outside its image. iscrowd "
             "annotations are left out (counted). " + REPORT_HELP)
STRICT_HELP = ("refuse any dropped or repaired annotation: exit status 2 with one error: line, and nothing is "
               "written to --out (without --strict the labels are written with the reported drops and repairs)")


def _parser() -> argparse.ArgumentParser:
    parser = UserArgumentParser(description="YOLO label converters and split tools")
    sub = parser.add_subparsers(dest="command", required=True)
    voc = sub.add_parser("voc2yolo", help="VOC XML folder -> YOLO txt folder", description=VOC_HELP)
    voc.add_argument("--xml", required=True)
    voc.add_argument("--out", required=True)
    voc.add_argument("--names", nargs="*", help="class names in index order (default: collected, sorted); objects "
                                                "of other classes are dropped and reported")
    voc.add_argument("--include-difficult", action="store_true")
    voc.add_argument("--strict", action="store_true", help=STRICT_HELP)
    coco = sub.add_parser("coco2yolo", help="COCO JSON -> YOLO txt folder", description=COCO_HELP)
    coco.add_argument("--json", required=True)
    coco.add_argument("--out", required=True)
    coco.add_argument("--strict", action="store_true", help=STRICT_HELP)
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
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FlagError(f"--out {args.out} is a file; give a folder for the output")
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
        print("names:", voc_to_yolo(args.xml, args.out, args.names, args.include_difficult, args.strict))
    elif args.command == "coco2yolo":
        print("names:", coco_to_yolo(args.json, args.out, args.strict))
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
