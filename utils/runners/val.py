"""What val.py does, callable from tests: load any backend, build the v7.0 val loader, score, report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from utils.common.errors import DataConfigError, FlagError
from utils.common.flags import check_img_size
from utils.common.paths import increment_path
from utils.common.torch_utils import select_device
from utils.evaluation.detection import ValidationOptions, format_results, validate_detector
from utils.weights.checkpoint import CheckpointError

LOGGER = logging.getLogger(__name__)


class BackendModule(torch.nn.Module):
    """Lets an exported-model backend stand where code expects an ``nn.Module`` (eval/train are no-ops)."""

    def __init__(self, backend: Any):
        super().__init__()
        self.backend = backend

    def forward(self, images: torch.Tensor) -> Any:
        return self.backend(images)


def load_predictor(weights: str, device: torch.device, half: bool) -> tuple[Any, dict[str, Any]]:
    """(model or backend, info with names/stride/task) for a .pt checkpoint or any artifact of a registered export
    format (opened by :func:`utils.export.backend.load_backend` through the format registry). A checkpoint stays
    the PyTorch module itself: test-time augmentation, feature maps and rectangular batches need the module."""
    from utils.export.backend import load_backend
    from utils.export.pytorch import FORMAT as PYTORCH

    path = Path(weights)
    if PYTORCH.holds(path):
        from utils.weights.checkpoint import load_checkpoint

        loaded = load_checkpoint(path, fuse=True)
        model = loaded.model.to(device)
        task = "detect" if hasattr(model.model[-1], "anchors") else "classify"
        heads = None
        if task == "classify":
            from models.classify import heads_of

            heads = heads_of(model)
        nc = int(model.model[-1].nc) if task == "detect" else None
        return model, {"names": loaded.meta.get("names") or model.names, "stride": int(model.stride.max()),
                       "task": task, "heads": heads, "nc": nc}
    backend = load_backend(weights, device=str(device), fp16=half)
    return backend, {"names": list(backend.names), "stride": int(backend.stride), "task": backend.task,
                     "heads": getattr(backend, "heads", None), "nc": len(backend.names) or None}


class RunDir:
    """``project/name`` (or the next free ``name2``, ``name3``... without ``exist_ok``), made only when a script
    is ready to write there: a mistake found while loading leaves no empty folder behind."""

    def __init__(self, project: str | Path, name: str, exist_ok: bool):
        self.path = Path(project) / name
        self.exist_ok = exist_ok

    def create(self) -> Path:
        path = self.path if self.exist_ok else increment_path(self.path)
        path.mkdir(parents=True, exist_ok=True)
        return path


def data_names_for(info: dict[str, Any], data_cfg: dict[str, Any], weights: str, single_cls: bool) -> list[str]:
    """The class names to score and print: the data set's, once the model is known to predict as many classes.

    A detector trained on other data is refused (YOLOv5 v7.0 refuses it too) instead of being scored against
    labels whose ids mean other classes; with ``--single-cls`` every class is one and any model fits.
    """
    if single_cls:
        return ["item"]
    names = list(data_cfg["names"])
    model_nc = info.get("nc")
    if model_nc is not None and model_nc != len(names):
        raise CheckpointError(f"{weights} predicts {model_nc} classes but {data_cfg['yaml_file']} has {len(names)} "
                              f"(nc: {len(names)}): it was trained on other data. Pass the --data it was trained on, "
                              "or --single-cls to score boxes whatever their class")
    model_names = [str(n) for n in info.get("names") or []]
    if model_names and model_names != names:
        LOGGER.info("class names from %s (the model calls them %s)", data_cfg["yaml_file"], ", ".join(model_names))
    return names


def check_classifier_heads(model_heads: list[dict], data_heads: list[dict], weights: str, data: Any) -> None:
    """A classifier is scored only on data with its heads and class counts (else ids would mean other classes)."""
    model_shape = [(h["name"], len(h["names"])) for h in model_heads or []]
    data_shape = [(h["name"], len(h["names"])) for h in data_heads]
    if model_shape and [n for _, n in model_shape] != [n for _, n in data_shape]:
        raise CheckpointError(f"{weights} classifies {model_shape} (head, classes) but {data} has {data_shape}: it "
                              "was trained on other data; pass the --data it was trained on")


def check_artifact_size(predictor: Any, imgsz: int, weights: str) -> None:
    """An export with a fixed input size runs at that size only; another --imgsz is refused before loading data."""
    fixed = getattr(predictor, "imgsz", None)
    if fixed and not getattr(predictor, "dynamic_hw", False) and tuple(fixed) != (imgsz, imgsz):
        raise FlagError(f"--imgsz {imgsz}: {weights} was exported for {fixed[0]}x{fixed[1]} inputs; pass --imgsz "
                        f"{fixed[0]} or re-export with that --imgsz (or --dynamic-hw for ONNX/OpenVINO)")


def _split(task: str) -> str:
    """The data split a --task scores: train, val or test (speed times the val split)."""
    return task if task in ("train", "test") else "val"


def run_validation(weights: str, data: str, imgsz: int = 640, batch_size: int = 32, conf_thres: float = 0.001,
                   iou_thres: float = 0.6, max_det: int = 300, task: str = "val", device: str = "",
                   workers: int = 2, single_cls: bool = False, verbose: bool = False, save_txt: bool = False,
                   save_conf: bool = False, save_json: bool = False, cocoeval: bool = False, half: bool = False,
                   augment: bool = False, noplots: bool = False, project: str = "runs/val", name: str = "exp",
                   exist_ok: bool = False) -> dict[str, Any]:
    """Validate ``weights`` on the ``task`` split of ``data``; returns the metrics dict."""
    from utils.data import create_dataloader, load_data_config

    if task == "speed":  # timing only, at detect.py's thresholds
        conf_thres, iou_thres, noplots, save_json, cocoeval = 0.25, 0.45, True, False, False
    torch_device = select_device(device)
    predictor, info = load_predictor(weights, torch_device, half)
    info["weights"] = weights
    run_dir = RunDir(project, name, exist_ok)
    if info["task"] == "classify":
        if augment:
            raise FlagError("--augment (test-time augmentation) is for detectors; this is a classifier")
        return run_classifier_validation(predictor, info, data, imgsz, batch_size, workers, run_dir, not noplots,
                                         torch_device, split=_split(task))
    data_cfg = load_data_config(data)
    split = _split(task)
    if not data_cfg.get(split):
        raise DataConfigError(f"--task {task}: {data_cfg['yaml_file']} has no '{split}' split; add '{split}: <folder "
                              f"or .txt list>' to it" + (" or validate with --task val" if split != "val" else ""))
    names = data_names_for(info, data_cfg, weights, single_cls)
    nc = len(names)
    stride = max(info["stride"], 32)
    imgsz = check_img_size(imgsz, stride)
    check_artifact_size(predictor, imgsz, weights)
    # v7.0's rectangular batches wherever the input size is free (PyTorch, exports with --dynamic); fixed-size
    # artifacts get square, unpadded batches of their own size, as v7.0 does for every exported model
    rect = isinstance(predictor, torch.nn.Module) or bool(getattr(predictor, "dynamic_hw", False))
    loader, _ = create_dataloader(data_cfg[split], imgsz, batch_size, stride, augment=False, pad=0.5 if rect else 0.0,
                                  rect=rect, workers=workers, shuffle=False, single_cls=single_cls,
                                  prefix=f"{split}: ", nc=int(data_cfg["nc"]))
    save_dir = run_dir.create()
    options = ValidationOptions(conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, single_cls=single_cls,
                                half=half, augment=augment, plots=not noplots, save_dir=save_dir, save_txt=save_txt,
                                save_conf=save_conf, save_json=save_json or cocoeval, names=names,
                                streams=1 if task == "speed" else None)  # speed: plain per-batch latency
    metrics = validate_detector(predictor, loader, nc, options)
    print(format_results(metrics, names, verbose or 1 < nc < 50))  # per class as v7.0's val.py prints it
    print(f"device {torch_device}, batch {batch_size}, precision {'fp16' if half else 'fp32'}, image size {imgsz}; "
          f"results saved to {save_dir}")
    if cocoeval:
        from utils.evaluation.coco_eval import cocoeval_cross_check

        metrics["cocoeval"] = cocoeval_cross_check(loader.dataset, metrics["predictions_json"], nc)
        print(f"pycocotools: mAP50 {metrics['cocoeval']['mAP50']:.4f}, mAP50-95 {metrics['cocoeval']['mAP50-95']:.4f}"
              f" (ours: {metrics['mAP50']:.4f}, {metrics['mAP50-95']:.4f}; COCO's AP omits v7.0's end-point "
              "interpolation, so ours is slightly higher when recall < 1)")
    return metrics


def run_classifier_validation(predictor: Any, info: dict[str, Any], data: str, imgsz: int, batch_size: int,
                              workers: int, run_dir: RunDir, plots: bool, device: torch.device,
                              split: str = "val") -> dict[str, Any]:
    """Top-1/top-5 per head, per-class accuracy and confusion-matrix PNGs for a classifier (any backend)."""
    from utils.data.classify import create_split_loader, load_classify_data
    from utils.tasks.classify import format_classifier_results, validate_classifier

    data_cfg = load_classify_data(data)
    check_classifier_heads(info["heads"], data_cfg.heads, info.get("weights", "the weights"), data_cfg.yaml_file)
    loader, _ = create_split_loader(data_cfg, split, imgsz, batch_size, workers=workers)
    save_dir = run_dir.create()
    if not isinstance(predictor, torch.nn.Module):
        predictor = BackendModule(predictor)
    metrics = validate_classifier(predictor, loader, info["heads"], device=device, save_dir=save_dir, plots=plots)
    print(format_classifier_results(metrics, info["heads"]))
    print(f"device {device}, batch {batch_size}, image size {imgsz}; results saved to {save_dir}")
    return metrics
