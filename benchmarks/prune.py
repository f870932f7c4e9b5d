"""Pruning benchmark (issue 23): Network Slimming and EagleEye at two FLOPs budgets, each fine-tuned with and
without the unpruned model as teacher; params, GFLOPs, mAP before/after fine-tuning, CPU latency.

    python benchmarks/prune.py --base runs/train/yolov5s/weights/best.pt \
        --data ../shared/datasets/neu-det/neu-det.yaml --workdir runs/prune-bench

Stages (each skipped when its output exists, so an interrupted run continues, and ``--stages`` runs a part):

1. ``sparse``   fine-tune the base model with ``train.py --sparse`` (what slimming needs)
2. ``prune``    prune_slim.py (from the sparse model) and prune_eagleeye.py (from the base) at each ratio
3. ``finetune`` train.py --cfg pruned.yaml --weights pruned.pt, with and without --teacher base.pt
4. ``measure``  val.py numbers, and ONNX Runtime / OpenVINO batch-1 latency at each size with 2 threads,
               every model timed in the same interleaved rounds as the unpruned one

Every stage calls the command-line tools, so each row is reproduced by the command the log prints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FINETUNE_HYP = ["--hyp-override", "lr0=0.005", "lrf=0.1", "warmup_epochs=1"]


def run(command: list[str], log: Path) -> None:
    """Run one tool, its output appended to ``log``; the command line is printed so a row can be reproduced."""
    line = " ".join(shlex.quote(c) for c in command)
    print(f"$ {line}", flush=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {line}\n")
        fh.flush()
        subprocess.run(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)


def train_args(args: argparse.Namespace, epochs: int) -> list[str]:
    return ["--data", str(args.data), "--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size),
            "--epochs", str(epochs), "--workers", str(args.workers), "--noautoanchor", *FINETUNE_HYP,
            "--exist-ok"]


def stage_sparse(args: argparse.Namespace, work: Path) -> Path:
    """The sparse run's last.pt: best.pt would be picked by mAP, usually an early, barely sparse epoch."""
    last = work / "train" / "sparse" / "weights" / "last.pt"
    if not last.exists():
        run([sys.executable, "train.py", "--weights", str(args.base), *train_args(args, args.sparse_epochs),
             "--sparse", str(args.sparse), "--sparse-decay", args.sparse_decay, "--project", str(work / "train"),
             "--name", "sparse"], work / "log.txt")
    return last


