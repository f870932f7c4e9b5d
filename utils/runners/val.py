"""What val.py does, callable from tests: open any model or artifact, build its task's loader, score, report."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from utils.common.errors import DataConfigError
from utils.common.torch_utils import select_device
from utils.runners.common import RunDir, check_artifact_size, load_predictor
from utils.tasks import EvalSettings, TaskOptions, build_task

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValOptions:
    """Everything val.py accepts (YOLOv5 v7.0 flag names)."""

    weights: str
    data: str
    imgsz: int = 640
    batch_size: int = 32
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    task: str = "val"  # the split to score (train, val, test) or speed
    device: str = ""
    workers: int = 2
    single_cls: bool = False
    verbose: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_json: bool = False
    cocoeval: bool = False
    half: bool = False
    augment: bool = False
    noplots: bool = False
    project: str = "runs/val"
    name: str = "exp"
    exist_ok: bool = False


def _split(task: str) -> str:
    """The data split a --task scores: train, val or test (speed times the val split)."""
    return task if task in ("train", "test") else "val"


def eval_settings(opts: ValOptions) -> EvalSettings:
    """val.py's flags as the task's evaluation settings; ``--task speed`` times at detect.py's thresholds."""
    speed = opts.task == "speed"
    return EvalSettings(conf_thres=0.25 if speed else opts.conf_thres, iou_thres=0.45 if speed else opts.iou_thres,
                        max_det=opts.max_det, half=opts.half, augment=opts.augment,
                        plots=not (opts.noplots or speed), save_txt=opts.save_txt, save_conf=opts.save_conf,
                        save_json=opts.save_json and not speed, cocoeval=opts.cocoeval and not speed,
                        streams=1 if speed else None)  # speed: plain per-batch latency


def run_val(opts: ValOptions) -> dict[str, Any]:
    """Validate ``opts.weights`` on the ``opts.task`` split of ``opts.data``; returns the metrics dict."""
    run_dir = RunDir(opts.project, opts.name, opts.exist_ok)
    run_dir.check({"--weights": opts.weights, "--data": opts.data})
    device = select_device(opts.device)
    predictor, info = load_predictor(opts.weights, device, opts.half)
    task = build_task(info.task, opts.data, TaskOptions(imgsz=opts.imgsz, batch_size=opts.batch_size,
                                                        workers=opts.workers, single_cls=opts.single_cls))
    settings = eval_settings(opts)
    task.check_settings(settings)
    split = _split(opts.task)
    if not task.has_split(split):
        raise DataConfigError(f"--task {opts.task}: {task.yaml_file} has no '{split}' split; add '{split}: <folder or "
                              ".txt list>' to it" + (" or validate with --task val" if split != "val" else ""))
    task.check_model(info, opts.weights)
    imgsz = task.input_size(opts.imgsz)
    check_artifact_size(predictor, imgsz, opts.weights)
    # v7.0's rectangular batches wherever the input size is free (PyTorch, exports with --dynamic); fixed-size
    # artifacts get square, unpadded batches of their own size, as v7.0 does for every exported model
    rect = isinstance(predictor, torch.nn.Module) or bool(getattr(predictor, "dynamic_hw", False))
    loader = task.val_loader(split, rect=rect)
    save_dir = run_dir.create()
    settings = dataclasses.replace(settings, save_dir=save_dir, device=device)
    metrics = task.evaluate(predictor, loader, settings)
    print(task.report(metrics, opts.verbose))
    print(f"device {device}, batch {opts.batch_size}, precision {'fp16' if opts.half else 'fp32'}, image size "
          f"{imgsz}; results saved to {save_dir}")
    if "cocoeval" in metrics:
        ours, coco = metrics, metrics["cocoeval"]
        print(f"pycocotools: mAP50 {coco['mAP50']:.4f}, mAP50-95 {coco['mAP50-95']:.4f} (ours: {ours['mAP50']:.4f}, "
              f"{ours['mAP50-95']:.4f}; COCO's AP omits v7.0's end-point interpolation, so ours is slightly higher "
              "when recall < 1)")
    return metrics
