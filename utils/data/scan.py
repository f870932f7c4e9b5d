"""Image/label discovery and verification, cached once per data set.

The scan never raises on bad data: unreadable images are skipped, bad label rows are dropped, and every
problem is reported *by file* (logged through ``logging`` and returned in a :class:`ScanReport` that tests and
tools can inspect). The result is cached in ``<labels dir>.cache`` (or a per-user cache folder when the data
folder is read-only) and reused while a hash of all image/label paths and file signatures (size, mtime, ctime,
inode) is unchanged. Nothing the user put in the data set is ever modified: a truncated JPEG is repaired into a
copy in the cache folder, and that copy is used instead.

Label rules (yolov5 v7.0 behaviour, made lenient per row instead of dropping the whole image):

* label files are UTF-8, a leading byte-order mark is ignored;
* a row is ``class cx cy w h`` with normalised coordinates; rows with another column count (e.g. polygon
  segments) are dropped as ``columns``;
* non-numeric / NaN / inf values -> ``non_numeric``; negative or fractional class ids -> ``class_id``;
  class ids ``>= nc`` -> ``class_ge_nc`` (only when ``nc`` is known);
* coordinates must lie in [0, 1]; values within ``COORD_TOLERANCE`` (1e-3, i.e. 0.64 px at 640) outside that
  range are float noise from converters and are clipped into [0, 1]; anything further out -> ``out_of_range``;
* width or height of 0 -> ``zero_size``;
* exact duplicate rows are dropped (``duplicate``) with ``np.unique`` like v7.0, which also sorts the rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.common.errors import MissingFileError
from utils.common.user_files import read_user_text

LOGGER = logging.getLogger(__name__)

IMG_FORMATS = ("bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp")
PIL_FORMATS = {"bmp", "jpeg", "png", "tiff", "webp", "mpo"}  # PIL's names for the formats above
COORD_TOLERANCE = 1e-3
MIN_IMAGE_SIDE = 10
CACHE_VERSION = 2  # 2: per-image grey flag
ROW_REASONS = ("columns", "non_numeric", "class_id", "class_ge_nc", "out_of_range", "zero_size", "duplicate")
MAX_LOGGED_ISSUES = 30


@dataclass
class FileIssue:
    """One problem found in one file; ``kind`` is a row reason from ROW_REASONS or an image problem."""

    file: str
    kind: str
    detail: str


@dataclass
class ScanReport:
    """Counts of what the scan found; ``issues`` names the file of every problem."""

    images: int = 0  # usable images (corrupt ones excluded)
    found: int = 0  # label files present
    missing: int = 0  # no label file -> background image
    empty: int = 0  # empty label file -> background image
    corrupt: int = 0  # images skipped
    repaired: int = 0  # truncated JPEGs decoded leniently; a copy in the cache folder is used
    instances: int = 0  # boxes kept
    rows_clipped: int = 0  # rows within COORD_TOLERANCE of [0, 1], clipped
    rows_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROW_REASONS, 0))
    issues: list[FileIssue] = field(default_factory=list)

    @property
    def backgrounds(self) -> int:
        return self.missing + self.empty

    def issues_for(self, file: str | Path) -> list[FileIssue]:
        """Issues whose file path ends with ``file`` (a name or a full path)."""
        name = str(file)
        return [issue for issue in self.issues if issue.file == name or issue.file.endswith(os.sep + name)]

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in self.rows_dropped.items() if v) or "none"
        return (f"{self.images} images, {self.found} label files found, {self.missing} missing, {self.empty} "
                f"empty, {self.corrupt} corrupt (skipped), {self.repaired} repaired, {self.instances} instances; "
                f"rows dropped: {dropped}; rows clipped: {self.rows_clipped}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScanReport:
        raw = json.loads(text)
        raw["issues"] = [FileIssue(**issue) for issue in raw["issues"]]
        return cls(**raw)


@dataclass
class ScanResult:
    """Usable images with their labels; ``shapes`` are (w, h) after EXIF orientation, like v7.0."""

    im_files: list[str]
    label_files: list[str]
    labels: list[np.ndarray]  # per image float32 (n, 5): class, cx, cy, w, h (normalised)
    shapes: np.ndarray  # (n, 2) int (w, h)
    report: ScanReport
    grey: np.ndarray  # (n,) bool: every pixel has B == G == R (see is_grey_image)
    cache_file: Path | None = None


# --------------------------------------------------------------------------- discovery
def list_image_files(sources: str | Path | list | tuple) -> list[str]:
    """Sorted image paths from folders (recursive), ``.txt`` image lists, or a list of those.

    Lines of a ``.txt`` list that are relative (``./images/x.jpg`` or ``images/x.jpg``) resolve against the list's
    own folder, which is the data-set root in every yolov5 layout.
    """
    files: list[str] = []
    for source in sources if isinstance(sources, list | tuple) else [sources]:
        path = Path(source).expanduser()
        if path.is_dir():
            files += [str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        elif path.is_file() and path.suffix.lower() == ".txt":
            files += _read_image_list(path)
        elif path.is_file():
            files.append(str(path))
        else:
            raise MissingFileError(f"{path} does not exist: give an image folder, a .txt list of images or a list")
    images = sorted(f for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS)
    if not images:
        raise MissingFileError(f"no images ({', '.join(IMG_FORMATS)}) found in {sources}")
    return images


def _read_image_list(list_file: Path) -> list[str]:
    parent = list_file.resolve().parent
    lines = [line.strip() for line in read_user_text(list_file, "image list").splitlines()]
    return [str(p if (p := Path(line)).is_absolute() else (parent / p).resolve()) for line in lines if line]


def img2label_paths(im_files: list[str]) -> list[str]:
    """``.../images/.../x.jpg`` -> ``.../labels/.../x.txt`` (the LAST ``/images/`` component is swapped)."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [labels.join(f.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt" for f in im_files]


