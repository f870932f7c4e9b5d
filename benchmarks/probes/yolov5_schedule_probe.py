"""Learning rates, momentum and optimizer steps per iteration: our Trainer against YOLOv5 v7.0's own objects.

Run by ``python benchmarks/yolov5_baseline.py --yolov5-python PY --task schedule`` inside the environment that has
PyPI ``yolov5==7.0.*`` (it imports v7.0's ``smart_optimizer``, ``ModelEMA`` and model, and drives them with the
control flow of v7.0's ``train.py``: warm-up, accumulation, clipping, EMA, scheduler). Forward and backward are
replaced by a constant gradient on both sides, so the comparison is exact and takes seconds: what is compared
is the schedule, not the floating-point path of training (which is chaotic: two v7.0 runs whose initial weights
differ by 1e-7 disagree by 1e-2 in the loss within ten iterations).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from utils.tasks.detect import DetectTask  # noqa: E402
from utils.train.callbacks import Callbacks  # noqa: E402
from utils.train.config import TrainConfig  # noqa: E402
from utils.train.engine import Trainer  # noqa: E402

NOMINAL_BATCH = 64


def constant_gradient(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3) if p.grad is None else p.grad + 1e-3


def v7_schedule(model: torch.nn.Module, hyp: dict, epochs: int, n_batches: int, batch_size: int) -> tuple[list, int]:
    """Rows (lr per group, momentum, stepped) per iteration and the EMA update count, with v7.0's own objects."""
    from yolov5.utils.torch_utils import ModelEMA, smart_optimizer

    accumulate = max(round(NOMINAL_BATCH / batch_size), 1)
    weight_decay = hyp["weight_decay"] * batch_size * accumulate / NOMINAL_BATCH
    optimizer = smart_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], weight_decay)
    lf = lambda x: (1 - x / epochs) * (1.0 - hyp["lrf"]) + hyp["lrf"]  # noqa: E731 (v7.0's linear lf)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    ema = ModelEMA(model)
    warmup = max(round(hyp["warmup_epochs"] * n_batches), 100)
    last_step = -1
    scheduler.last_epoch = -1  # v7.0: start_epoch - 1
    rows = []
    for epoch in range(epochs):
        optimizer.zero_grad()
        for i in range(n_batches):
            ni = i + n_batches * epoch
            if ni <= warmup:
                accumulate = max(1, np.interp(ni, [0, warmup], [1, NOMINAL_BATCH / batch_size]).round())
                for j, group in enumerate(optimizer.param_groups):
                    start = hyp["warmup_bias_lr"] if j == 0 else 0.0
                    group["lr"] = np.interp(ni, [0, warmup], [start, group["initial_lr"] * lf(epoch)])
                    group["momentum"] = np.interp(ni, [0, warmup], [hyp["warmup_momentum"], hyp["momentum"]])
            constant_gradient(model)
            stepped = ni - last_step >= accumulate
            if stepped:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                optimizer.step()
                optimizer.zero_grad()
                ema.update(model)
                last_step = ni
            groups = optimizer.param_groups
            rows.append([float(g["lr"]) for g in groups] + [float(groups[0]["momentum"]), stepped])
        scheduler.step()
    return rows, ema.updates


def our_schedule(trainer: Trainer, epochs: int) -> tuple[list, int]:
    rows: list[list] = []

    def forward_backward(batch):
        constant_gradient(trainer.model)
        groups = trainer.optimizer.param_groups
        rows.append([g["lr"] for g in groups] + [groups[0]["momentum"], False])
        return torch.zeros(3)

    optimizer_step = trainer._optimizer_step

    def recorded_step(batch):
        optimizer_step(batch)
        rows[-1][-1] = True

    trainer._forward_backward, trainer._optimizer_step = forward_backward, recorded_step
    for epoch in range(epochs):
        trainer.epoch = epoch
        trainer._begin_epoch()
        trainer.train_one_epoch()
        trainer.scheduler.step()
    return rows, trainer.ema.updates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batches", type=int, default=45, help="batches per epoch (NEU-DET train at batch 32: 45)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("runs/schedule-probe"))
    args = parser.parse_args()
    from yolov5.models.yolo import Model

    cfg = TrainConfig(cfg="yolov5n.yaml", data=str(ROOT / "data" / "neu-det-sample.yaml"), epochs=args.epochs,
                      imgsz=64, batch_size=args.batch_size, workers=0, device="cpu", seed=0,
                      project=str(args.workdir), name="ours", exist_ok=True, noplots=True, noval=True,
                      noautoanchor=True)
    trainer = Trainer(DetectTask(cfg.data, cfg.task_options()), cfg, Callbacks())
    trainer.setup()
    empty = (torch.zeros(args.batch_size, 3, 64, 64, dtype=torch.uint8), torch.zeros(0, 6), (), ())
    trainer.train_loader = [empty] * args.batches
    v7_model = Model(str(Path(sys.modules["yolov5"].__file__).parent / "models" / "yolov5n.yaml"), ch=3, nc=6)
    v7_model.load_state_dict({k: v.contiguous() for k, v in trainer.model.state_dict().items()})
    theirs, their_updates = v7_schedule(v7_model, dict(trainer.hyp), args.epochs, args.batches, args.batch_size)
    ours, our_updates = our_schedule(trainer, args.epochs)
    a, b = np.array(theirs, dtype=float), np.array(ours, dtype=float)
    differing = np.nonzero(np.abs(a - b).max(1) > 1e-12)[0]
    print(f"| schedule vs YOLOv5 v7.0 | {args.epochs} epochs x {args.batches} batches of {args.batch_size} | "
          f"{len(differing)} of {len(a)} iterations differ | optimizer steps {int(a[:, 4].sum())} (v7.0) / "
          f"{int(b[:, 4].sum())} (ours) | EMA updates {their_updates} / {our_updates} |")
    for n in differing[:5]:
        print(f"  iteration {n}: v7.0 {a[n].round(6).tolist()}, ours {b[n].round(6).tolist()}")
    return 1 if len(differing) else 0


if __name__ == "__main__":
    raise SystemExit(main())
