"""What detect.py does, callable from tests: sources -> letterbox -> model -> NMS -> drawings and files."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import torch

from utils.common.boxes import non_max_suppression
from utils.common.errors import FlagError
from utils.common.flags import check_img_size
from utils.common.torch_utils import select_device
from utils.inference.predict import (
    OutputOptions,
    VideoSink,
    classification_text,
    detect_frame,
    draw_classification,
    frame_name,
    output_stem,
    save_outputs,
)
from utils.inference.sources import expand_source, iterate_frames

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectOptions:
    """Everything detect.py accepts (YOLOv5 v7.0 flag names).

    ``data`` (v7.0's ``--data``) names the classes of weights that carry no names; names in the weights win.
    ``visualize`` writes every layer's feature maps per frame to ``save_dir/<stem>/`` (.pt weights only);
    ``view_img`` shows each annotated frame in a window (OpenCV with a GUI backend and a display).
    """

    weights: str
    source: str
    imgsz: int = 640
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    classes: Sequence[int] | None = None
    agnostic_nms: bool = False
    multi_label: bool = False
    augment: bool = False
    device: str = ""
    half: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    save_csv: bool = False
    nosave: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    project: str = "runs/detect"
    name: str = "exp"
    exist_ok: bool = False
    data: str | None = None
    vid_stride: int = 1
    visualize: bool = False
    view_img: bool = False


def run_detect(opts: DetectOptions) -> list[dict[str, Any]]:
    """Predict every frame of ``opts.source``; returns one dict per frame (path, frame, detections n x 6), or
    one row per image with each head's top class for a classifier."""
    from utils.runners.common import RunDir, check_artifact_size, load_predictor

    if opts.view_img:
        check_display()
    run_dir = RunDir(opts.project, opts.name, opts.exist_ok)
    run_dir.check({"--weights": opts.weights, "--source": opts.source, "--data": opts.data})
    torch_device = select_device(opts.device)
    predictor, info = load_predictor(opts.weights, torch_device, opts.half)
    files = expand_source(opts.source)
    if info.task == "classify":
        outputs = OutputOptions(run_dir.create(), [], opts.save_txt, opts.save_conf, nosave=opts.nosave,
                                line_thickness=opts.line_thickness, view_img=opts.view_img)
        return classify_source(predictor, files, opts.imgsz, info.heads, outputs, opts.save_csv, opts.vid_stride)
    is_torch = isinstance(predictor, torch.nn.Module)
    _check_pytorch_only_options(is_torch, opts.augment, opts.visualize)
    nms = partial(non_max_suppression, conf_thres=opts.conf_thres, iou_thres=opts.iou_thres, classes=opts.classes,
                  agnostic=opts.agnostic_nms, multi_label=opts.multi_label, max_det=opts.max_det)
    names = info.names or _names_from_data(opts.data)
    stride = max(info.stride, 32)
    imgsz = check_img_size(opts.imgsz, stride)
    check_artifact_size(predictor, imgsz, opts.weights)
    outputs = OutputOptions(run_dir.create(), names, opts.save_txt, opts.save_conf, opts.save_crop, opts.nosave,
                            opts.line_thickness, opts.hide_labels, opts.hide_conf, opts.visualize, opts.view_img)
    save_dir = outputs.save_dir
    sink = VideoSink()
    results = []
    for frame in iterate_frames(files, opts.vid_stride):
        det = detect_frame(predictor, frame, imgsz, stride, torch_device, opts.augment, opts.half, nms, outputs)
        results.append({"path": str(frame.path), "frame": frame.frame, "detections": det})
        save_outputs(frame, det, outputs, sink)
    sink.close()
    LOGGER.info("results saved to %s", save_dir)
    return results


def classify_source(predictor: Any, files: list[Path], imgsz: int, heads: Sequence[dict] | None,
                    outputs: OutputOptions, save_csv: bool = False, vid_stride: int = 1) -> list[dict[str, Any]]:
    """detect.py on a classifier: each head's top class per image (or video frame), in the log, drawn on the
    saved image (unless --nosave), in ``labels/<stem>.txt`` (--save-txt) and ``predictions.csv`` (--save-csv)."""
    from utils.inference.classification import classify_images, write_predictions_csv

    frames = list(iterate_frames(files, vid_stride))
    rows = classify_images(predictor, ((frame_name(f), f.image) for f in frames), imgsz, heads)
    sink = VideoSink()
    for frame, row in zip(frames, rows):
        text = classification_text(row)
        LOGGER.info("%s: %s", frame_name(frame), text)
        if outputs.save_txt:
            path = outputs.save_dir / "labels" / f"{output_stem(frame)}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{line}\n" for line in text.split(", ")), encoding="utf-8")
        if not outputs.nosave:
            annotated = draw_classification(frame.image.copy(), text.split(", "), outputs.line_thickness)
            if frame.is_video:
                sink.write(frame, annotated, outputs.save_dir / f"{frame.path.stem}.mp4")
            else:
                cv2.imwrite(str(outputs.save_dir / frame.path.name), annotated)
    sink.close()
    if save_csv:
        write_predictions_csv(rows, outputs.save_dir / "predictions.csv")
    LOGGER.info("%d images classified; results saved to %s", len(rows), outputs.save_dir)
    return rows


def check_display() -> None:
    """--view-img needs OpenCV built with a GUI backend and, on Linux, a display; say which is missing."""
    if re.search(r"GUI:\s+NONE", cv2.getBuildInformation()):
        raise FlagError("--view-img needs OpenCV with a GUI backend; requirements.txt installs "
                           "opencv-python-headless, which has none (pip install opencv-python to get one). "
                           "Annotated images and videos are saved in the run folder either way.")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise FlagError("--view-img needs a display: neither DISPLAY nor WAYLAND_DISPLAY is set. "
                           "Annotated images and videos are saved in the run folder either way.")


def _check_pytorch_only_options(is_torch: bool, augment: bool, visualize: bool) -> None:
    if augment and not is_torch:
        raise FlagError("--augment needs PyTorch weights (.pt); exported models run one pass")
    if visualize and not is_torch:
        raise FlagError("--visualize needs PyTorch weights (.pt): exported models do not expose their layers")
    if visualize and augment:
        raise FlagError("--visualize draws one plain forward pass; drop --augment")


def _names_from_data(data: str | None) -> list[str]:
    """Class names from a data YAML, or none (boxes are then labelled by class index)."""
    if data is None:
        return []
    from utils.data.config import load_data_config

    return list(load_data_config(data)["names"])


