"""Classification data: multi-head data YAMLs, three label layouts, multi-source merging, augmentation, loaders.

Data YAML (paths relative to ``path``, which is relative to the YAML's folder)::

    path: .
    train: images/train              # the shared source: labels every head without a source of its own
    val: images/val
    heads:
      - name: color
        names: [black, blue, red]
      - name: defect                 # a head with its own sources (multi-source training)
        names: [crazing, inclusion, patches, pitted_surface, rolled-in_scale, scratches]
        train: ../neu-det/images/train
        val: ../neu-det/images/val
        layout: prefix               # optional; detected when absent

A single-head set may use ``nc``/``names`` instead of ``heads`` (ImageFolder style: one folder per class).

Label layouts of a source folder (``layout``, detected from the folder when not given):

* ``fields``: flat files ``00000_0_1_2_.jpg``, the index then one class index per head of the source, in
  heads order; ``x`` or ``-1`` marks a missing label;
* ``folder``: one sub-folder per class, named as in ``names`` (the folder names become ``names`` when the
  head gives none);
* ``prefix``: flat files whose name before the last ``_`` is the class name (NEU-DET's ``crazing_12.jpg``).

An image from a source gets target ``-1`` for every head that source does not label; the loss and the metrics
skip those entries. Unreadable or mislabelled files are reported by name and skipped.

Batches are ``(images, targets, paths)``: ``images`` uint8 RGB ``(b, 3, s, s)`` (the task divides by 255 on the
device, the same input convention as the detector, so exported models take float RGB in [0, 1]),
``targets`` int64 ``(b, n_heads)`` with -1 = no label.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.common.errors import DataConfigError, MissingFileError
from utils.common.user_files import load_user_yaml
from utils.data.augment import augment_hsv
from utils.data.config import parse_class_count
from utils.data.workers import init_worker

LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"}
LAYOUTS = ("fields", "folder", "prefix")
SPLITS = ("train", "val", "test")
_FIELDS_NAME = re.compile(r"^\d+(?:_(?:-?\d+|x))+_?$")
MISSING = -1


# ---------------------------------------------------------------------------------------------- data YAML
@dataclass
class LabelSource:
    """One folder (or .txt list) of images and which heads its labels fill, in field order."""

    root: Path
    heads: list[int]
    layout: str


@dataclass
class ClassifyData:
    """A parsed classification data YAML: heads and, per split, its label sources."""

    heads: list[dict[str, Any]]
    sources: dict[str, list[LabelSource]]
    yaml_file: Path | None = None
    head_weights: list[float] | None = None

    @property
    def head_names(self) -> list[str]:
        return [h["name"] for h in self.heads]


def load_classify_data(path: str | Path) -> ClassifyData:
    """Read a classification data YAML: heads (with class names) and the label sources of every split."""
    yaml_file = Path(path).expanduser().resolve()
    raw = load_user_yaml(yaml_file, "data YAML", DataConfigError) or {}
    if not isinstance(raw, dict):
        raise DataConfigError(f"{yaml_file}: expected a mapping with train/val and heads (or names)")
    root = Path(str(raw.get("path") or ".")).expanduser()
    root = (root if root.is_absolute() else yaml_file.parent / root).resolve()
    heads = _raw_heads(raw, yaml_file)
    sources = {split: _split_sources(raw, heads, split, root, yaml_file) for split in SPLITS}
    _fill_folder_names(heads, sources, yaml_file)
    weights = [float(h.get("weight", 1.0)) for h in heads] if any("weight" in h for h in heads) else None
    clean = [{"name": str(h["name"]), "names": [str(n) for n in h["names"]]} for h in heads]
    return ClassifyData(clean, sources, yaml_file, weights)


def _raw_heads(raw: dict, yaml_file: Path) -> list[dict[str, Any]]:
    """``heads:`` entries, or one head ``class`` from ``names``/``nc`` (or from class folders, filled later)."""
    if raw.get("heads"):
        heads = []
        for k, entry in enumerate(raw["heads"]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise DataConfigError(f"{yaml_file}: heads[{k}] must be a mapping with 'name' and 'names'")
            heads.append(dict(entry, names=_names_list(entry.get("names"), entry.get("nc"), yaml_file)))
        if len({h["name"] for h in heads}) != len(heads):
            raise DataConfigError(f"{yaml_file}: head names must be unique")
        return heads
    return [{"name": "class", "names": _names_list(raw.get("names"), raw.get("nc"), yaml_file)}]


def _names_list(names: Any, nc: Any, yaml_file: Path) -> list[str] | None:
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=str)]
    if isinstance(names, list | tuple):
        if not names:
            raise DataConfigError(f"{yaml_file}: 'names' is empty; list one name per class")
        return [str(n) for n in names]
    if names is not None:
        raise DataConfigError(f"{yaml_file}: 'names' must be a list or a dict, got {type(names).__name__}")
    return [str(i) for i in range(parse_class_count(nc, yaml_file))] if nc is not None else None


def _split_sources(raw: dict, heads: list[dict], split: str, root: Path, yaml_file: Path) -> list[LabelSource]:
    """Heads with their own sources get them; the other heads share the top-level ``split`` entry."""
    own = {k for k, h in enumerate(heads) if any(h.get(s) for s in SPLITS)}
    sources = []
    for k in sorted(own):
        for entry in _as_list(heads[k].get(split)):
            sources.append(_make_source(entry, [k], heads[k].get("layout"), root, yaml_file, split))
    shared = [k for k in range(len(heads)) if k not in own]
    if shared:
        for entry in _as_list(raw.get(split)):
            sources.append(_make_source(entry, shared, raw.get("layout"), root, yaml_file, split))
    return sources


def _as_list(value: Any) -> list:
    return [] if not value else list(value) if isinstance(value, (list, tuple)) else [value]


def _make_source(entry: Any, head_ids: list[int], layout: str | None, root: Path, yaml_file: Path,
                 split: str) -> LabelSource:
    path = Path(str(entry)).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.exists():
        raise MissingFileError(f"{yaml_file}: '{split}: {entry}' -> {path} does not exist")
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise DataConfigError(f"{yaml_file}: layout '{layout}' unknown; use one of {LAYOUTS}")
    if layout != "fields" and len(head_ids) != 1:
        raise DataConfigError(f"{yaml_file}: '{split}: {entry}' is a '{layout}' source, which labels one head, but "
                         f"{len(head_ids)} heads would read it; give those heads their own sources")
    return LabelSource(path, head_ids, layout)


def detect_layout(path: Path) -> str:
    """``folder`` when images sit in sub-folders, ``fields`` for ``00000_1_2_.jpg`` names, else ``prefix``."""
    if path.is_file():
        return "fields"
    if any(p.is_dir() for p in path.iterdir()) and not any(_is_image(p) for p in path.iterdir()):
        return "folder"
    first = next((p for p in sorted(path.iterdir()) if _is_image(p)), None)
    return "fields" if first is not None and _FIELDS_NAME.match(first.stem) else "prefix"


def _fill_folder_names(heads: list[dict], sources: dict[str, list[LabelSource]], yaml_file: Path) -> None:
    """A head without ``names`` takes the sorted class folders of its first folder-layout source."""
    for k, head in enumerate(heads):
        if head.get("names"):
            continue
        folders = [s.root for split in SPLITS for s in sources[split] if k in s.heads and s.layout == "folder"]
        if not folders:
            raise DataConfigError(f"{yaml_file}: head '{head['name']}' has no 'names' and no class folders to read "
                                  "them")
        head["names"] = sorted(p.name for p in folders[0].iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------------- labels
@dataclass
class ScanIssues:
    """Files skipped while listing a split, with the reason, so a data problem is visible and not silent."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def log(self, prefix: str = "") -> None:
        for path, reason in self.skipped[:20]:
            LOGGER.warning("%sskipped %s: %s", prefix, path, reason)
        if len(self.skipped) > 20:
            LOGGER.warning("%s... and %d more skipped files", prefix, len(self.skipped) - 20)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _list_images(root: Path) -> list[Path]:
    if root.is_file():  # a .txt list, one path per line (relative to the list's folder)
        lines = [line.strip() for line in root.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [p if p.is_absolute() else (root.parent / p) for p in map(Path, lines)]
    return sorted(p for p in root.iterdir() if _is_image(p))


def parse_fields_name(stem: str, n_fields: int) -> list[int] | None:
    """``'00012_0_2_'`` -> ``[0, 2]``; ``x``/``-1`` -> -1; None when the count of fields is wrong."""
    parts = [p for p in stem.split("_") if p != ""]
    if len(parts) != n_fields + 1 or not parts[0].isdigit():
        return None
    try:
        return [MISSING if p in {"x", "-1"} else int(p) for p in parts[1:]]
    except ValueError:
        return None


def source_samples(source: LabelSource, heads: list[dict], issues: ScanIssues) -> list[tuple[str, list[int]]]:
    """``[(image path, targets over all heads)]`` for one source; bad names are reported, not raised."""
    n_heads = len(heads)
    if source.layout == "folder":
        (k,) = source.heads
        return _folder_samples(source.root, k, heads[k]["names"], n_heads, issues)
    samples = []
    for path in _list_images(source.root):
        labels = _flat_labels(path, source, heads)
        if isinstance(labels, str):
            issues.add(path, labels)
            continue
        targets = [MISSING] * n_heads
        for k, value in zip(source.heads, labels):
            targets[k] = value
        samples.append((str(path), targets))
    return samples


def _flat_labels(path: Path, source: LabelSource, heads: list[dict]) -> list[int] | str:
    """Labels of a flat-layout file for ``source.heads``, or the reason the file is unusable."""
    if source.layout == "prefix":
        (k,) = source.heads
        name = path.stem.rsplit("_", 1)[0]
        if name not in heads[k]["names"]:
            return f"class '{name}' (from the file name) not in {heads[k]['name']} names"
        return [heads[k]["names"].index(name)]
    labels = parse_fields_name(path.stem, len(source.heads))
    if labels is None:
        return f"expected index + {len(source.heads)} class fields in the name (e.g. 00000{'_0' * len(source.heads)}_)"
    for k, value in zip(source.heads, labels):
        if value >= len(heads[k]["names"]) or value < MISSING:
            return f"class {value} out of range for head '{heads[k]['name']}' ({len(heads[k]['names'])} classes)"
    return labels


def _folder_samples(root: Path, k: int, names: list[str], n_heads: int, issues: ScanIssues):
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in names:
            issues.add(folder, f"class folder not in head names {names}")
            continue
        for path in _list_images(folder):
            targets = [MISSING] * n_heads
            targets[k] = names.index(folder.name)
            samples.append((str(path), targets))
    return samples


def verify_image(path: str) -> str | None:
    """None when PIL can parse the whole file and it has a usable size, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            width, height = im.size
    except Exception as exc:  # PIL raises many types for corrupt files; the reason is reported per file
        return f"unreadable image ({type(exc).__name__}: {exc})"
    if width < 10 or height < 10:
        return f"image too small ({width}x{height})"
    return None


def split_samples(data: ClassifyData, split: str, verify: bool = True,
                  prefix: str = "") -> tuple[list[tuple[str, list[int]]], ScanIssues]:
    """All samples of ``split`` over its sources, verified; returns ``(samples, issues)``."""
    issues = ScanIssues()
    samples: list[tuple[str, list[int]]] = []
    for source in data.sources[split]:
        samples += source_samples(source, data.heads, issues)
    if verify:
        good = []
        for path, targets in samples:
            reason = verify_image(path)
            if reason:
                issues.add(path, reason)
            else:
                good.append((path, targets))
        samples = good
    issues.log(prefix)
    return samples, issues


# ---------------------------------------------------------------------------------------------- augmentation
def random_resized_crop(img: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``, resized to ``size`` x ``size``."""
    height, width = img.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return cv2.resize(img[y:y + h, x:x + w], (size, size), interpolation=cv2.INTER_LINEAR)
    return center_crop(img, size)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Central square (side = shorter image side) resized to ``size`` (v7.0's classification eval transform)."""
    height, width = img.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(img[top:top + side, left:left + side], (size, size), interpolation=interp)


class ClassifyAugment:
    """Training augmentation: random resized crop, flips, HSV, optional RandAugment (torchvision)."""

    def __init__(self, imgsz: int, hyp: dict[str, Any]):
        self.imgsz = imgsz
        self.scale = (float(hyp.get("crop_scale_min", 0.08)), 1.0)
        self.fliplr, self.flipud = float(hyp.get("fliplr", 0.5)), float(hyp.get("flipud", 0.0))
        self.hsv = (float(hyp.get("hsv_h", 0.015)), float(hyp.get("hsv_s", 0.7)), float(hyp.get("hsv_v", 0.4)))
        self.randaugment = _make_randaugment(hyp.get("randaugment", False))

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        img = random_resized_crop(img, self.imgsz, self.scale, rng)
        if rng.random() < self.fliplr:
            img = img[:, ::-1]
        if rng.random() < self.flipud:
            img = img[::-1]
        img = np.ascontiguousarray(img)
        augment_hsv(img, *self.hsv, rng=rng)
        tensor = to_chw_tensor(img)
        return self.randaugment(tensor) if self.randaugment is not None else tensor


def _make_randaugment(setting: Any):
    """``randaugment: true`` -> torchvision defaults (2 ops, magnitude 9); an int sets the magnitude."""
    if not setting:
        return None
    from torchvision.transforms import RandAugment

    magnitude = 9 if setting is True else int(setting)
    return RandAugment(num_ops=2, magnitude=magnitude)


def to_chw_tensor(img_bgr: np.ndarray) -> torch.Tensor:
    """BGR HWC uint8 -> RGB CHW uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img_bgr[..., ::-1].transpose(2, 0, 1)))


def read_image(path: str) -> np.ndarray:
    """BGR uint8, 3 channels (grey images are expanded); raises with the path when OpenCV cannot decode it."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path}")
    return img


# ---------------------------------------------------------------------------------------------- dataset
class ClassificationDataset(Dataset):
    """``(uint8 RGB CHW image, int64 targets (n_heads,), path)`` per sample; -1 targets mean 'no label'."""

    def __init__(self, samples: list[tuple[str, list[int]]], imgsz: int, augment: bool = False,
                 hyp: dict[str, Any] | None = None, cache: str | None = None, seed: int = 0):
        if not samples:
            raise MissingFileError("no usable images for this split (see the skipped-file warnings above)")
        self.paths = [p for p, _ in samples]
        self.targets = torch.tensor([t for _, t in samples], dtype=torch.long)
        self.imgsz = imgsz
        self.augment = ClassifyAugment(imgsz, hyp or {}) if augment else None
        self.rng = np.random.default_rng(seed)
        self.cache = [read_image(p) for p in self.paths] if cache in {"ram", True} else None

    def __len__(self) -> int:
        return len(self.paths)

    def reseed(self, seed: int) -> None:
        """Called per worker (and per epoch) so augmentations differ between workers yet repeat per seed."""
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        img = self.cache[index] if self.cache is not None else read_image(self.paths[index])
        image = self.augment(img, self.rng) if self.augment is not None else self.eval_transform(img)
        return image, self.targets[index], self.paths[index]

    def eval_transform(self, img: np.ndarray) -> torch.Tensor:
        return to_chw_tensor(center_crop(img, self.imgsz))

    def label_counts(self, n_classes: Sequence[int]) -> list[np.ndarray]:
        """Per head, how many images carry each class (missing labels excluded)."""
        counts = []
        for k, nc in enumerate(n_classes):
            column = self.targets[:, k]
            counts.append(np.bincount(column[column >= 0].numpy(), minlength=nc))
        return counts


class _EpochSeeded(torch.utils.data.RandomSampler):
    """A random sampler that also reseeds the dataset's generator from the loader's generator each epoch.

    Without workers the dataset's augmentation stream would otherwise continue across epochs and depend on
    how many epochs ran before, which breaks exact resume.
    """

    def __init__(self, dataset: ClassificationDataset, generator: torch.Generator):
        super().__init__(dataset, generator=generator)
        self.dataset = dataset

    def __iter__(self):
        self.dataset.reseed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        yield from super().__iter__()


def create_classify_loader(samples: list[tuple[str, list[int]]], imgsz: int, batch_size: int,
                           augment: bool = False, hyp: dict[str, Any] | None = None, workers: int = 2,
                           shuffle: bool = False, seed: int = 0, cache: str | None = None,
                           ) -> tuple[DataLoader, ClassificationDataset]:
    """DataLoader over ``samples`` (see :func:`split_samples`); batches are ``(uint8 images, targets, paths)``."""
    dataset = ClassificationDataset(samples, imgsz, augment, hyp, cache, seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = _EpochSeeded(dataset, generator) if shuffle else None
    n_workers = min(workers, batch_size, len(dataset))
    # training drops a last partial batch: a batch of one breaks BatchNorm on 1x1 head features
    drop_last = shuffle and len(dataset) > batch_size
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), sampler=sampler,
                        num_workers=n_workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                        worker_init_fn=init_worker if n_workers else None, generator=generator)
    return loader, dataset


def create_split_loader(data: ClassifyData | str | Path, split: str, imgsz: int, batch_size: int = 32,
                        workers: int = 0, augment: bool = False, hyp: dict[str, Any] | None = None,
                        seed: int = 0, cache: str | None = None,
                        shuffle: bool | None = None) -> tuple[DataLoader, ClassificationDataset]:
    """Loader of one split of a data YAML (what val.py needs: ``validate_classifier(model, loader, heads)``).

    Shuffled (seeded) when augmenting unless ``shuffle`` says otherwise."""
    data = data if isinstance(data, ClassifyData) else load_classify_data(data)
    if not data.sources.get(split):
        raise DataConfigError(f"{data.yaml_file}: no '{split}' images (heads: {data.head_names})")
    samples, _ = split_samples(data, split, prefix=f"{split}: ")
    shuffle = augment if shuffle is None else shuffle
    return create_classify_loader(samples, imgsz, batch_size, augment, hyp, workers, shuffle=shuffle, seed=seed,
                                  cache=cache)

