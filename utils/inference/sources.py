"""Inference sources: an image, a folder, a glob, a video file, or a .txt list of any of these."""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.common.errors import FlagError, MissingFileError
from utils.common.user_files import read_user_text

LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpeg", ".mpg", ".webm"}


@dataclass
class Frame:
    """One decoded BGR image and where it came from (``frame`` is the index within a video, else 0)."""

    path: Path
    image: np.ndarray
    frame: int = 0
    is_video: bool = False
    fps: float = 0.0


def expand_source(source: str | Path) -> list[Path]:
    """Files named by ``source``, sorted; a clear error when nothing matches."""
    text = str(source)
    path = Path(text)
    if path.suffix == ".txt" and path.is_file():
        return _expand_list(path)
    if any(ch in text for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    elif path.is_file():
        files = [path]
    elif text.startswith(("http://", "https://")):
        raise FlagError(f"--source {source}: URLs are not downloaded (no network at run time); save the image or "
                         "video on a connected machine and pass its path")
    elif text.isdigit() or "://" in text:
        raise FlagError(f"--source {source}: webcams and streams are not supported; give an image, a folder, "
                         "a glob, a video file or a .txt list of files")
    else:
        raise MissingFileError(f"--source {source}: no such file, folder or glob")
    files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
    if not files:
        raise MissingFileError(f"--source {source}: no images or videos found "
                                f"(images: {sorted(IMAGE_SUFFIXES)}, videos: {sorted(VIDEO_SUFFIXES)})")
    return files


def _expand_list(list_file: Path) -> list[Path]:
    """Files named by each line of a .txt list; a relative line is looked up beside the list, then in the
    working directory (where v7.0 looks), and a line that names nothing is reported with its number."""
    files = []
    for number, line in enumerate(read_user_text(list_file, "--source list").splitlines(), 1):
        entry = line.strip()
        if not entry:
            continue
        beside_list = list_file.parent / entry  # an absolute entry stays itself
        candidate = Path(entry).absolute() if not beside_list.exists() and Path(entry).exists() else beside_list
        try:
            files.extend(expand_source(candidate))
        except FileNotFoundError as error:
            raise MissingFileError(f"{list_file}:{number}: {error}") from None
    return files


def iterate_frames(files: list[Path], vid_stride: int = 1) -> Iterator[Frame]:
    """Decode images and video frames one at a time; unreadable files are reported and skipped.

    ``vid_stride`` keeps every n-th frame of a video (v7.0's ``--vid-stride``); the skipped ones are only grabbed,
    not decoded, and the kept frames keep their index in the video.
    """
    if vid_stride < 1:
        raise FlagError(f"--vid-stride must be at least 1, got {vid_stride}")
    for path in files:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            yield from _video_frames(path, vid_stride)
            continue
        image = cv2.imread(str(path))
        if image is None:
            LOGGER.warning("skipping %s: not a readable image", path)
            continue
        yield Frame(path, image)


def _video_frames(path: Path, stride: int) -> Iterator[Frame]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        LOGGER.warning("skipping %s: cannot open video", path)
        return
    fps = (capture.get(cv2.CAP_PROP_FPS) or 25.0) / stride  # the annotated video lasts as long as the source
    index = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            yield Frame(path, image, index, True, fps)
            index += stride
            if not all(capture.grab() for _ in range(stride - 1)):
                break
    finally:
        capture.release()
