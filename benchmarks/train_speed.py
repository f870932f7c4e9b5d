"""Training speed and accuracy of the reference recipe (issue 4):

    python benchmarks/train_speed.py --epochs 30            # yolov5n.yaml from scratch on NEU-DET, img 256
    python benchmarks/train_speed.py --epochs 30 --fp32     # the same in float32 (train.py --fp32)
    python benchmarks/train_speed.py --epochs 30 --compile  # the same with torch.compile

Trains in train.py's default precision (bfloat16 autocast on a CPU with AVX512-BF16 or AMX, float32 on other
CPUs) unless ``--fp32`` or ``--bf16`` (bfloat16 even where it is emulated) asks for one; the table names the
precision used.

Prints seconds per epoch (training and validation separately), training images/s, peak memory and the final
metrics. The YOLOv5 v7.0 reference on this kind of 2-core CPU: ~57 s/epoch including val, 2.3 GB peak RSS,
mAP@.5 0.561 / mAP@.5:.95 0.247 after 30 epochs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peak_memory import PeakMemory  # noqa: E402
from utils.common.cli import run_cli  # noqa: E402
from utils.tasks.detect import DetectTask  # noqa: E402
from utils.train.callbacks import default_callbacks  # noqa: E402
from utils.train.config import TrainConfig  # noqa: E402
from utils.train.engine import fit  # noqa: E402


class EpochTimer:
    """Records when each epoch's training loop starts and when its validation ends."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.precision = ""

    def on_train_epoch_start(self, trainer) -> None:
        self.precision = trainer.precision.describe()
        self.marks.append(("start", time.perf_counter()))

    def on_train_batch_end(self, trainer) -> None:
        self.last_batch = time.perf_counter()

    def on_fit_epoch_end(self, trainer) -> None:
        self.marks.append(("train_end", self.last_batch))
        self.marks.append(("end", time.perf_counter()))


def main(argv: list[str] | None = None, task_class: type[DetectTask] = DetectTask) -> int:
    """Train the recipe and print the table; ``task_class`` lets probes/yolov5_swap.py change the data set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "neu-det" / "neu-det.yaml"))
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--seed", type=int, default=0, help="the recipe: 0")
    parser.add_argument("--compile", action="store_true", help="train with torch.compile (train.py --compile)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp32", action="store_true", help="train in float32 (train.py --fp32)")
    precision.add_argument("--bf16", action="store_true",
                           help="bfloat16 autocast even on a CPU that emulates it (train.py --bf16)")
    parser.add_argument("--project", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args(argv)
    cfg = TrainConfig(cfg=args.cfg, data=args.data, epochs=args.epochs, imgsz=args.imgsz,
                      batch_size=args.batch_size, workers=args.workers, device="cpu", seed=args.seed, cache=args.cache,
                      project=args.project, name="train_speed", noplots=True, compile=args.compile,
                      bf16=args.bf16, fp32=args.fp32)
    task = task_class(cfg.data, cfg.task_options())
    timer = EpochTimer()
    callbacks = default_callbacks()
    callbacks.add_logger(timer)
    start = time.perf_counter()
    with PeakMemory() as memory:
        metrics = fit(task, cfg, callbacks)
    total = time.perf_counter() - start
    starts = [t for kind, t in timer.marks if kind == "start"]
    ends = [t for kind, t in timer.marks if kind == "end"]
    train_ends = [t for kind, t in timer.marks if kind == "train_end"]
    per_epoch = [e - s for s, e in zip(starts, ends)]
    train_time = sum(e - s for s, e in zip(starts, train_ends))
    n_train = len(task.train_dataset)
    options = f", {timer.precision}" + (", torch.compile" if args.compile else "")
    print(f"| recipe | {args.cfg} scratch, img {args.imgsz}, batch {args.batch_size}, workers {args.workers}, "
          f"{args.epochs} epochs, CPU{options} |")
    print(f"| s/epoch incl. val (median) | {sorted(per_epoch)[len(per_epoch) // 2]:.1f} |")
    train_epochs = [e - s for s, e in zip(starts, train_ends)]
    print(f"| training images/s (training loop only, all epochs) | {n_train * len(per_epoch) / train_time:.1f} |")
    print(f"| training images/s (median epoch) | {n_train / sorted(train_epochs)[len(train_epochs) // 2]:.1f} |")
    # per epoch, so that a first epoch that compiled (--compile) or warmed caches can be told from the rest
    print(f"| training images/s per epoch | {', '.join(f'{n_train / t:.1f}' for t in train_epochs)} |")
    print(f"| validation s/epoch (mean) | {(sum(per_epoch) - train_time) / len(per_epoch):.1f} |")
    print(f"| total wall time | {total / 60:.1f} min |")
    print(f"| peak memory, process + workers: PSS (RSS summed) | {memory.peak_pss / 1e9:.2f} GB "
          f"({memory.peak_rss / 1e9:.2f} GB) |")
    print(f"| final mAP@.5 / mAP@.5:.95 | {metrics.get('mAP50', 0):.4f} / {metrics.get('mAP50-95', 0):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, log_level=logging.WARNING))