# --------------------------------------------------------------------------- cache location
def is_writable_dir(path: str | Path) -> bool:
    """True if we may write there; a folder without any write bit counts as read-only even for root."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_dir() and os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def user_cache_root() -> Path:
    """Per-user cache folder for data caches of read-only data sets (XDG, else the temp folder)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "yolo-data"
    for candidate in (base, Path(tempfile.gettempdir()) / "yolo-data"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if is_writable_dir(candidate):
            return candidate
    raise OSError("no writable cache folder found (tried XDG_CACHE_HOME/~/.cache and the temp folder)")


def cache_location(folder: Path, suffix: str, cache_dir: str | Path | None = None) -> Path:
    """``<folder><suffix>`` beside the folder if writable, else a unique name in ``cache_dir``/the user cache."""
    folder = Path(folder)
    if cache_dir is None and is_writable_dir(folder.parent):
        return folder.with_suffix(suffix)
    root = Path(cache_dir) if cache_dir is not None else user_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tag = hashlib.md5(str(folder.resolve()).encode()).hexdigest()[:12]
    return root / f"{folder.name}-{tag}{suffix}"


def file_signature(path: str | Path) -> str:
    """What identifies one version of a file without reading it: size, mtime, ctime and inode.

    mtime alone is not enough: ``cp -p``, ``rsync -t`` or ``touch -r`` give another file (or an edited one) the
    old mtime, and a label edit often keeps the size. The ctime cannot be set by the user and changes with
    every write, and a replaced file has a new inode, so two different files never share a signature.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def files_hash(paths: list[str]) -> str:
    """md5 of paths + file signatures: changes whenever a file is added, removed, replaced or edited."""
    digest = hashlib.md5()
    for path in paths:
        digest.update(f"{path}\0{file_signature(path)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- image verification
def exif_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) as the image will be displayed: EXIF orientations 5-8 rotate by 90 degrees and swap w/h."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # malformed EXIF must not make a readable image unusable
        orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


@dataclass
class ImageCheck:
    ok: bool
    shape: tuple[int, int] = (0, 0)
    issue: FileIssue | None = None
    path: str = ""  # where the usable image is (a repaired copy may live elsewhere)
    grey: bool = False


def verify_image(im_file: str, repair_dir: Path) -> ImageCheck:
    """Open and verify one image; a JPEG missing its end marker is decoded leniently and re-saved.

    The repaired copy is written to ``repair_dir`` (a cache folder) and used in place of the original, which is
    never touched: v7.0 re-saved the user's file in place, silently changing the data set.
    """
    try:
        with Image.open(im_file) as img:
            img.verify()  # must come first (PNG); the file is opened again for size and EXIF
        with Image.open(im_file) as img:
            shape = exif_size(img)
            fmt = (img.format or "").lower()
    except UnidentifiedImageError:
        return ImageCheck(False, issue=FileIssue(im_file, "corrupt_image", "not an image (cannot identify format)"))
    except Exception as e:
        return ImageCheck(False, issue=FileIssue(im_file, "corrupt_image", f"unreadable: {e}"))
    if fmt not in PIL_FORMATS:
        return ImageCheck(False, issue=FileIssue(im_file, "corrupt_image", f"unsupported image format {fmt!r}"))
    if min(shape) < MIN_IMAGE_SIDE:
        return ImageCheck(False, issue=FileIssue(im_file, "corrupt_image", f"image size {shape} < 10 pixels"))
    if fmt in ("jpeg", "mpo") and not _has_jpeg_end_marker(im_file):
        check = _repair_jpeg(im_file, shape, repair_dir)
    else:
        check = ImageCheck(True, shape, path=im_file)
    check.grey = check.ok and is_grey_image(check.path)
    return check


def is_grey_image(im_file: str) -> bool:
    """True when the decoded BGR image has B == G == R at every pixel (many inspection data sets are).

    Such images are then decoded with ``IMREAD_GRAYSCALE`` (bit-identical to any one channel of the colour
    decode, and ~25% faster) and augmented in one channel: the warp does a third of the work and the HSV
    augmentation reduces exactly to one lookup table, because grey pixels have hue 0 and saturation 0. A 1/8-size
    decode (DCT scaling, cheap) rejects most colour images before the full decode that proves greyness.
    """
    for flag in (cv2.IMREAD_REDUCED_COLOR_8, cv2.IMREAD_COLOR):
        img = cv2.imread(im_file, flag)
        if img is None or img.ndim != 3 or not _channels_equal(img):
            return False
    return True


def _channels_equal(img: np.ndarray) -> bool:
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def _has_jpeg_end_marker(im_file: str) -> bool:
    with open(im_file, "rb") as f:
        f.seek(-2, 2)
        return f.read() == b"\xff\xd9"


def _repair_jpeg(im_file: str, shape: tuple[int, int], repair_dir: Path) -> ImageCheck:
    """Decode what is there (libjpeg fills the missing part grey) and re-save it through PIL at quality 100."""
    raw = np.fromfile(im_file, dtype=np.uint8)
    decoded = cv2.imdecode(raw, cv2.IMREAD_COLOR)  # applies EXIF orientation, so the saved copy is upright
    if decoded is None:  # cut inside the scan data: close the stream so libjpeg keeps what it decoded
        decoded = cv2.imdecode(np.concatenate((raw, np.frombuffer(b"\xff\xd9", np.uint8))), cv2.IMREAD_COLOR)
    if decoded is None:
        return ImageCheck(False, issue=FileIssue(im_file, "corrupt_image", "truncated JPEG, not decodable"))
    key = hashlib.md5(f"{im_file}\0{file_signature(im_file)}".encode()).hexdigest()[:12]  # one per file version
    target = repair_dir / key / Path(im_file).name  # same name: outputs named after the image keep their names
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(decoded[..., ::-1]).save(buffer, "JPEG", subsampling=0, quality=100)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # concurrent scans never see half a file
    partial.write_bytes(buffer.getvalue())
    os.replace(partial, target)
    w, h = decoded.shape[1], decoded.shape[0]
    issue = FileIssue(im_file, "repaired_image", f"truncated JPEG (no end marker) repaired; the original is left "
                                                 f"as it is, the repaired copy {target} is used")
    return ImageCheck(True, (w, h) if (w, h) else shape, issue, str(target))


# --------------------------------------------------------------------------- label parsing
@dataclass
class LabelCheck:
    labels: np.ndarray
    status: str  # 'found' | 'missing' | 'empty'
    dropped: Counter = field(default_factory=Counter)
    clipped: int = 0
    issues: list[FileIssue] = field(default_factory=list)


def read_label_file(lb_file: str) -> LabelCheck:
    """Parse and validate one YOLO label file row by row (see module docstring for the rules)."""
    empty = np.zeros((0, 5), dtype=np.float32)
    if not os.path.isfile(lb_file):
        return LabelCheck(empty, "missing")
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first class id
        text = Path(lb_file).read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        return LabelCheck(empty, "missing", issues=[FileIssue(lb_file, "unreadable_label", str(e))])
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows:
        return LabelCheck(empty, "empty")
    check = LabelCheck(empty, "found")
    five = [row for row in rows if len(row) == 5]
    _note(check, lb_file, "columns", len(rows) - len(five), "rows without exactly 5 columns (class cx cy w h)")
    values = _to_float(five)
    finite = np.isfinite(values).all(1)
    _note(check, lb_file, "non_numeric", int((~finite).sum()), "rows with non-numeric, NaN or inf values")
    values = values[finite]
    cls = values[:, 0]
    good_cls = (cls >= 0) & (cls == np.round(cls))
    _note(check, lb_file, "class_id", int((~good_cls).sum()), "rows with a negative or fractional class id")
    values = values[good_cls]
    coords = values[:, 1:]
    in_range = ((coords >= -COORD_TOLERANCE) & (coords <= 1 + COORD_TOLERANCE)).all(1)
    _note(check, lb_file, "out_of_range", int((~in_range).sum()),
          f"rows with coordinates outside [0, 1] (tolerance {COORD_TOLERANCE})")
    values = values[in_range]
    needs_clip = ((values[:, 1:] < 0) | (values[:, 1:] > 1)).any(1)
    check.clipped = int(needs_clip.sum())
    values[:, 1:] = values[:, 1:].clip(0, 1)
    sized = (values[:, 3] > 0) & (values[:, 4] > 0)
    _note(check, lb_file, "zero_size", int((~sized).sum()), "rows with zero width or height")
    values = values[sized]
    if len(values):
        _, first = np.unique(values, axis=0, return_index=True)
        if len(first) < len(values):
            _note(check, lb_file, "duplicate", len(values) - len(first), "duplicate rows")
            values = values[first]
    check.labels = values.astype(np.float32)
    return check


def _to_float(rows: list[list[str]]) -> np.ndarray:
    """Rows of 5 strings -> (n, 5) float32; a non-numeric row becomes NaN instead of failing the file."""
    if not rows:
        return np.zeros((0, 5), dtype=np.float32)
    try:
        return np.array(rows, dtype=np.float32)
    except ValueError:
        return np.array([_row_to_float(row) for row in rows], dtype=np.float32)


def _row_to_float(row: list[str]) -> list[float]:
    try:
        return [float(v) for v in row]
    except ValueError:
        return [float("nan")] * 5


def _note(check: LabelCheck, lb_file: str, reason: str, count: int, text: str) -> None:
    if count:
        check.dropped[reason] += count
        check.issues.append(FileIssue(lb_file, reason, f"{count} {text} dropped"))


# --------------------------------------------------------------------------- the scan
def scan_dataset(im_files: list[str], nc: int | None = None, cache_dir: str | Path | None = None,
                 prefix: str = "", use_cache: bool = True) -> ScanResult:
    """Verify every image and label once (cached); drop class ids ``>= nc`` when ``nc`` is given.

    The cache holds the nc-independent result, so the same cache serves any ``nc``/``single_cls`` setting.
    """
    label_files = img2label_paths(im_files)
    labels_dir = Path(label_files[0]).parent
    cache_file = cache_location(labels_dir, ".cache", cache_dir)
    digest = files_hash(im_files + label_files)
    result = _load_cache(cache_file, digest, im_files) if use_cache else None
    if result is None:
        result = _scan_files(im_files, label_files, _repair_dir(cache_dir))
        if use_cache:
            _save_cache(cache_file, digest, result)
    else:
        LOGGER.info("%sscan cache %s reused", prefix, cache_file)
    result.cache_file = cache_file if use_cache else None
    if nc is not None:
        _drop_classes_beyond(result, nc)
    _log_report(result.report, prefix)
    return result


def _repair_dir(cache_dir: str | Path | None) -> Path:
    """Where repaired copies of damaged images go: never the data set, always a cache folder."""
    return (Path(cache_dir) if cache_dir is not None else user_cache_root()) / "repaired"


def _scan_files(im_files: list[str], label_files: list[str], repair_dir: Path) -> ScanResult:
    report = ScanReport()
    kept_images, kept_labels, kept_label_files, shapes, grey = [], [], [], [], []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        image_checks = list(pool.map(lambda f: verify_image(f, repair_dir), im_files))
        label_checks = list(pool.map(read_label_file, label_files))
    for lb_file, image, label in zip(label_files, image_checks, label_checks):
        if image.issue is not None:
            report.issues.append(image.issue)
        if not image.ok:
            report.corrupt += 1
            continue
        report.repaired += image.issue is not None
        setattr(report, label.status, getattr(report, label.status) + 1)
        for reason, count in label.dropped.items():
            report.rows_dropped[reason] += count
        report.rows_clipped += label.clipped
        report.issues += label.issues
        kept_images.append(image.path)
        kept_label_files.append(lb_file)
        kept_labels.append(label.labels)
        shapes.append(image.shape)
        grey.append(image.grey)
    report.images = len(kept_images)
    report.instances = int(sum(len(lb) for lb in kept_labels))
    shape_array = np.array(shapes, dtype=np.int64).reshape(-1, 2)
    return ScanResult(kept_images, kept_label_files, kept_labels, shape_array, report, np.array(grey, dtype=bool))


def _drop_classes_beyond(result: ScanResult, nc: int) -> None:
    for i, labels in enumerate(result.labels):
        bad = labels[:, 0] >= nc
        if bad.any():
            result.labels[i] = labels[~bad]
            result.report.rows_dropped["class_ge_nc"] += int(bad.sum())
            result.report.instances -= int(bad.sum())
            result.report.issues.append(FileIssue(result.label_files[i], "class_ge_nc",
                                                  f"{int(bad.sum())} rows with class id >= nc ({nc}) dropped"))


def _log_report(report: ScanReport, prefix: str) -> None:
    for issue in report.issues[:MAX_LOGGED_ISSUES]:
        LOGGER.warning("%s%s: %s", prefix, issue.file, issue.detail)
    if len(report.issues) > MAX_LOGGED_ISSUES:
        LOGGER.warning("%s... and %d more issues (see the scan report)", prefix,
                       len(report.issues) - MAX_LOGGED_ISSUES)
    LOGGER.info("%s%s", prefix, report.summary())


# --------------------------------------------------------------------------- cache file (npz, no pickle)
def _save_cache(cache_file: Path, digest: str, result: ScanResult) -> None:
    """Atomic write (temp file + rename) so concurrent runs never read half a cache."""
    counts = np.array([len(lb) for lb in result.labels], dtype=np.int64)
    labels = np.concatenate(result.labels, 0) if result.labels else np.zeros((0, 5), np.float32)
    payload = {"version": np.array(CACHE_VERSION), "hash": np.array(digest),
               "im_files": np.array(result.im_files, dtype=str), "label_files": np.array(result.label_files, dtype=str),
               "shapes": result.shapes, "grey": result.grey, "counts": counts, "labels": labels.astype(np.float32),
               "report": np.array(result.report.to_json())}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, **payload)
        os.replace(f.name, cache_file)
    except OSError as e:
        LOGGER.warning("scan cache not saved to %s: %s", cache_file, e)


def _load_cache(cache_file: Path, digest: str, originals: list[str]) -> ScanResult | None:
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["hash"]) != digest:
                return None
            kept = [str(f) for f in z["im_files"]]
            if not all(os.path.isfile(f) for f in set(kept) - set(originals)):
                return None  # a repaired copy in the cache folder was deleted since
            counts = z["counts"]
            labels = np.split(z["labels"], np.cumsum(counts)[:-1]) if len(counts) else []
            return ScanResult(kept, [str(f) for f in z["label_files"]],
                              [lb.copy() for lb in labels], z["shapes"].astype(np.int64),
                              ScanReport.from_json(str(z["report"])), z["grey"].astype(bool))
    except (OSError, KeyError, ValueError, EOFError):
        return None
