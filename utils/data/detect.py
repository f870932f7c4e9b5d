"""YOLO detection data set and loader with yolov5 v7.0 sample semantics.

``DetectionDataset[i]`` returns ``(img, labels_out, path, shapes)`` like v7.0: ``img`` uint8 CxHxW RGB tensor,
``labels_out`` (n, 6) = (batch slot, class, cx, cy, w, h) normalised to ``img``, and ``shapes`` None for mosaics
else ``((h0, w0), ((h / h0, w / w0), (padw, padh)))`` for mapping predictions back to the original image.
Validation reproduces v7.0 exactly (same sort, rectangular batch shapes, resize and letterbox arithmetic).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from utils.common.boxes import xywhn2xyxy, xyxy2xywhn
from utils.common.errors import FlagError, MissingFileError, UserError
from utils.data.augment import (
    HYP_KEYS,
    augment_hsv,
    flip_lr,
    flip_ud,
    letterbox,
    mixup,
    mosaic4,
    random_perspective,
)
from utils.data.scan import (
    ScanReport,
    cache_location,
    file_signature,
    is_writable_dir,
    list_image_files,
    scan_dataset,
)
from utils.data.workers import init_worker
from utils.train.config import load_hyp

LOGGER = logging.getLogger(__name__)

CACHE_MODES = (None, "ram", "ram-jpeg", "disk")
NPY_KEY_LENGTH = 10
_NPY_PATTERN = re.compile(rf"(?P<image>.+)\.[0-9a-f]{{{NPY_KEY_LENGTH}}}\.npy")
JPEG_CACHE_QUALITY = 95
MEMORY_SAFETY_MARGIN = 0.1  # refuse a cache that would leave less than 10% headroom of the available memory
SIZE_SAMPLE = 16  # images decoded to estimate a cache's size
DEFAULT_HYP = Path(__file__).resolve().parents[2] / "data" / "hyps" / "hyp.scratch-low.yaml"


class CacheSizeError(UserError, RuntimeError):
    """Raised before filling an image cache that would not fit in memory (or on disk)."""


def resize_long_side(img: np.ndarray, img_size: int, augment: bool) -> np.ndarray:
    """Long side -> img_size (ceil, as v7.0); INTER_AREA only for clean downscaling (val), else INTER_LINEAR."""
    h0, w0 = img.shape[:2]
    r = img_size / max(h0, w0)
    if r == 1:
        return img
    interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
    return cv2.resize(img, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)


def bgr_hwc_to_rgb_chw(img: np.ndarray) -> np.ndarray:
    """HWC BGR -> contiguous CHW RGB; a 2-D grey image is written into all three channels."""
    if img.ndim == 2:
        out = np.empty((3, *img.shape), dtype=img.dtype)
        out[:] = img
        return out
    return np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])


def read_image(path: str, grey: bool) -> np.ndarray:
    """BGR (h, w, 3), or (h, w) for an image the scan found grey (same pixels as any channel of the BGR read)."""
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"image not readable: {path}")
    return img


def rect_batch_shapes(shapes_wh: np.ndarray, batch_size: int, img_size: int, stride: int, pad: float,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """v7.0 rectangular batches: (order, batch index per sorted image, (nb, 2) batch shapes as (h, w)).

    Images are sorted by h/w so each batch holds similar shapes; a batch of wide images (all h/w < 1) gets
    h = max(h/w) * img_size, a batch of tall ones w = img_size / min(h/w), mixed batches stay square; each side is
    ceil(side / stride + pad) * stride.
    """
    n = len(shapes_wh)
    batch_index = np.floor(np.arange(n) / batch_size).astype(int)
    nb = batch_index[-1] + 1
    aspect = shapes_wh[:, 1] / shapes_wh[:, 0]
    order = aspect.argsort()
    aspect = aspect[order]
    ratios = [[1, 1]] * nb
    for i in range(nb):
        in_batch = aspect[batch_index == i]
        lo, hi = in_batch.min(), in_batch.max()
        if hi < 1:
            ratios[i] = [hi, 1]
        elif lo > 1:
            ratios[i] = [1, 1 / lo]
    batch_shapes = np.ceil(np.array(ratios) * img_size / stride + pad).astype(int) * stride
    return order, batch_index, batch_shapes


def class_balanced_image_weights(labels: list[np.ndarray], nc: int,
                                 class_weights: np.ndarray | None = None) -> np.ndarray:
    """Per-image sampling weight = sum of its boxes' class weights (default: inverse class frequency)."""
    counts = np.stack([np.bincount(lb[:, 0].astype(int).clip(0, nc - 1), minlength=nc)[:nc] for lb in labels])
    if class_weights is None:
        totals = counts.sum(0).astype(np.float64)
        totals[totals == 0] = 1
        class_weights = 1 / totals
        class_weights /= class_weights.sum()
    weights = (counts * np.asarray(class_weights).reshape(1, nc)).sum(1)
    weights[weights == 0] = weights[weights > 0].min() if (weights > 0).any() else 1  # backgrounds stay drawable
    return weights / weights.sum()


