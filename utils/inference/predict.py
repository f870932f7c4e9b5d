"""Detection and classification on image and video frames: letterbox, infer, NMS, and what is saved per frame
(annotated images and videos, label files, crops); detect.py's loop is :mod:`utils.runners.detect`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.common.boxes import scale_boxes, xyxy2xywh
from utils.common.plots import class_name, draw_detections
from utils.common.torch_utils import time_sync
from utils.inference.feature_maps import capture_feature_maps, save_feature_maps
from utils.inference.sources import Frame

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


def frame_name(frame: Frame) -> str:
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


def detect_frame(predictor, frame: Frame, imgsz: int, stride: int, device: torch.device, augment: bool,
                  half: bool, nms, outputs: OutputOptions) -> torch.Tensor:
    """Letterbox, infer, NMS and map boxes back to the frame; logs the three timings. Returns n x 6 on the CPU."""
    t0 = time_sync()
    images, (ratio, pad) = prepare_image(frame.image, imgsz, stride, auto=isinstance(predictor, torch.nn.Module))
    images = images.to(device)
    t1 = time_sync()
    if outputs.visualize:
        with capture_feature_maps(predictor) as captured:
            preds = infer(predictor, images, augment, stride, half)
        save_feature_maps(captured, outputs.save_dir / output_stem(frame))
    else:
        preds = infer(predictor, images, augment, stride, half)
    t2 = time_sync()
    det = nms(preds)[0]
    scale_boxes(images.shape[2:], det[:, :4], frame.image.shape[:2], (ratio, pad))
    t3 = time_sync()
    LOGGER.info("%s%s: %d detections (%.1f ms pre-process, %.1f ms inference, %.1f ms NMS)", frame.path.name,
                f" frame {frame.frame}" if frame.is_video else "", len(det), (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                (t3 - t2) * 1e3)
    return det.cpu()


def output_stem(frame: Frame) -> str:
    """File stem for a frame's outputs: the image's stem, or the video's stem and the frame index."""
    return frame.path.stem + (f"_{frame.frame}" if frame.is_video else "")


@torch.no_grad()
def infer(predictor, images: torch.Tensor, augment: bool, stride: int, half: bool) -> torch.Tensor:
    if augment:
        from utils.inference.tta import augmented_inference

        return augmented_inference(predictor, images.half() if half else images, stride).float()
    if isinstance(predictor, torch.nn.Module):
        out = predictor(images.half() if half else images)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()
    return predictor(images)


def save_outputs(frame: Frame, det: torch.Tensor, outputs: OutputOptions, sink: VideoSink) -> None:
    stem = output_stem(frame)
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
