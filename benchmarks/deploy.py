"""Deployment benchmark: latency (pre-process / inference / NMS) and mAP of each CPU inference backend.

    python benchmarks/deploy.py --weights ../shared/fixtures/yolov5n-neu-det-v7.pt \
        --data ../shared/datasets/neu-det/neu-det.yaml --imgsz 256 640 --batch 1 8 --threads 2

Backends: PyTorch eager (fused), ONNX Runtime FP32, OpenVINO FP32 (f32 hint, and its CPU default, bf16 where
the CPU has it), NCNN FP32, and the INT8 artifacts (calibrated on train images) listed in ``export_artifacts``.
Every runtime gets the same thread count (``torch.set_num_threads`` for PyTorch). Pre-process is reading +
letterboxing the batch's images, inference is one backend call, NMS is
``utils.common.boxes.non_max_suppression`` at conf 0.25 / IoU 0.45 (detect.py settings). mAP uses
``utils.evaluation.detection.validate_detector`` on the val split with square (non-rect) batches, because exported
graphs have a fixed input size; all backends see the same loader, so the numbers are comparable with each
other (not bit-identical with v7.0's rect-batch val.py). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.common.boxes import non_max_suppression  # noqa: E402
from utils.common.cli import run_cli  # noqa: E402
from utils.common.timing import cpu_model, interleaved_rounds, timed_ms  # noqa: E402
from utils.export import ExportOptions, export_model, prepare_for_export, sensitive_layers  # noqa: E402
from utils.export.backend import Backend  # noqa: E402
from utils.export.common import letterbox_tensor  # noqa: E402
from utils.export.onnx import ONNXRuntimeBackend  # noqa: E402
from utils.export.openvino import OpenVINOBackend  # noqa: E402
from utils.export.quantize import quantize_onnx_int8  # noqa: E402
from utils.export.registry import load_backend  # noqa: E402
from utils.tasks import TaskOptions, build_task  # noqa: E402
from utils.weights.checkpoint import load_checkpoint  # noqa: E402

LOGGER = logging.getLogger("benchmarks.deploy")
BACKENDS = ("pytorch", "onnx", "openvino", "openvino-bf16", "ncnn", "onnx-int8", "openvino-int8", "onnx-int8-keep",
            "openvino-int8-keep", "onnx-int8-qat", "openvino-int8-qat", "onnx-int8-qat-cpu", "openvino-int8-qat-cpu")
INT8 = {"onnx-int8": "int8 PTQ (ONNX Runtime quantizer)", "openvino-int8": "int8 PTQ (NNCF)",
        "onnx-int8-keep": "int8 PTQ, sensitive layers fp32",
        "openvino-int8-keep": "int8 PTQ (NNCF), sensitive layers fp32",
        "onnx-int8-qat": "int8 QAT, trained QDQ graph", "openvino-int8-qat": "int8 QAT, trained QDQ graph",
        "onnx-int8-qat-cpu": "int8 QAT weights, ONNX Runtime quantizer (--qat-placement cpu)",
        "openvino-int8-qat-cpu": "int8 QAT weights, NNCF (--qat-placement cpu)"}
PRECISION = {"pytorch": "fp32", "onnx": "fp32", "openvino": "fp32 (f32 hint)",
             "openvino-bf16": "fp32 IR, bf16 (default hint)", "ncnn": "fp32", **INT8}
RUNTIME = {name: ("PyTorch eager" if name == "pytorch" else "NCNN" if name == "ncnn"
                  else "OpenVINO" if name.startswith("openvino") else "ONNX Runtime") for name in BACKENDS}


def export_artifacts(weights: Path, data: Path, imgsz: int, work: Path, calib_images: int,
                     backends: list[str], keep: int = 3, qat_weights: Path | None = None) -> dict[str, Path]:
    """Dynamic-batch ONNX, OpenVINO and NCNN (batch 1), and the INT8 artifacts among ``backends``, all at
    ``imgsz``: PTQ by each runtime's quantizer (ONNX Runtime's for the .onnx, NNCF for the IR), the same with
    the ``keep`` most sensitive layers in FP32, the QAT checkpoint's trained QDQ graph (run by both runtimes),
    and the QAT weights re-quantized by each runtime's quantizer (``export.py --qat-placement cpu``)."""
    folder = work / f"img{imgsz}"
    common = dict(imgsz=(imgsz, imgsz), dynamic_batch=True, simplify=True, exist_ok=True)  # a rerun's --workdir
    artifacts = export_model(ExportOptions(weights=weights, include=("onnx", "openvino", "ncnn"), output_dir=folder,
                                         **common))
    artifacts["openvino-bf16"] = artifacts["openvino"]
    calibration = build_task("detect", data, TaskOptions()).calibration_files("train")[:calib_images]
    int8 = dict(int8=True, data=data, calib_images=calib_images, **common)
    if "onnx-int8" in backends:  # each calibration takes tens of seconds and GBs of RAM
        artifacts["onnx-int8"] = quantize_onnx_int8(artifacts["onnx"], folder / "model_int8.onnx", calibration)
    if "openvino-int8" in backends:
        artifacts["openvino-int8"] = export_model(ExportOptions(weights=weights, include=("openvino",),
                                                              output_dir=folder / "nncf", **int8))["openvino"]
    if "onnx-int8-keep" in backends:
        model = prepare_for_export(load_checkpoint(weights).model)
        layers = sensitive_layers(model, calibration, (imgsz, imgsz), keep)
        artifacts["onnx-int8-keep"] = quantize_onnx_int8(artifacts["onnx"], folder / "model_int8_keep.onnx",
                                                         calibration, keep_layers=layers)
    if "openvino-int8-keep" in backends:
        kept = export_model(ExportOptions(weights=weights, include=("openvino",), int8_keep=keep,
                                        output_dir=folder / "nncf_keep", **int8))
        artifacts["openvino-int8-keep"] = kept["openvino"]
    if qat_weights and {"onnx-int8-qat", "openvino-int8-qat"} & set(backends):
        qat = export_model(ExportOptions(weights=qat_weights, include=("onnx",), imgsz=(imgsz, imgsz), int8=True,
                                       dynamic=True, output_dir=folder / "qat", exist_ok=True))
        artifacts["onnx-int8-qat"] = artifacts["openvino-int8-qat"] = qat["onnx_int8"]  # OpenVINO reads QDQ ONNX
    if qat_weights and {"onnx-int8-qat-cpu", "openvino-int8-qat-cpu"} & set(backends):
        requantized = export_model(ExportOptions(weights=qat_weights, include=("onnx", "openvino"), qat_placement="cpu",
                                               output_dir=folder / "qat_cpu", **int8))
        artifacts["onnx-int8-qat-cpu"], artifacts["openvino-int8-qat-cpu"] = (requantized["onnx_int8"],
                                                                              requantized["openvino"])
    artifacts["pytorch"] = weights
    return artifacts