def variants(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [(method, ratio) for method in ("slim", "eagleeye") for ratio in args.ratios]


def stage_prune(args: argparse.Namespace, work: Path, sparse: Path) -> None:
    for method, ratio in variants(args):
        path = work / "pruned" / f"{method}{int(ratio * 100)}.yaml"
        if path.with_suffix(".pt").exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        common = ["--data", str(args.data), "--imgsz", str(args.imgsz), "--path", str(path), "--exist-ok",
                  "--workers", str(args.workers)]
        if method == "slim":
            run([sys.executable, "prune_slim.py", "--weights", str(sparse), "--remain-ratio", str(ratio), *common],
                work / "log.txt")
        else:
            run([sys.executable, "prune_eagleeye.py", "--weights", str(args.base), "--remain-ratio", str(ratio),
                 "--max-iter", str(args.max_iter), *common], work / "log.txt")


def finetuned(work: Path, method: str, ratio: float, teacher: bool) -> Path:
    name = f"{method}{int(ratio * 100)}-{'kd' if teacher else 'plain'}"
    return work / "train" / name / "weights" / "best.pt"


def stage_finetune(args: argparse.Namespace, work: Path) -> None:
    for method, ratio in variants(args):
        pruned = work / "pruned" / f"{method}{int(ratio * 100)}.yaml"
        for teacher in (False, True):
            best = finetuned(work, method, ratio, teacher)
            if best.exists():
                continue
            extra = ["--teacher", str(args.base)] if teacher else []
            run([sys.executable, "train.py", "--cfg", str(pruned), "--weights", str(pruned.with_suffix(".pt")),
                 *train_args(args, args.finetune_epochs), *extra, "--project", str(work / "train"),
                 "--name", best.parents[1].name], work / "log.txt")


def model_numbers(weights: Path, args: argparse.Namespace) -> dict[str, float]:
    """Parameters, GFLOPs at --imgsz and val.py's mAP (rect batches, as v7.0)."""
    from utils.common.torch_utils import count_parameters, model_gflops
    from utils.runners.val import ValOptions, run_val
    from utils.weights.checkpoint import load_checkpoint

    model = load_checkpoint(weights).model
    metrics = run_val(ValOptions(str(weights), str(args.data), imgsz=args.imgsz, batch_size=32, workers=args.workers,
                                 noplots=True, project=str(weights.parents[2] / "val"), name=weights.parents[1].name,
                                 exist_ok=True))
    return {"params": count_parameters(model), "gflops": model_gflops(model, args.imgsz) or 0.0,
            "mAP50": float(metrics["mAP50"]), "mAP50-95": float(metrics["mAP50-95"])}


def latencies(models: dict[str, Path], sizes: list[int], threads: int, runs: int, work: Path) -> dict:
    """Median batch-1 inference ms per model, runtime and size; all models in the same interleaved rounds."""
    from benchmarks.deploy import measure_latency, open_backend
    from utils.export import ExportOptions, export_model
    from utils.tasks import TaskOptions, build_task

    result: dict = {}
    files = build_task("detect", ROOT / "data" / "neu-det-sample.yaml", TaskOptions()).calibration_files("val")
    for size in sizes:
        backends = {}
        for label, weights in models.items():
            folder = work / "export" / f"{label}-{size}"
            artifacts = export_model(ExportOptions(weights=weights, include=("onnx", "openvino"), imgsz=(size, size),
                                                 simplify=True, output_dir=folder, exist_ok=True))
            backends[f"{label}|onnx"] = open_backend("onnx", artifacts["onnx"], threads)
            backends[f"{label}|openvino"] = open_backend("openvino", artifacts["openvino"], threads)
            result.setdefault(label, {})[f"onnx_bytes_{size}"] = artifacts["onnx"].stat().st_size
        timings = measure_latency(backends, files, size, 1, runs)
        for key, stages in timings.items():
            label, runtime = key.split("|")
            result[label][f"{runtime}_{size}"] = stages["infer"]
    return result


def stage_measure(args: argparse.Namespace, work: Path, sparse: Path) -> dict:
    models = {"unpruned": Path(args.base), "sparse": sparse}
    for method, ratio in variants(args):
        models[f"{method}{int(ratio * 100)}"] = work / "pruned" / f"{method}{int(ratio * 100)}.pt"
        for teacher in (False, True):
            best = finetuned(work, method, ratio, teacher)
            if best.exists():
                models[best.parents[1].name] = best
    numbers = {label: model_numbers(path, args) for label, path in models.items()}
    timed = {k: v for k, v in models.items() if k == "unpruned" or k.endswith(("-kd", "-plain"))}  # fine-tuned
    speed = latencies(timed, args.latency_sizes, args.threads, args.runs, work)
    for label, values in speed.items():
        numbers[label].update(values)
    (work / "results.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def table(numbers: dict, sizes: list[int]) -> str:
    base = numbers["unpruned"]
    head = ["model", "params (M)", "GFLOPs", "mAP@.5", "mAP@.5:.95", "d mAP@.5:.95"]
    head += [f"{rt} {s} ms (x)" for s in sizes for rt in ("ORT", "OpenVINO")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, n in numbers.items():
        cells = [label, f"{n['params'] / 1e6:.2f}", f"{n['gflops']:.2f}", f"{n['mAP50']:.4f}", f"{n['mAP50-95']:.4f}",
                 f"{100 * (n['mAP50-95'] - base['mAP50-95']):+.1f}"]
        for size in sizes:
            for runtime in ("onnx", "openvino"):
                key = f"{runtime}_{size}"
                cells.append(f"{n[key]:.1f} ({base[key] / n[key]:.2f}x)" if key in n else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="trained unpruned checkpoint")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "prune-bench")
    parser.add_argument("--stages", nargs="+", default=["sparse", "prune", "finetune", "measure"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6], help="FLOPs kept")
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sparse", type=float, default=5e-4, help="train.py --sparse for the slimming model")
    parser.add_argument("--sparse-decay", default="none", choices=["none", "linear", "cos"])
    parser.add_argument("--sparse-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--max-iter", type=int, default=200, help="EagleEye candidates")
    parser.add_argument("--latency-sizes", type=int, nargs="+", default=[256, 640])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    sparse = stage_sparse(args, work) if "sparse" in args.stages else work / "train" / "sparse" / "weights" / "last.pt"
    if "prune" in args.stages:
        stage_prune(args, work, sparse)
    if "finetune" in args.stages:
        stage_finetune(args, work)
    if "measure" in args.stages:
        numbers = stage_measure(args, work, sparse)
        print(table(numbers, args.latency_sizes))
        from utils.common.timing import cpu_model

        print(f"(median of {args.runs} interleaved rounds, batch 1, {args.threads} threads, {cpu_model()}; "
              f"speed-up x against the unpruned model in the same rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
