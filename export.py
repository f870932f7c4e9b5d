"""Export a detector to TorchScript, ONNX, OpenVINO, NCNN or a TensorRT engine (YOLOv5 v7.0 flags), or to any
format registered with utils.export.register_format.

    python export.py --weights yolov5n.pt --include onnx openvino --imgsz 256 --dynamic --simplify
    python export.py --weights yolov5n.pt --include onnx --dynamic-batch  # free batch, fixed 640 x 640
    python export.py --weights yolov5n.pt --include onnx --nms          # NMS inside the ONNX graph
    python export.py --weights yolov5n.pt --include onnx --int8 --data data/neu-det-sample.yaml

Unlike YOLOv5, a failed export is an error (non-zero exit), not a log line, and an existing artifact is never
overwritten: refused, or with --exist-ok set aside into previous/ beside it. After exporting, the outputs of
every artifact are compared with PyTorch on real images and the max absolute difference is printed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.cli import UserArgumentParser, run_cli  # noqa: E402
from utils.common.flags import IMGSZ_HELP  # noqa: E402
from utils.export import REGISTRY, ExportOptions, NMSSettings, parse_shape  # noqa: E402
from utils.export.onnx import DEFAULT_OPSET, MIN_OPSET, MIN_OPSET_INT8, MIN_OPSET_NMS, highest_opset  # noqa: E402
from utils.runners.export import check_export_args, run_export  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = UserArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="checkpoint .pt")
    parser.add_argument("--include", nargs="+", default=["torchscript"],
                        help=f"formats: {', '.join(REGISTRY.exportable_names())}")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640],
                        help=f"h w (or one size), each {IMGSZ_HELP}")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dynamic", action="store_true",
                        help="as YOLOv5 v7.0: dynamic batch, height and width (ONNX/OpenVINO; TensorRT: a profile of "
                             "batch 1..--batch-size at --imgsz; TorchScript: batch only)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="dynamic batch only, height and width fixed at --imgsz (ONNX/OpenVINO/TensorRT/"
                             "TorchScript), e.g. for engines built with trtexec for one input size")
    parser.add_argument("--dynamic-hw", action="store_true", help="deprecated alias of --dynamic")
    parser.add_argument("--exist-ok", action="store_true",
                        help="set artifacts that already exist aside into previous/ (default: refuse, leaving them "
                             "as they are)")
    parser.add_argument("--simplify", action="store_true", help="simplify the ONNX graph with onnxslim")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset: {MIN_OPSET} to {highest_opset()} with this torch; --nms needs "
                             f"{MIN_OPSET_NMS} or higher, --int8 {MIN_OPSET_INT8} or higher")
    parser.add_argument("--half", action="store_true", help="FP16 (TorchScript/ONNX need --device 0)")
    parser.add_argument("--int8", action="store_true",
                        help=f"INT8: {' / '.join(fmt.int8 for fmt in REGISTRY.exportable() if fmt.int8)}")
    parser.add_argument("--data", type=Path, help="data YAML: train images calibrate INT8, val images check outputs")
    parser.add_argument("--calib-images", type=int, default=300, help="number of INT8 calibration images")
    parser.add_argument("--int8-keep", type=int, default=0, metavar="N",
                        help="ONNX/OpenVINO INT8: keep the N layers with the largest measured INT8 sensitivity in FP32 "
                             "(accuracy for speed; the ranking is printed; see docs/deploy.md)")
    parser.add_argument("--qat-placement", choices=("tensorrt", "cpu"), default="tensorrt",
                        help="QAT checkpoints: 'tensorrt' writes the trained QDQ graph (TensorRT, OpenVINO), 'cpu' "
                             "re-quantizes the trained weights with each CPU runtime's calibrated quantizer (ONNX "
                             "Runtime's for .onnx, OpenVINO's NNCF for the IR; needs --data; their fastest graphs)")
    parser.add_argument("--workspace", type=float, default=4.0, help="TensorRT workspace (GB)")
    parser.add_argument("--nms", action="store_true", help="end-to-end ONNX: NMS inside the graph")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="--nms confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="--nms IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="--nms detections per image")
    parser.add_argument("--device", default="cpu", help="cpu or cuda index, e.g. 0")
    parser.add_argument("--min-shape", type=parse_shape, help="TensorRT profile min, e.g. 1x3x640x640")
    parser.add_argument("--opt-shape", type=parse_shape, help="TensorRT profile opt")
    parser.add_argument("--max-shape", type=parse_shape, help="TensorRT profile max")
    parser.add_argument("--output-dir", type=Path, help="where artifacts go (default: beside --weights)")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with PyTorch")
    args = parser.parse_args(argv)
    check_export_args(args)
    if args.dynamic_hw:  # earlier, --dynamic freed only the batch and --dynamic-hw added height and width
        warnings.warn("--dynamic-hw is deprecated: --dynamic now frees batch, height and width as in YOLOv5 v7.0; "
                      "use --dynamic (or --dynamic-batch for the batch alone)", FutureWarning, stacklevel=2)
        args.dynamic = True
    return args


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    imgsz = tuple(args.imgsz * 2 if len(args.imgsz) == 1 else args.imgsz)
    include = tuple(f.lower() for name in args.include for f in name.split(","))
    nms = NMSSettings(args.conf_thres, args.iou_thres, args.max_det)
    return ExportOptions(weights=args.weights, include=include, imgsz=imgsz, batch_size=args.batch_size,
                         dynamic=args.dynamic, dynamic_batch=args.dynamic_batch, simplify=args.simplify,
                         opset=args.opset,
                         half=args.half, int8=args.int8, data=args.data, calib_images=args.calib_images,
                         int8_keep=args.int8_keep, qat_placement=args.qat_placement,
                         workspace=args.workspace, nms=args.nms, nms_settings=nms, device=str(args.device),
                         min_shape=args.min_shape, opt_shape=args.opt_shape, max_shape=args.max_shape,
                         output_dir=args.output_dir, exist_ok=args.exist_ok)


def main(argv: list[str] | None = None) -> int:
    """Export, then report max |artifact - PyTorch|; a user's mistake raises :class:`utils.common.errors.UserError`."""
    args = parse_args(argv)
    run_export(options_from_args(args), compare=not args.no_compare)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
