"""Turn a nested class-folder tree into training folders, with seeded, stratified train/val/test splits.

Input (any depth; a folder level is a label level)::

    images/car/car-whole/car-head/*.jpg    images/car/car-half/*.jpg    images/bus/...

``multilabel``: one head per folder level, flat files ``images/<split>/00000_<l1>_<l2>_<l3>_.jpg`` (the
filename-fields layout of :mod:`utils.data.classify`); a level an image does not reach (``car-half`` has no
head/tail level) is written ``x`` = missing label, which the loss skips. Sub-folder names lose their parent's
name as prefix (``car-whole`` under ``car`` -> ``whole``), so ``whole`` of cars and buses is one class.

``singlelabel``: one class per image, taken from folder level ``--level`` (1 = top) or the whole leaf path
(``--level leaf``: ``car-whole-head``), written as one folder per class (``--layout folder``, ImageFolder style)
or as flat ``00000_<class>_.jpg`` files (``--layout flat``).

Both write ``data.yaml`` (ready for train.py) and ``manifest.csv`` (index, split, file, labels, source).
Unreadable images are reported by name and skipped.

    python -m utils.data.classify_convert multilabel --src images --out datasets/vehicles --split 0.8 0.1 0.1
    python -m utils.data.classify_convert singlelabel --src images --out datasets/vehicle-type --level 1
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from utils.common.cli import UserArgumentParser, run_cli
from utils.common.errors import FlagError, MissingFileError
from utils.common.flags import existing_path
from utils.data.classify import IMAGE_SUFFIXES, verify_image

LOGGER = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class TreeImage:
    """An image of the source tree and its label at each folder level (prefixes stripped)."""

    path: Path
    levels: list[str]


def strip_parent_prefix(name: str, ancestors: Sequence[str]) -> str:
    """``'car-head'`` under ``['car', 'car-whole']`` -> ``'head'`` (nearest matching ancestor wins)."""
    for ancestor in reversed(ancestors):
        for sep in ("-", "_"):
            if name.startswith(ancestor + sep) and len(name) > len(ancestor) + 1:
                return name[len(ancestor) + 1:]
    return name


def scan_tree(src: Path, strip_prefixes: bool = True) -> tuple[list[TreeImage], list[tuple[Path, str]]]:
    """Every readable image under ``src`` with its folder levels; also the skipped files with reasons."""
    images, skipped = [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        folders = list(path.relative_to(src).parts[:-1])
        if not folders:
            skipped.append((path, "image directly in the source root has no class folder"))
            continue
        reason = verify_image(str(path))
        if reason:
            skipped.append((path, reason))
            continue
        levels = [strip_parent_prefix(f, folders[:i]) if strip_prefixes else f for i, f in enumerate(folders)]
        images.append(TreeImage(path, levels))
    for path, reason in skipped:
        LOGGER.warning("skipped %s: %s", path, reason)
    return images, skipped


def assign_splits(groups: dict[tuple, list], fractions: Sequence[float], seed: int) -> dict[str, list]:
    """Per group (one label combination) shuffle with ``seed`` and cut by ``fractions`` (train, val, test).

    Stratifying by group keeps every class combination in every split it is large enough for.
    """
    if len(fractions) not in (2, 3) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise FlagError(f"--split needs 2 or 3 non-negative fractions summing to 1, got {list(fractions)}")
    rng = random.Random(seed)
    splits: dict[str, list] = {name: [] for name in SPLIT_NAMES[: len(fractions)]}
    for key in sorted(groups):
        items = list(groups[key])
        rng.shuffle(items)
        n_train = round(len(items) * fractions[0])
        n_val = round(len(items) * fractions[1]) if len(fractions) == 3 else len(items) - n_train
        cuts = {"train": items[:n_train], "val": items[n_train:n_train + n_val], "test": items[n_train + n_val:]}
        for name in splits:
            splits[name] += cuts[name]
    for name in splits:
        rng.shuffle(splits[name])
    return splits


def _write(entries: dict[str, list], out: Path, file_name, copy_mode: str) -> list[dict]:
    """Copy (or link) every entry to ``out/images/<split>/<file_name(index, entry)>``; manifest rows back."""
    rows, index = [], 0
    for split, items in entries.items():
        for item, labels in items:
            target = out / "images" / split / file_name(index, item, labels)
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy_mode == "symlink":
                target.unlink(missing_ok=True)
                target.symlink_to(item.path.resolve())
            else:
                shutil.copy2(item.path, target)
            rows.append({"index": index, "split": split, "file": str(target.relative_to(out)),
                         "labels": " ".join(map(str, labels)), "source": str(item.path)})
            index += 1
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["index", "split", "file", "labels", "source"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def convert_multilabel(src: str | Path, out: str | Path, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                       seed: int = 0, head_names: Sequence[str] | None = None, strip_prefixes: bool = True,
                       copy_mode: str = "copy") -> Path:
    """Nested tree -> flat ``00000_<l1>_<l2>_.jpg`` files (one head per level); returns the data YAML path."""
    src, out = Path(src), Path(out)
    images, _ = scan_tree(src, strip_prefixes)
    if not images:
        raise MissingFileError(f"no readable images in class folders under {src}")
    depth = max(len(im.levels) for im in images)
    names = [sorted({im.levels[d] for im in images if len(im.levels) > d}) for d in range(depth)]
    head_names = list(head_names or [f"level{d + 1}" for d in range(depth)])
    if len(head_names) != depth:
        raise FlagError(f"--heads: {len(head_names)} names for a tree {depth} levels deep")

    def labels_of(im: TreeImage) -> list[int]:
        return [names[d].index(im.levels[d]) if d < len(im.levels) else -1 for d in range(depth)]

    groups: dict[tuple, list] = defaultdict(list)
    for im in images:
        groups[tuple(labels_of(im))].append((im, labels_of(im)))
    splits = assign_splits(groups, fractions, seed)

    def file_name(index: int, im: TreeImage, labels: list[int]) -> str:
        fields = "_".join("x" if v < 0 else str(v) for v in labels)
        return f"{index:05d}_{fields}_{im.path.suffix.lower()}"

    _write(splits, out, file_name, copy_mode)
    spec = {"path": ".", **{s: f"images/{s}" for s in splits if splits[s]},
            "heads": [{"name": h, "names": n} for h, n in zip(head_names, names)]}
    return _write_yaml(out, spec, f"multi-label set from {src}: one head per folder level, x = missing label")


def convert_singlelabel(src: str | Path, out: str | Path, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                        seed: int = 0, level: int | str = 1, layout: str = "folder", strip_prefixes: bool = True,
                        copy_mode: str = "copy") -> Path:
    """Nested tree -> one class per image (folder ``level`` or the whole leaf path); returns the data YAML."""
    src, out = Path(src), Path(out)
    images, _ = scan_tree(src, strip_prefixes)
    classes = {}
    for im in images:
        name = _class_name(im, level)
        if name is None:
            LOGGER.warning("skipped %s: no folder at level %s", im.path, level)
            continue
        classes[im.path] = name
    names = sorted(set(classes.values()))
    if not names:
        raise FlagError(f"--level {level}: no images under {src} have a folder at level {level}")
    groups: dict[tuple, list] = defaultdict(list)
    for im in images:
        if im.path in classes:
            label = names.index(classes[im.path])
            groups[(label,)].append((im, [label]))
    splits = assign_splits(groups, fractions, seed)
    if layout == "folder":
        def file_name(index: int, im: TreeImage, labels: list[int]) -> str:
            return f"{names[labels[0]]}/{index:05d}{im.path.suffix.lower()}"
        extra = {"nc": len(names), "names": names}
    elif layout == "flat":
        def file_name(index: int, im: TreeImage, labels: list[int]) -> str:
            return f"{index:05d}_{labels[0]}_{im.path.suffix.lower()}"
        extra = {"heads": [{"name": "class", "names": names}]}
    else:
        raise FlagError(f"--layout must be folder or flat, got '{layout}'")
    _write(splits, out, file_name, copy_mode)
    spec = {"path": ".", **{s: f"images/{s}" for s in splits if splits[s]}, **extra}
    return _write_yaml(out, spec, f"single-label set from {src}, class = folder level {level}, layout {layout}")


def _class_name(im: TreeImage, level: int | str) -> str | None:
    if level == "leaf":
        return "-".join(im.levels)
    index = int(level) - 1
    return im.levels[index] if 0 <= index < len(im.levels) else None


def _write_yaml(out: Path, spec: dict, comment: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.yaml"
    path.write_text(f"# {comment}\n" + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    LOGGER.info("wrote %s", path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["multilabel", "singlelabel"])
    parser.add_argument("--src", required=True, help="root of the nested class-folder tree")
    parser.add_argument("--out", required=True, help="output data-set folder (images/<split>, data.yaml)")
    parser.add_argument("--split", type=float, nargs="+", default=[0.8, 0.1, 0.1], help="train val [test] fractions")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--heads", nargs="+", default=None, help="multilabel: head name per folder level")
    parser.add_argument("--level", default="1", help="singlelabel: folder level giving the class (1 = top) or leaf")
    parser.add_argument("--layout", default="folder", choices=["folder", "flat"], help="singlelabel output layout")
    parser.add_argument("--keep-prefixes", action="store_true", help="keep parent-name prefixes in class names")
    parser.add_argument("--symlink", action="store_true", help="link to the source images instead of copying")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    existing_path("--src", args.src, "folder")
    mode = "symlink" if args.symlink else "copy"
    if args.mode == "multilabel":
        convert_multilabel(args.src, args.out, args.split, args.seed, args.heads, not args.keep_prefixes, mode)
    else:
        if args.level != "leaf" and not args.level.isdigit():
            raise FlagError(f"--level {args.level}: give a folder level (1 = top) or 'leaf'")
        level = args.level if args.level == "leaf" else int(args.level)
        convert_singlelabel(args.src, args.out, args.split, args.seed, level, args.layout, not args.keep_prefixes,
                            mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
