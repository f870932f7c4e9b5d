"""Run a detector (or classifier) on images, folders, globs, videos or .txt lists of files.

    python detect.py --weights runs/train/exp/weights/best.pt --source data/neu-det-sample/images/val
    python detect.py --weights model.onnx --source video.mp4 --conf-thres 0.3 --save-txt
"""

from __future__ import annotations

import argparse

from utils.common.cli import UserArgumentParser, exit_without_teardown, run_cli
from utils.common.paths import REPO_ROOT as ROOT
from utils.runners.common import add_inference_args, check_inference_args
from utils.runners.detect import DetectOptions, run_detect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__.splitlines()[0])
    add_inference_args(parser, "detect")
    parser.add_argument("--source", default=str(ROOT / "data" / "neu-det-sample" / "images" / "val"),
                        help="file, folder, glob, video or .txt list")
    parser.add_argument("--data", help="(optional) data-set YAML whose names label the boxes of weights without names")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--classes", type=int, nargs="+", help="keep only these class indices")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--multi-label", action="store_true", help="allow several labels per box")
    parser.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    parser.add_argument("--save-csv", action="store_true", help="classifiers: write predictions.csv")
    parser.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride: keep every n-th frame")
    parser.add_argument("--view-img", action="store_true", help="show results in a window (needs a GUI OpenCV)")
    parser.add_argument("--visualize", action="store_true", help="save every layer's feature maps (.pt weights)")
    parser.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    parser.add_argument("--line-thickness", type=int, default=3, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="hide labels")
    parser.add_argument("--hide-conf", action="store_true", help="hide confidences")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_inference_args(args, "detect")
    run_detect(DetectOptions(**vars(args)))
    return 0


if __name__ == "__main__":
    exit_without_teardown(run_cli(main))  # every output is written and closed by now
