"""Validate a detector (or classifier) on a data set: P, R, mAP@.5, mAP@.5:.95, per class, speed.

    python val.py --weights runs/train/exp/weights/best.pt --data data/neu-det-sample.yaml --img 256
    python val.py --weights model.onnx --data ../shared/datasets/neu-det/neu-det.yaml --img 256

Weights may be .pt, TorchScript, .onnx, an OpenVINO or NCNN folder, or a TensorRT .engine.
"""

from __future__ import annotations

import argparse

from utils.common.cli import UserArgumentParser, exit_without_teardown, run_cli
from utils.runners.common import add_inference_args, check_inference_args
from utils.runners.val import ValOptions, run_val
from utils.train.config import DEFAULT_DATA


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__.splitlines()[0])
    add_inference_args(parser, "val")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data-set YAML")
    parser.add_argument("--batch-size", "--batch", type=int, default=32, help="batch size")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", choices=["train", "val", "test", "speed"],
                        help="split to score, or speed only (on val)")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class data set")
    parser.add_argument("--verbose", action="store_true", help="mAP per class (printed anyway below 50 classes)")
    parser.add_argument("--save-json", action="store_true", help="save a COCO-style predictions JSON")
    parser.add_argument("--cocoeval", action="store_true", help="also score with pycocotools, printed beside ours")
    parser.add_argument("--noplots", action="store_true", help="save no plots")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_inference_args(args, "val")
    run_val(ValOptions(**vars(args)))
    return 0


if __name__ == "__main__":
    exit_without_teardown(run_cli(main))  # every output is written and closed by now
