"""Command-line flags checked against their domain before anything loads, and ``--imgsz`` rounded to the stride.

Every script calls its ``check_*`` function first, so ``--epochs 0``, ``--conf-thres 2`` or a weights file that
is not there end in one ``error: --flag ...`` line, before a model is built, a data set is scanned or a run
folder is made. :func:`check_img_size` is the one rule all four scripts apply to image sizes once the model's
stride is known (YOLOv5 v7.0's: round up to a multiple of the largest stride, and say so).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from utils.common.errors import FlagError, MissingFileError

if TYPE_CHECKING:
    pass

LOGGER = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------- domain checks
def at_least(flag: str, value: float | None, low: float, hint: str = "") -> None:
    """``value >= low`` (None = flag not given, accepted)."""
    if value is not None and not value >= low:
        raise FlagError(f"{flag} {value}: must be at least {low:g}{hint}")


def positive(flag: str, value: float | None, hint: str = "") -> None:
    """``value > 0`` (None = flag not given, accepted)."""
    if value is not None and not value > 0:
        raise FlagError(f"{flag} {value}: must be greater than 0{hint}")


def fraction(flag: str, value: float | None, include_one: bool = True) -> None:
    """``value`` in [0, 1] (or [0, 1) without ``include_one``)."""
    if value is None:
        return
    if not (0 <= value <= 1) or (value == 1 and not include_one):
        raise FlagError(f"{flag} {value}: must lie in [0, 1{']' if include_one else ')'}")


def existing_path(flag: str, value: str | Path | None, what: str = "file") -> None:
    """A file (or, for exported models, a folder) the flag names must exist."""
    if value in (None, ""):
        return
    if not Path(value).expanduser().exists():
        raise MissingFileError(f"{flag} {value}: not found (no such {what})")


_OFFICIAL_WEIGHTS = re.compile(r"yolov5[nsmlx]6?(-cls|-seg)?\.pt")


def missing_weights_message(path: Path) -> str:
    """What to do about a weights file that is not there; official names are not downloaded, unlike v7.0."""
    message = f"weights file '{path}' not found; put the .pt file there or pass --weights PATH"
    if _OFFICIAL_WEIGHTS.fullmatch(path.name):
        message += (f". Official YOLOv5 weights are not downloaded (no network at run time): fetch {path.name} "
                    f"from https://github.com/ultralytics/yolov5/releases/tag/v7.0 on a connected machine, "
                    f"copy it to {path.resolve()}, and it loads as is")
    return message


def existing_weights(value: str | Path) -> None:
    """``--weights`` must exist; the message says where to get official YOLOv5 weights (nothing is downloaded)."""
    if value and not Path(value).expanduser().exists():
        raise MissingFileError(f"--weights: {missing_weights_message(Path(value))}")


# The largest --imgsz any script takes: 6.4x the 1280 pixels the largest YOLOv5 models (P6) train and run at.
# Above it the activations alone outgrow any machine (at 20000 pixels the 3-channel input is 4.8 GB, yolov5n's
# first 16-channel feature map 6.4 GB) and a run ends when memory does, minutes later; such images are tiled.
MAX_IMGSZ = 8192
IMGSZ_HELP = f"1 to {MAX_IMGSZ} pixels, rounded up to a multiple of the model's stride"


def image_sizes(flag: str, sizes: int | Sequence[int]) -> None:
    """Every size in [1, MAX_IMGSZ] (see ``MAX_IMGSZ`` for why there is a ceiling)."""
    for size in [sizes] if isinstance(sizes, int) else sizes:
        at_least(flag, size, 1, " pixel (it is rounded up to a multiple of the model's stride)")
        if size > MAX_IMGSZ:
            raise FlagError(f"{flag} {size}: at most {MAX_IMGSZ} pixels (6.4x the 1280 the largest YOLOv5 models "
                            f"run at; at {size} the input image alone takes {3 * 4 * size * size / 1e9:.1f} GB and "
                            "the feature maps several times that): cut large images into tiles or pass a smaller "
                            f"{flag}")


# ---------------------------------------------------------------------------------------------- per script
# ---------------------------------------------------------------------------------------------- image size
def check_img_size(imgsz: int, stride: int, floor: int = 0, flag: str = "--imgsz") -> int:
    """``imgsz`` rounded up to a multiple of ``stride`` (at least ``floor``); logs when it changes.

    YOLOv5 v7.0's rule, applied by train.py (floor = 2 strides, for --multi-scale), val.py, detect.py and
    export.py alike: a model whose feature maps must divide evenly can only run at such sizes, and a silently
    different size would give silently different results.
    """
    image_sizes(flag, imgsz)
    new = max(math.ceil(imgsz / stride) * stride, floor)
    if new != imgsz:
        LOGGER.warning("%s %d must be a multiple of the model's largest stride %d%s: using %d", flag, imgsz, stride,
                       f" and at least {floor}" if floor else "", new)
    return new