def open_backend(name: str, artifact: Path, threads: int) -> Backend:
    """The runtime the row names, whatever the sidecar prefers (load_backend's choice is what val.py uses)."""
    if name.startswith("openvino"):
        return OpenVINOBackend(artifact, threads=threads, cpu_default_precision=name == "openvino-bf16")
    if name.startswith("onnx"):
        return ONNXRuntimeBackend(artifact, threads=threads)
    return load_backend(artifact, threads=threads)


def measure_latency(backends: dict[str, Backend], files: list[Path], imgsz: int, batch: int,
                    runs: int) -> dict[str, dict[str, float]]:
    """Median ms per batch of each stage and backend over ``runs`` interleaved rounds
    (:func:`utils.common.timing.interleaved_rounds`); each round runs every backend once on the same images."""

    def job(backend: Backend) -> Callable[[int], dict[str, float]]:
        def one_round(number: int) -> dict[str, float]:
            chunk = [files[(number * batch + i) % len(files)] for i in range(batch)]
            images, pre_ms = timed_ms(lambda c: torch.stack([letterbox_tensor(f, (imgsz, imgsz)) for f in c]), chunk)
            output, infer_ms = timed_ms(backend, images)
            _, nms_ms = timed_ms(non_max_suppression, output, 0.25, 0.45)
            return {"pre": pre_ms, "infer": infer_ms, "nms": nms_ms}
        return one_round

    samples = interleaved_rounds({name: job(backend) for name, backend in backends.items()}, runs)
    return {name: {stage: statistics.median(v) for stage, v in values.items()} | {"infer_min": min(values["infer"])}
            for name, values in samples.items()}


