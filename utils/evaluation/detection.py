"""Detection validation with YOLOv5 v7.0 semantics (used by val.py, the trainer and the deploy benchmark).

Predictions and labels are compared in the original image's pixel space (boxes scaled back through the
letterbox and clipped), NMS is multi-label at conf 0.001 / IoU 0.6, and AP is the 101-point interpolated AP
of :mod:`utils.evaluation.metrics`, so the numbers equal v7.0's on the same model and data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.common.boxes import non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh
from utils.common.concurrency import cpu_streams, pipelined, prefetch_module, run_jobs_in_processes
from utils.common.torch_utils import fastest_memory_format, time_sync
from utils.evaluation.metrics import ConfusionMatrix, DetectionMetricsAccumulator
from utils.inference.tta import augmented_inference

LOGGER = logging.getLogger(__name__)


VAL_BATCHES_TO_PLOT = 3  # val_batch{0,1,2}_labels.jpg / _pred.jpg


@dataclass
class ValidationOptions:
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    single_cls: bool = False
    half: bool = False
    augment: bool = False  # test-time augmentation (utils.inference.tta), PyTorch models only
    plots: bool = False
    save_dir: Path | None = None
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    names: Sequence[str] = field(default_factory=list)
    streams: int | None = None  # batches in flight on a CPU; None: 2 for PyTorch models, 1 for exported ones
    # training criterion (raw maps, normalised targets) -> (total, loss items); with a PyTorch model the mean
    # items per batch come back as "val_loss" (v7.0's val/box_loss, val/obj_loss, val/cls_loss)
    compute_loss: Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    progress: bool = True  # a progress bar over the batches (off for the pruning search's many short runs)


Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor] | None]]


def model_predictor(model: torch.nn.Module, half: bool = False, augment: bool = False) -> Predictor:
    """Callable images -> ((bs, N, 5+nc) decoded boxes, raw maps per level) for an eval-mode PyTorch detector.

    The model is put in its fastest memory layout in place (channels-last on the CPU). With ``augment`` the
    boxes are the merged test-time-augmented passes of :mod:`utils.inference.tta` and there are no raw maps.
    """
    model.eval()
    if half:
        model.half()
    memory_format = fastest_memory_format(model)
    stride = int(model.stride.max()) if hasattr(model, "stride") else 32

    @torch.no_grad()
    def predict(images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        images = images.contiguous(memory_format=memory_format)
        if augment:
            return augmented_inference(model, images.half() if half else images, stride).float(), None
        out = model(images.half() if half else images)
        if isinstance(out, (tuple, list)):
            return out[0].float(), list(out[1])
        return out.float(), None

    return predict


def backend_predictor(backend: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    """An exported model's images -> decoded boxes, in :func:`model_predictor`'s shape (no raw maps)."""

    def predict(images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return backend(images), None

    return predict


def _device_of(predictor: Any) -> torch.device:
    if isinstance(predictor, torch.nn.Module):
        return next(predictor.parameters()).device
    return getattr(predictor, "device", torch.device("cpu"))


def validate_detector(predictor: torch.nn.Module | Callable, loader: Iterable, nc: int,
                      options: ValidationOptions | None = None) -> dict[str, Any]:
    """Run ``predictor`` over ``loader`` (rect val loader yielding v7.0-style batches) and score it.

    ``predictor`` is a PyTorch detector or any callable images -> (bs, N, 5+nc) (export backends).
    Returns P, R, mAP50, mAP50-95, per-class values and speed (ms per image for each stage).
    On a CPU a PyTorch model works on two batches at once (one thread each), so that NMS and matching, which
    run on one core, overlap with inference instead of leaving the other core idle; results are consumed in
    batch order, so the numbers do not depend on it.
    """
    opts = options or ValidationOptions()
    device = _device_of(predictor)
    is_module = isinstance(predictor, torch.nn.Module)
    if opts.augment and not is_module:
        raise ValueError("--augment needs PyTorch weights (.pt); exported models run one pass")
    predict = model_predictor(predictor, opts.half, opts.augment) if is_module else backend_predictor(predictor)
    if opts.plots:
        prefetch_module("matplotlib.figure")  # ~0.6 s of imports, done while the model runs
    accumulator = DetectionMetricsAccumulator(1 if opts.single_cls else nc)
    confusion = ConfusionMatrix(nc=1 if opts.single_cls else nc)
    times = np.zeros(3)
    loss_sum, loss_batches = None, 0
    json_rows: list[dict] = []
    streams = opts.streams or (cpu_streams(device) if is_module else 1)  # exported backends thread themselves
    batches = tqdm(loader, desc="val", bar_format="{l_bar}{bar:10}{r_bar}", disable=not opts.progress)
    work = partial(_predict_batch, predict, device, opts)
    results = pipelined(batches, work, streams)
    for batch_index, ((images, _, paths, shapes), (detections, targets, letterboxed_shape, stage_times,
                                                    loss_items)) in enumerate(results):
        times += stage_times
        if opts.plots and opts.save_dir is not None and batch_index < VAL_BATCHES_TO_PLOT:
            _plot_val_batch(batch_index, images, targets, detections, letterboxed_shape, opts)
        if loss_items is not None:
            loss_sum = loss_items if loss_sum is None else loss_sum + loss_items
            loss_batches += 1
        for index, det in enumerate(detections):
            labels = targets[targets[:, 0] == index, 1:]
            native = _score_image(det, labels, letterboxed_shape, shapes[index], accumulator, confusion, opts)
            if opts.save_txt or opts.save_json:
                _save_predictions(native, Path(paths[index]), shapes[index][0], opts, json_rows)
    metrics = accumulator.compute(dict(enumerate(opts.names)))
    n_images = max(accumulator.n_images, 1)
    metrics["speed_ms"] = {stage: 1e3 * t / n_images / streams
                           for stage, t in zip(("preprocess", "inference", "nms"), times)}
    metrics["streams"] = streams
    if loss_sum is not None:
        metrics["val_loss"] = (loss_sum / loss_batches).tolist()
    if opts.plots and opts.save_dir is not None:
        _save_plots(metrics.get("result"), confusion, Path(opts.save_dir), opts.names)
    if opts.save_json and opts.save_dir is not None:
        path = Path(opts.save_dir) / "predictions.json"
        path.write_text(json.dumps(json_rows))
        metrics["predictions_json"] = str(path)
    metrics["confusion_matrix"] = confusion.matrix
    return metrics


def _predict_batch(predict: Callable, device: torch.device, opts: ValidationOptions, batch) -> tuple:
    """Inference and NMS of one loader batch -> (NumPy detections per image, NumPy targets in pixels, letterboxed
    shape, stage times, loss items or None)."""
    images, targets = batch[0], batch[1]
    t0 = time_sync()
    images = images.to(device, non_blocking=True).float() / 255
    targets = targets.to(device)
    t1 = time_sync()
    preds, raw_maps = predict(images)
    t2 = time_sync()
    loss_items = None
    if opts.compute_loss is not None and raw_maps is not None:  # untimed, as in v7.0
        loss_items = opts.compute_loss(raw_maps, targets)[1].cpu()
    height, width = images.shape[2:]
    # not in place: on the CPU ``targets`` is the loader's own tensor, and batches may be scored again (EagleEye)
    targets = torch.cat((targets[:, :2], targets[:, 2:] * torch.tensor((width, height, width, height),
                                                                        device=device)), 1)
    detections = non_max_suppression(preds, opts.conf_thres, opts.iou_thres, multi_label=True,
                                     agnostic=opts.single_cls, max_det=opts.max_det)
    t3 = time_sync()
    # Matching runs in NumPy on the consuming thread: convert here, off that thread.
    detections = [det.cpu().numpy() for det in detections]
    return detections, targets.cpu().numpy(), images.shape[2:], np.array((t1 - t0, t2 - t1, t3 - t2)), loss_items


def _plot_val_batch(index: int, images: torch.Tensor, targets: np.ndarray, detections: list[np.ndarray],
                    letterboxed_shape, opts: ValidationOptions) -> None:
    """val_batch{index}_labels.jpg and val_batch{index}_pred.jpg, as v7.0's val.py draws them (OpenCV: ~0.05 s)."""
    from utils.common.plots import plot_batch, plot_batch_predictions

    height, width = letterboxed_shape
    normalised = targets.copy()
    normalised[:, 2:] /= np.array((width, height, width, height), dtype=normalised.dtype)
    pixels = images.numpy()
    plot_batch(pixels, normalised, opts.names, Path(opts.save_dir) / f"val_batch{index}_labels.jpg")
    plot_batch_predictions(pixels, detections, opts.names, Path(opts.save_dir) / f"val_batch{index}_pred.jpg")


