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
import numpy as np
import torch

from utils.common.boxes import non_max_suppression, scale_boxes, xyxy2xywh
from utils.common.errors import FlagError
from utils.common.flags import check_img_size
from utils.common.plots import class_name, draw_detections
from utils.common.torch_utils import select_device, time_sync
from utils.inference.feature_maps import capture_feature_maps, save_feature_maps
from utils.inference.sources import Frame, expand_source, iterate_frames

LOGGER = logging.getLogger(__name__)


def prepare_image(image_bgr: np.ndarray, imgsz: int, stride: int, auto: bool) -> tuple[torch.Tensor, tuple]:
    """Letterbox to ``imgsz`` (minimal stride padding when ``auto``), BGR->RGB, CHW, float in [0, 1]."""
    from utils.data.augment import letterbox

    padded, ratio, pad = letterbox(image_bgr, imgsz, auto=auto, stride=stride)
    tensor = torch.from_numpy(np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1))).float() / 255
    return tensor[None], (ratio, pad)


class VideoSink:
    """Writes annotated frames of one video source to an .mp4 beside the other outputs."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.writer = None

    def write(self, frame: Frame, image: np.ndarray, out_path: Path) -> None:
        if self.path != out_path:
            self.close()
            h, w = image.shape[:2]
            self.writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), frame.fps, (w, h))
            self.path = out_path
        self.writer.write(image)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.writer, self.path = None, None


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

    torch_device = select_device(opts.device)
    predictor, info = load_predictor(opts.weights, torch_device, opts.half)
    files = expand_source(opts.source)
    run_dir = RunDir(opts.project, opts.name, opts.exist_ok)
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
        det = _detect_frame(predictor, frame, imgsz, stride, torch_device, opts.augment, opts.half, nms, outputs)
        results.append({"path": str(frame.path), "frame": frame.frame, "detections": det})
        _save_outputs(frame, det, outputs, sink)
    sink.close()
    LOGGER.info("results saved to %s", save_dir)
    return results


def classify_source(predictor: Any, files: list[Path], imgsz: int, heads: Sequence[dict] | None,
                    outputs: OutputOptions, save_csv: bool = False, vid_stride: int = 1) -> list[dict[str, Any]]:
    """detect.py on a classifier: each head's top class per image (or video frame), in the log, drawn on the
    saved image (unless --nosave), in ``labels/<stem>.txt`` (--save-txt) and ``predictions.csv`` (--save-csv)."""
    from utils.inference.classification import classify_images, write_predictions_csv

    frames = list(iterate_frames(files, vid_stride))
    rows = classify_images(predictor, ((_frame_name(f), f.image) for f in frames), imgsz, heads)
    sink = VideoSink()
    for frame, row in zip(frames, rows):
        text = classification_text(row)
        LOGGER.info("%s: %s", _frame_name(frame), text)
        if outputs.save_txt:
            path = outputs.save_dir / "labels" / f"{_output_stem(frame)}.txt"
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


def classification_text(row: dict[str, Any]) -> str:
    """``'color red 0.93, type shirt 0.71'``: each head's top class and confidence from a prediction row."""
    heads = [key for key in row if key != "path" and not key.endswith(("_index", "_conf"))]
    return ", ".join(f"{head} {row[head]} {row[f'{head}_conf']:.2f}" for head in heads)