def measure_map(backend: Backend, data: Path, imgsz: int, batch: int) -> dict[str, float] | None:
    """mAP@.5 and mAP@.5:.95 on the val split with utils.evaluation.detection (None when that module is unavailable)."""
    try:
        from utils.evaluation.detection import ValidationOptions, validate_detector
    except ImportError as exc:
        LOGGER.warning("no utils.evaluation.detection.validate_detector (%s): latency only", exc)
        return None
    from utils.data import create_dataloader, load_data_config

    config = load_data_config(data)
    loader, _ = create_dataloader(config["val"], imgsz, batch, backend.stride, augment=False, pad=0.0, rect=False,
                                  workers=0, shuffle=False, prefix="val: ")
    metrics = validate_detector(backend, loader, int(config["nc"]), ValidationOptions(names=config["names"]))
    return {"mAP50": float(metrics["mAP50"]), "mAP50-95": float(metrics["mAP50-95"])}


def markdown_table(rows: list[dict], threads: int) -> str:
    header = ("| backend | precision | imgsz | batch | threads | pre-process ms | inference ms (median / min) | NMS ms "
              "| inference ms/img | speed-up vs eager | vs fastest non-INT8 | mAP@.5 | mAP@.5:.95 |")
    lines = [f"Device: {cpu_model()} ({threads} threads per runtime), torch {torch.__version__}", "",
             header, "|" + "---|" * 13]
    eager = {(r["imgsz"], r["batch"]): r["infer"] for r in rows if r["backend"] == "pytorch"}
    fastest: dict[tuple[int, int], float] = {}
    for r in rows:
        if r["backend"] not in INT8:
            key = (r["imgsz"], r["batch"])
            fastest[key] = min(fastest.get(key, float("inf")), r["infer"])
    for r in rows:
        key = (r["imgsz"], r["batch"])
        speedup = eager.get(key, float("nan")) / r["infer"]
        versus = fastest.get(key, float("nan")) / r["infer"]
        map50 = f"{r['mAP50']:.4f}" if r.get("mAP50") is not None else "-"
        map5095 = f"{r['mAP50-95']:.4f}" if r.get("mAP50-95") is not None else "-"
        lines.append(f"| {RUNTIME[r['backend']]} | {PRECISION[r['backend']]} | {r['imgsz']} | {r['batch']} | {threads} "
                     f"| {r['pre']:.1f} | {r['infer']:.1f} / {r['infer_min']:.1f} | {r['nms']:.2f} "
                     f"| {r['infer'] / r['batch']:.1f} "
                     f"| {speedup:.2f}x | {versus:.2f}x | {map50} | {map5095} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[256, 640])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--int8-keep", type=int, default=3, help="PTQ rows 'sensitive layers fp32': how many")
    parser.add_argument("--qat-weights", type=Path, help="QAT checkpoint of the same model (train.py --qat)")
    parser.add_argument("--map-imgsz", type=int, default=256, help="image size of the mAP runs (0: no mAP)")
    parser.add_argument("--map-batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, help="keep exported artifacts here (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        work = args.workdir or Path(tmp)
        rows = run_benchmark(args, work)
    print(markdown_table(rows, args.threads))
    return 0


def run_benchmark(args: argparse.Namespace, work: Path) -> list[dict]:
    files = build_task("detect", args.data, TaskOptions()).calibration_files("val")
    rows = []
    for imgsz in args.imgsz:
        artifacts = export_artifacts(args.weights, args.data, imgsz, work, args.calib_images, args.backends,
                                     args.int8_keep, args.qat_weights)
        backends = {name: open_backend(name, artifacts[name], args.threads)
                    for name in args.backends if name in artifacts}
        scores = {name: measure_map(backend, args.data, imgsz, args.map_batch) if imgsz == args.map_imgsz else None
                  for name, backend in backends.items()}
        for batch in args.batch:
            latency = measure_latency(backends, files, imgsz, batch, args.runs)
            for name in backends:
                rows.append({"backend": name, "imgsz": imgsz, "batch": batch, **latency[name], **(scores[name] or {})})
                LOGGER.warning("%s imgsz %d batch %d: %s %s", name, imgsz, batch, latency[name], scores[name] or "")
    return rows


if __name__ == "__main__":
    raise SystemExit(run_cli(main, log_level=logging.WARNING))