def _save_plots(result, confusion: ConfusionMatrix, save_dir: Path, names: Sequence[str]) -> None:
    """PR/F1/P/R curves and the confusion matrix, drawn by two forked processes at once."""
    jobs = DetectionMetricsAccumulator.plot_jobs(result, save_dir, dict(enumerate(names))) if result else []
    jobs.append((confusion.plot, (save_dir / "confusion_matrix.png", list(names))))
    import matplotlib.figure  # noqa: F401  (imported once here, inherited by the forked workers)

    run_jobs_in_processes(jobs)


def _score_image(det: np.ndarray, labels: np.ndarray, letterboxed_shape, shape_info, accumulator,
                 confusion, opts: ValidationOptions) -> torch.Tensor:
    """Match one image's detections to its labels in original-image pixels; returns the scaled detections.

    Works in NumPy: an image has a few hundred boxes at most, where torch's per-call overhead dominates.
    """
    original_shape, ratio_pad = shape_info
    native = det.copy()
    if opts.single_cls:
        native[:, 5] = 0
        labels = labels.copy()
        labels[:, 0] = 0
    scale_boxes(letterboxed_shape, native[:, :4], original_shape, ratio_pad)
    boxes = xywh2xyxy(labels[:, 1:5])
    scale_boxes(letterboxed_shape, boxes, original_shape, ratio_pad)
    labels_native = np.concatenate((labels[:, 0:1], boxes), 1)
    accumulator.update(native, labels_native)
    confusion.process_batch(native if len(native) else None, labels_native)
    return torch.from_numpy(native)