def labels_folders(label_files: list[str], shown: int = 3) -> str:
    """The folders the label files were looked for in, for messages (the first ``shown``, then a count)."""
    folders = list(dict.fromkeys(str(Path(f).parent) for f in label_files))
    more = f" and {len(folders) - shown} more folders" if len(folders) > shown else ""
    return ", ".join(folders[:shown]) + more


def check_some_labels(label_files: list[str], report: ScanReport, prefix: str, required: bool) -> None:
    """A split without a single box: an error where labels are required (training), else one warning line.

    YOLOv5 v7.0 stops training with "No labels found" only when no label file has a row; a set whose every row
    was dropped (wrong ``nc``, pixel coordinates, polygons) would train on backgrounds alone, so it stops too.
    The message names the folder the labels were looked for in: a wrong folder is the usual cause.
    """
    where, (what, advice) = labels_folders(label_files), _why_no_labels(report)
    if required:
        raise MissingFileError(f"{prefix}no labels in {where} for the {report.images} images, nothing to train "
                               f"on: {what}: {advice}")
    LOGGER.warning("%sWARNING no labels in %s for the %d images (%s): they count as images without objects, so "
                   "P, R and mAP are 0", prefix, where, report.images, what)


def _why_no_labels(report: ScanReport) -> tuple[str, str]:
    """(what the scan saw, what to do): rows that were all dropped, empty files only, or no label file at all."""
    if report.found:
        dropped = ", ".join(f"{k} {v}" for k, v in report.rows_dropped.items() if v)
        return (f"every row of its {report.found} label files was dropped ({dropped}; the scan's warnings name "
                "the files)", "fix the rows (class cx cy w h, normalised to [0, 1]) or the data YAML's nc")
    if report.empty:
        none = f" and {report.missing} images have none" if report.missing else ""
        return f"its {report.empty} label files are empty{none}", "add a row class cx cy w h per object"
    return ("no label file found", "each image's labels are the .txt file of the same name in the folder given by "
            "swapping the last /images/ of its path for /labels/")


