"""Classification benchmarks: accuracy runs through the shared training loop, and a params/GFLOPs table.

    # (a) two heads (color, type) from scratch on fashion-color-type
    python benchmarks/classify.py fashion --cfg yolov5n-mcls-s.yaml --imgsz 128 --epochs 12
    # (b) three heads from two sources (fashion color/type + NEU-DET defect type), joint vs sequential
    python benchmarks/classify.py multisource --mode joint --epochs 7 --imgsz 64 --max-batches 15
    python benchmarks/classify.py multisource --mode sequential --epochs 7 --finetune-epochs 1 --imgsz 64 \
        --max-batches 15
    # (c) parameters and GFLOPs of every classifier YAML
    python benchmarks/classify.py table --imgsz 128

Each accuracy run writes ``summary.json`` (metrics, wall time, exact configuration) into its run folder and
prints it. Data sets are read from ``../shared/datasets`` unless ``--datasets`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.cli import run_cli  # noqa: E402

LOGGER = logging.getLogger("benchmarks.classify")
DATASETS = ROOT.parent / "shared" / "datasets"

# From-scratch classification settings (v7.0's classifier recipe: Adam, cosine decay, label smoothing 0.1);
# no warm-up because Adam's per-parameter scaling does not need one and warm-up's bias lr of 0.1 is an SGD value.
CLASSIFY_HYP = ["lr0=0.002", "lrf=0.05", "warmup_epochs=0", "weight_decay=0.0001", "crop_scale_min=0.25",
                "hsv_h=0.01", "fliplr=0.5"]


def multisource_yaml(datasets: Path, out_dir: Path) -> Path:
    """A data YAML with heads color/type (fashion, file-name fields) and defect (NEU-DET, file-name prefix)."""
    import yaml

    fashion, neu = datasets / "fashion-color-type", datasets / "neu-det"
    neu_names = yaml.safe_load((neu / "neu-det.yaml").read_text())["names"]
    spec = {
        "path": str(fashion),
        "train": "images/train",
        "val": "images/val",
        "heads": [
            {"name": "color", "names": ["black", "blue", "red"]},
            {"name": "type", "names": ["dress", "jeans", "shirt", "shoes"]},
            {"name": "defect", "names": neu_names, "train": str(neu / "images" / "train"),
             "val": str(neu / "images" / "val"), "layout": "prefix"},
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fashion-neu-multisource.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (data workers): comparable on a shared machine."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_and_report(cfg, out_json: Path) -> dict:
    """Fit through utils.train.engine and write metrics + wall time + configuration as JSON."""
    from utils.runners.train import make_task
    from utils.train.engine import fit

    start, cpu_start = time.time(), _cpu_seconds()
    metrics = fit(make_task(cfg), cfg)
    summary = {"metrics": metrics, "wall_time_s": round(time.time() - start, 1),
               "cpu_time_s": round(_cpu_seconds() - cpu_start, 1), "config": dataclasses.asdict(cfg)}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2, default=str))
    shown = {k: summary[k] for k in ("metrics", "wall_time_s", "cpu_time_s")}
    LOGGER.info("summary %s:\n%s", out_json, json.dumps(shown, indent=2))
    return summary


def make_config(args: argparse.Namespace, data: Path, name: str, **extra):
    from utils.train.config import TrainConfig

    return TrainConfig(cfg=args.cfg, data=str(data), hyp="", hyp_override=[*CLASSIFY_HYP, *args.hyp_override],
                       epochs=args.epochs, batch_size=args.batch_size, imgsz=args.imgsz, optimizer="Adam",
                       cos_lr=True, label_smoothing=0.1, workers=args.workers, seed=args.seed, device="cpu",
                       project=str(args.project), name=name, exist_ok=True, noplots=False, cache="ram",
                       patience=1000, max_batches=args.max_batches, **extra)


def run_fashion(args: argparse.Namespace) -> dict:
    data = Path(args.datasets) / "fashion-color-type" / "fashion-color-type.yaml"
    cfg = make_config(args, data, args.name or "fashion")
    return train_and_report(cfg, cfg.save_dir / "summary.json")


def run_multisource(args: argparse.Namespace) -> dict:
    name = args.name or f"multisource-{args.mode}"
    data = multisource_yaml(Path(args.datasets), Path(args.project) / name)
    cfg = make_config(args, data, name, heads_mode=args.mode, finetune_epochs=args.finetune_epochs)
    return train_and_report(cfg, cfg.save_dir / "summary.json")


def run_table(args: argparse.Namespace) -> list[dict]:
    """Params and GFLOPs (at --imgsz) of every YAML in models/cls, default heads / nc."""
    from models.yolo import ClassificationModel
    from utils.common.torch_utils import model_summary

    rows = []
    for path in sorted((ROOT / "models" / "cls").glob("*.yaml")):
        info = model_summary(ClassificationModel(path), args.imgsz)
        rows.append({"model": path.stem, "params": info["parameters"], "gflops": round(info["gflops"], 3)})
    print(f"| model | params | GFLOPs at {args.imgsz} |\n| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['params']:,} | {row['gflops']:.3f} |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=["fashion", "multisource", "table"])
    parser.add_argument("--cfg", default="yolov5n-mcls-s.yaml", help="classifier YAML")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=0, help="train on this many random batches per epoch")
    parser.add_argument("--mode", default="joint", choices=["joint", "sequential"], help="multisource heads mode")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="sequential: final joint epochs at lr x 0.1")
    parser.add_argument("--hyp-override", nargs="*", default=[], help="extra key=value hyperparameters")
    parser.add_argument("--datasets", default=str(DATASETS), help="folder holding fashion-color-type and neu-det")
    parser.add_argument("--project", default=str(ROOT / "runs" / "benchmarks"))
    parser.add_argument("--name", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    {"fashion": run_fashion, "multisource": run_multisource, "table": run_table}[args.bench](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