def _save_predictions(det: torch.Tensor, path: Path, original_shape, opts: ValidationOptions,
                      json_rows: list[dict]) -> None:
    h0, w0 = original_shape
    if opts.save_txt and opts.save_dir is not None:
        out = Path(opts.save_dir) / "labels" / f"{path.stem}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        gain = torch.tensor([w0, h0, w0, h0], dtype=det.dtype)
        with out.open("w") as fh:
            for *xyxy, conf, cls in det.cpu().tolist():
                xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
                row = (int(cls), *xywh, conf) if opts.save_conf else (int(cls), *xywh)
                fh.write(("%g " * len(row)).rstrip() % row + "\n")
    if opts.save_json:
        boxes = xyxy2xywh(det[:, :4].cpu().clone())
        boxes[:, :2] -= boxes[:, 2:] / 2  # COCO: top-left corner + size
        for (x, y, w, h), conf, cls in zip(boxes.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
            json_rows.append({"image_id": path.stem, "category_id": int(cls), "bbox": [round(v, 3) for v in
                                                                                     (x, y, w, h)],
                              "score": round(conf, 5)})


def format_results(metrics: dict[str, Any], names: Sequence[str], verbose: bool = False) -> str:
    """The v7.0 results table (all classes, then per class with --verbose)."""
    header = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}"
    lines = [header, f"{'all':>22}{metrics['n_images']:>11}{metrics['n_labels']:>11}{metrics['P']:>11.4g}"
                     f"{metrics['R']:>11.4g}{metrics['mAP50']:>11.4g}{metrics['mAP50-95']:>11.4g}"]
    if verbose:
        for cls, row in metrics["per_class"].items():
            name = names[cls] if cls < len(names) else str(cls)
            lines.append(f"{name:>22}{'':>11}{row['n_labels']:>11}{row['P']:>11.4g}{row['R']:>11.4g}"
                         f"{row['AP50']:>11.4g}{row['AP50-95']:>11.4g}")
    speed = metrics.get("speed_ms")
    if speed:
        streams = metrics.get("streams", 1)
        overlap = f" (wall-clock share: {streams} batches in flight)" if streams > 1 else ""
        lines.append("Speed: {preprocess:.1f}ms pre-process, {inference:.1f}ms inference, {nms:.1f}ms NMS per image"
                     .format(**speed) + overlap)
    return "\n".join(lines)