class DetectionDataset(Dataset):
    """Images + YOLO labels, with optional mosaic/affine/HSV/flip augmentation and image caches."""

    def __init__(self, path: str | Path | list, img_size: int = 640, batch_size: int = 16, augment: bool = False,
                 hyp: dict | None = None, rect: bool = False, image_weights: bool = False, cache: str | None = None,
                 single_cls: bool = False, stride: int = 32, pad: float = 0.0, prefix: str = "", seed: int = 0,
                 nc: int | None = None, cache_dir: str | Path | None = None, require_labels: bool = False):
        if cache not in CACHE_MODES:
            raise FlagError(f"--cache {cache}: choose one of ram, ram-jpeg, disk")
        self.img_size, self.augment, self.rect, self.stride = img_size, augment, rect, stride
        self.hyp = self._complete_hyp(hyp) if augment else (hyp or {})
        self.image_weights = image_weights
        self.mosaic = augment and not rect  # rectangular training keeps whole images
        self.mosaic_border = (-img_size // 2, -img_size // 2)
        self.prefix, self.cache_dir = prefix, cache_dir
        self.rng = np.random.default_rng(seed)
        # False: v7.0's operations (colour decode of grey images, 2s canvas + warp for mosaics, numpy flips), for
        # benchmarks and tests; True: grey images in one channel and mosaics warped straight from the tiles
        # (augment.warp_tiles). Same labels and, to within one grey level away from tile seams, same pixels.
        self.fast_ops = True
        scan = scan_dataset(list_image_files(path), nc=nc, cache_dir=cache_dir, prefix=prefix)
        if not scan.im_files:
            raise MissingFileError(f"{prefix}no usable images in {path}: {scan.report.summary()}")
        if not scan.report.instances:
            check_some_labels(scan.label_files, scan.report, prefix, require_labels)
        self.report: ScanReport = scan.report
        self.im_files, self.label_files = scan.im_files, scan.label_files
        self.labels, self.shapes = scan.labels, scan.shapes
        self.grey = scan.grey
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.im_files)
        self.batch = np.floor(np.arange(self.n) / batch_size).astype(int)
        self.batch_shapes = None
        if rect:
            self._sort_for_rect(batch_size, pad)
        self.indices = np.arange(self.n)
        if image_weights:
            self.set_image_weights()
        self.cache = cache
        self._ram: list[Any] = [None] * self.n
        self._npy_files: list[Path] = []
        if cache:
            self._fill_cache(cache)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _complete_hyp(hyp: dict | None) -> dict:
        """Augmentation keys missing from ``hyp`` come from hyp.scratch-low.yaml (logged, never silent)."""
        defaults = load_hyp(DEFAULT_HYP)
        hyp = dict(hyp or {})
        missing = [k for k in HYP_KEYS if k not in hyp]
        if missing:
            LOGGER.info("augmentation hyp keys %s not given; using hyp.scratch-low values", missing)
        return {**{k: defaults[k] for k in missing}, **hyp}

    def _sort_for_rect(self, batch_size: int, pad: float) -> None:
        order, self.batch, self.batch_shapes = rect_batch_shapes(self.shapes, batch_size, self.img_size,
                                                                 self.stride, pad)
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes = self.shapes[order]
        self.grey = self.grey[order]

    def set_image_weights(self, class_weights: np.ndarray | None = None) -> None:
        """Resample ``self.indices`` (n draws with replacement) so rare classes are seen more often.

        Call once per epoch with new class weights to follow v7.0's ``--image-weights``; takes effect for the
        next epoch's workers (the loader is not persistent when image weights are on).
        """
        if class_weights is not None:
            nc = len(class_weights)
        else:
            nc = int(max((lb[:, 0].max() for lb in self.labels if len(lb)), default=0)) + 1
        weights = class_balanced_image_weights(self.labels, nc, class_weights)
        self.indices = self.rng.choice(self.n, size=self.n, p=weights)

    def reseed(self, seed: int) -> None:
        """New augmentation stream; called in each worker with torch's per-worker seed."""
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ image loading and caches
    def _one_channel(self, i: int) -> bool:
        """Decode image i as 2-D grey (scan found B == G == R) unless v7.0's operations were asked for."""
        return self.fast_ops and bool(self.grey[i])

    def _read_original(self, i: int) -> np.ndarray:
        if self.cache == "disk":
            return self._read_npy(i)
        return read_image(self.im_files[i], self._one_channel(i))

    def _read_npy(self, i: int) -> np.ndarray:
        npy = self._npy_files[i]
        try:
            return np.load(npy, allow_pickle=False)
        except (OSError, ValueError):  # missing/partial .npy: rebuild it
            return self._write_npy(i)

    def _write_npy(self, i: int) -> np.ndarray:
        img = read_image(self.im_files[i], self._one_channel(i))
        tmp = self._npy_files[i].with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img)
        os.replace(tmp, self._npy_files[i])
        return img

    def _decode_resized(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        img = self._read_original(i)
        return resize_long_side(img, self.img_size, self.augment), img.shape[:2]

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(BGR image with long side img_size, (h0, w0) original, (h, w) resized); RAM caches hit first."""
        cached = self._ram[i]
        if cached is None:
            img, hw0 = self._decode_resized(i)
            return img, hw0, img.shape[:2]
        if self.cache == "ram-jpeg":
            buffer, hw0, is_file = cached
            img = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE if self._one_channel(i) else cv2.IMREAD_COLOR)
            if is_file:
                img = resize_long_side(img, self.img_size, self.augment)
            return img, hw0, img.shape[:2]
        return cached[0], cached[1], cached[0].shape[:2]

    def _cache_entry(self, i: int) -> tuple[Any, tuple[int, int]] | None:
        if self.cache == "disk":
            if not self._npy_files[i].exists():  # the name holds the image's signature: existing means current
                self._write_npy(i)
            return None
        if self.cache == "ram-jpeg":
            return self._jpeg_entry(i)
        return self._decode_resized(i)

    def _jpeg_entry(self, i: int) -> tuple[np.ndarray, tuple[int, int], bool]:
        """(compressed bytes, (h0, w0), bytes are the file's own) for the ram-jpeg cache.

        A JPEG that the resize would not shrink is kept as its file's bytes: smaller than a re-encoding at
        the (larger) training size, exact, and cheaper to decode (then resized per access, like uncached
        loading). Anything else is resized once and re-encoded at JPEG_CACHE_QUALITY.
        """
        w0, h0 = (int(v) for v in self.shapes[i])  # the scan's size, EXIF orientation applied like the decoder
        if max(h0, w0) <= self.img_size and self.im_files[i].lower().endswith((".jpg", ".jpeg")):
            return np.fromfile(self.im_files[i], dtype=np.uint8), (h0, w0), True
        resized, hw0 = self._decode_resized(i)
        return cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, JPEG_CACHE_QUALITY])[1], hw0, False

    def _fill_cache(self, mode: str) -> None:
        if mode == "disk":
            self._npy_files = [self._npy_path(f) for f in self.im_files]
            remove_outdated_npy(self.im_files, self._npy_files)
        need = self.estimate_cache_bytes(mode)
        self._check_room(mode, need)
        LOGGER.info("%scaching %d images (%s, about %.2f GB)", self.prefix, self.n, mode, need / 1e9)
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            entries = list(pool.map(self._cache_entry, range(self.n)))
        if mode != "disk":
            self._ram = entries

    def _npy_path(self, im_file: str) -> Path:
        """``x.jpg.<signature>.npy`` beside the image (v7.0 writes ``x.npy`` there), or in a cache folder when
        the image folder is read-only.

        The whole file name and the image's signature (size, mtime, ctime, inode) are part of the name, so
        ``x.jpg`` and ``x.png``, or an image and the file that later replaced it, never share a cache entry.
        """
        path = Path(im_file)
        name = npy_name(path.name, file_signature(im_file))
        if self.cache_dir is None and is_writable_dir(path.parent):
            return path.with_name(name)
        folder = cache_location(path.parent, "-npy", self.cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def estimate_cache_bytes(self, mode: str) -> int:
        """Bytes a cache mode will take, extrapolated from up to SIZE_SAMPLE evenly spread images."""
        sample = np.unique(np.linspace(0, self.n - 1, min(SIZE_SAMPLE, self.n)).round().astype(int))
        sizes = []
        for i in sample:
            if mode == "ram-jpeg":
                sizes.append(len(self._jpeg_entry(i)[0]))
                continue
            original = read_image(self.im_files[i], self._one_channel(i))
            sizes.append(original.nbytes + 128 if mode == "disk" else
                         resize_long_side(original, self.img_size, self.augment).nbytes)
        return int(np.mean(sizes) * self.n)

    def _check_room(self, mode: str, need: int) -> None:
        if mode == "disk":
            free = shutil.disk_usage(self._npy_files[0].parent).free
            where = f"free disk space at {self._npy_files[0].parent}"
        else:
            free = psutil.virtual_memory().available
            where = "available RAM"
        if need * (1 + MEMORY_SAFETY_MARGIN) > free:
            raise CacheSizeError(
                f"{self.prefix}cache={mode!r} needs about {need / 1e9:.2f} GB (+{MEMORY_SAFETY_MARGIN:.0%} margin) "
                f"but only {free / 1e9:.2f} GB {where}; use cache='ram-jpeg' (about 1/6 of 'ram'), 'disk' or None")

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, Any]:
        index = int(self.indices[index])
        hyp = self.hyp
        if self.mosaic and self.rng.random() < hyp["mosaic"]:
            img, labels = self.load_mosaic(index)
            shapes = None
            if self.rng.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self.load_mosaic(int(self.rng.integers(0, self.n))), rng=self.rng)
        else:
            img, labels, shapes = self._load_letterboxed(index)
            if self.augment:
                img, labels = random_perspective(img, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                                 scale=hyp["scale"], shear=hyp["shear"],
                                                 perspective=hyp["perspective"], rng=self.rng)
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            img, labels = self._colour_and_flips(img, labels)
        labels_out = np.zeros((len(labels), 6), np.float32)  # column 0: image index, set by collate_fn
        labels_out[:, 1:] = labels
        return torch.from_numpy(bgr_hwc_to_rgb_chw(img)), torch.from_numpy(labels_out), self.im_files[index], shapes

    def _load_letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        labels = self.labels[index].copy()
        if labels.size:
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        return img, labels, ((h0, w0), ((h / h0, w / w0), pad))

    def _colour_and_flips(self, img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hyp = self.hyp
        augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"], rng=self.rng)
        if self.rng.random() < hyp["flipud"]:
            img, labels = flip_ud(img, labels, self.fast_ops)
        if self.rng.random() < hyp["fliplr"]:
            img, labels = flip_lr(img, labels, self.fast_ops)
        return img, labels

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This image + 3 random ones -> s x s mosaic with pixel-xyxy labels (see augment.mosaic4)."""
        others = self.rng.choice(self.indices, size=3)
        chosen = [int(i) for i in self.rng.permutation(np.concatenate(([index], others)))]
        images = [self.load_image(i)[0] for i in chosen]
        return mosaic4(images, [self.labels[i] for i in chosen], self.img_size, self.hyp, rng=self.rng,
                       direct=self.fast_ops)

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple]:
        """Stack images, write each label's image index into column 0, concatenate labels.

        Images are stacked with NumPy: torch.stack on uint8 goes through the intra-op thread pool, which on small
        VMs costs ~60x more than a single-threaded copy (127 ms vs 2 ms for 16x3x256x256 on 2 cores).
        """
        images, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        stacked = torch.from_numpy(np.stack([im.numpy() for im in images], 0))
        return stacked, torch.cat(labels, 0), paths, shapes


def npy_name(image_name: str, signature: str) -> str:
    """Disk-cache file name of one version of one image (see ``DetectionDataset._npy_path``)."""
    return f"{image_name}.{hashlib.md5(signature.encode()).hexdigest()[:NPY_KEY_LENGTH]}.npy"


def remove_outdated_npy(im_files: list[str], npy_files: list[Path]) -> int:
    """Delete disk-cache files of earlier versions of these images (the image changed since it was cached).

    Only names this cache writes (``<image name>.<key>.npy`` for an image of this data set) are considered;
    one listing per folder.
    """
    current = set(npy_files)
    wanted = {(npy.parent, Path(im).name) for im, npy in zip(im_files, npy_files)}
    removed = 0
    for folder in {npy.parent for npy in npy_files}:
        for entry in folder.iterdir():
            match = _NPY_PATTERN.fullmatch(entry.name)
            if match and (folder, match["image"]) in wanted and entry not in current:
                entry.unlink(missing_ok=True)
                removed += 1
    if removed:
        LOGGER.info("disk cache: %d .npy files of images that changed since they were cached removed", removed)
    return removed


def create_dataloader(path: str | Path | list, imgsz: int, batch_size: int, stride: int, hyp: dict | None = None,
                      augment: bool = False, cache: str | None = None, pad: float = 0.0, rect: bool = False,
                      workers: int = 0, shuffle: bool = False, seed: int = 0, single_cls: bool = False,
                      image_weights: bool = False, prefix: str = "", nc: int | None = None,
                      cache_dir: str | Path | None = None,
                      require_labels: bool = False) -> tuple[DataLoader, DetectionDataset]:
    """v7.0-compatible loader; val in v7.0 is ``rect=True, pad=0.5, augment=False, shuffle=False``.

    ``nc`` (optional) drops label rows with class ids >= nc at scan time; ``cache_dir`` redirects every cache
    file (scan cache, .npy images, repaired JPEGs) away from the data folder. ``require_labels`` (training) makes
    a split without a single box an error instead of a warning, raised before any image cache is filled.
    """
    if rect and shuffle:
        LOGGER.warning("%srect=True is incompatible with shuffle; shuffle disabled", prefix)
        shuffle = False
    dataset = DetectionDataset(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect,
                               image_weights=image_weights, cache=cache, single_cls=single_cls, stride=stride,
                               pad=pad, prefix=prefix, seed=seed, nc=nc, cache_dir=cache_dir,
                               require_labels=require_labels)
    batch_size = min(batch_size, len(dataset))
    num_workers = min(os.cpu_count() or 1, batch_size if batch_size > 1 else 0, workers)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), collate_fn=DetectionDataset.collate_fn,
                        worker_init_fn=init_worker, generator=generator,
                        persistent_workers=False)  # fresh workers each epoch, seeded from (seed, epoch): exact resume
    return loader, dataset