def draw_classification(image: np.ndarray, lines: Sequence[str], thickness: int = 2) -> np.ndarray:
    """Each line of text in the top-left corner, white on a dark band (legible on any image)."""
    scale = max(max(image.shape[0], image.shape[1]) / 640, 0.35)
    height = max(int(22 * scale), 12)
    for k, line in enumerate(lines):
        y = height * (k + 1)
        (w, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, max(thickness - 1, 1))
        cv2.rectangle(image, (0, y - height + 2), (w + 6, y + 4), (40, 40, 40), -1)
        cv2.putText(image, line, (3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (255, 255, 255),
                    max(thickness - 1, 1), cv2.LINE_AA)
    return image


def _frame_name(frame: Frame) -> str:
    return str(frame.path) + (f":{frame.frame}" if frame.is_video else "")


@dataclass(frozen=True)
class OutputOptions:
    """Where and what detect.py writes for each frame besides the returned detections."""

    save_dir: Path
    names: Sequence[str]
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    nosave: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    visualize: bool = False
    view_img: bool = False


def _detect_frame(predictor, frame: Frame, imgsz: int, stride: int, device: torch.device, augment: bool,
                  half: bool, nms, outputs: OutputOptions) -> torch.Tensor:
    """Letterbox, infer, NMS and map boxes back to the frame; logs the three timings. Returns n x 6 on the CPU."""
    t0 = time_sync()
    images, (ratio, pad) = prepare_image(frame.image, imgsz, stride, auto=isinstance(predictor, torch.nn.Module))
    images = images.to(device)
    t1 = time_sync()
    if outputs.visualize:
        with capture_feature_maps(predictor) as captured:
            preds = _infer(predictor, images, augment, stride, half)
        save_feature_maps(captured, outputs.save_dir / _output_stem(frame))
    else:
        preds = _infer(predictor, images, augment, stride, half)
    t2 = time_sync()
    det = nms(preds)[0]
    scale_boxes(images.shape[2:], det[:, :4], frame.image.shape[:2], (ratio, pad))
    t3 = time_sync()
    LOGGER.info("%s%s: %d detections (%.1f ms pre-process, %.1f ms inference, %.1f ms NMS)", frame.path.name,
                f" frame {frame.frame}" if frame.is_video else "", len(det), (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                (t3 - t2) * 1e3)
    return det.cpu()


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


def _output_stem(frame: Frame) -> str:
    """File stem for a frame's outputs: the image's stem, or the video's stem and the frame index."""
    return frame.path.stem + (f"_{frame.frame}" if frame.is_video else "")


@torch.no_grad()
def _infer(predictor, images: torch.Tensor, augment: bool, stride: int, half: bool) -> torch.Tensor:
    if augment:
        from utils.inference.tta import augmented_inference

        return augmented_inference(predictor, images.half() if half else images, stride).float()
    if isinstance(predictor, torch.nn.Module):
        out = predictor(images.half() if half else images)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()
    return predictor(images)


def _names_from_data(data: str | None) -> list[str]:
    """Class names from a data YAML, or none (boxes are then labelled by class index)."""
    if data is None:
        return []
    from utils.data.config import load_data_config

    return list(load_data_config(data)["names"])


def _save_outputs(frame: Frame, det: torch.Tensor, outputs: OutputOptions, sink: VideoSink) -> None:
    stem = _output_stem(frame)
    if outputs.save_txt:
        _write_txt(det, frame.image.shape[:2], outputs.save_dir / "labels" / f"{stem}.txt", outputs.save_conf)
    if outputs.save_crop:
        for k, (*xyxy, _, cls) in enumerate(det.tolist()):
            x1, y1, x2, y2 = (round(v) for v in xyxy)
            crop = frame.image[max(y1, 0):y2, max(x1, 0):x2]
            if crop.size:
                out = outputs.save_dir / "crops" / class_name(outputs.names, cls) / f"{stem}_{k}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(out), crop)
    if outputs.nosave and not outputs.view_img:
        return
    annotated = draw_detections(frame.image.copy(), det.numpy(), outputs.names, outputs.line_thickness,
                                outputs.hide_labels, outputs.hide_conf)
    if outputs.view_img:
        cv2.imshow(str(frame.path), annotated)
        cv2.waitKey(1)  # 1 ms: lets the window repaint without pausing the stream
    if outputs.nosave:
        return
    if frame.is_video:
        sink.write(frame, annotated, outputs.save_dir / f"{frame.path.stem}.mp4")
    else:
        cv2.imwrite(str(outputs.save_dir / frame.path.name), annotated)


def _write_txt(det: torch.Tensor, shape: tuple[int, int], path: Path, save_conf: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = shape
    gain = torch.tensor([w, h, w, h], dtype=torch.float32)
    with path.open("w") as fh:
        for *xyxy, conf, cls in det.tolist():
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
            row = (int(cls), *xywh, conf) if save_conf else (int(cls), *xywh)
            fh.write(("%g " * len(row)).rstrip() % row + "\n")
