"""End-to-end training on the embedded NEU-DET sample: loss falls, best.pt validates, resume after SIGKILL is
exact, DDP with two CPU processes runs."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.config import TrainConfig
from utils.training import run_training

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample.yaml"


def _config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    base = dict(cfg="yolov5n.yaml", data=str(SAMPLE), imgsz=128, batch_size=8, epochs=8, workers=0, device="cpu",
                project=str(tmp_path), name=name, exist_ok=True, seed=0, noautoanchor=True)
    base.update(overrides)
    return TrainConfig(**base)


def _results(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_training_loss_falls_and_best_validates(tmp_path):
    # 36 images: a nominal batch of 8 (instead of 64) gives 5 optimizer steps per epoch, and with the
    # augmentations off every epoch sees the same images, so 75 steps are enough to see the losses fall.
    no_augment = ["mosaic=0", "fliplr=0", "hsv_h=0", "hsv_s=0", "hsv_v=0", "translate=0", "scale=0"]
    cfg = _config(tmp_path, "smoke", epochs=15, hyp_override=["warmup_epochs=0", "nbs=8", "lr0=0.02", *no_augment])
    run_training(cfg)
    run = tmp_path / "smoke"
    rows = _results(run)
    assert len(rows) == 15
    # learning rates as v7.0 logs them: the ones used during the epoch (linear schedule, lrf 0.01, one epoch
    # behind lf as in v7.0: epoch e trains at lf(e - 1), epoch 0 at lf(0))
    for row in (rows[0], rows[1], rows[-1]):
        used = max(int(row["epoch"]) - 1, 0)
        assert float(row["lr/pg1"]) == pytest.approx(0.02 * ((1 - used / 15) * 0.99 + 0.01)), row
    for part in ("box", "cls"):  # objectness targets are IoUs, which rise as boxes improve: its loss may rise
        losses = [float(row[f"train/{part}"]) for row in rows]
        assert _fitted_drop(losses) > 0.07, (part, losses)  # ~15 % on this recipe
    assert float(rows[-1]["val/box"]) < float(rows[0]["val/box"]), "the validation box loss did not fall"
    for name in ("weights/best.pt", "weights/last.pt", "results.png", "labels.png", "train_batch0.jpg",
                 "confusion_matrix.png", "PR_curve.png", "val_batch0_pred.jpg", "hyp.yaml", "opt.yaml"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"

    from utils.val_runner import run_validation

    metrics = run_validation(str(run / "weights" / "best.pt"), str(SAMPLE), imgsz=128, batch_size=8, workers=0,
                             device="cpu", project=str(tmp_path), name="val", noplots=True)
    assert metrics["n_images"] == 12 and 0.0 <= metrics["mAP50-95"] <= metrics["mAP50"] <= 1.0


class DtypeProbe:
    """Records the dtypes a training step sees: the first convolution's output and the head's outputs as the
    loss receives them (after the trainer's cast), plus the dtypes of the weights after the optimizer step."""

    def __init__(self) -> None:
        self.conv_out: set[torch.dtype] = set()
        self.loss_inputs: set[torch.dtype] = set()
        self.weights: set[torch.dtype] = set()

    def on_pretrain_routine_end(self, trainer) -> None:
        first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda _m, _i, out: self.conv_out.add(out.dtype))
        loss_fn = trainer.loss_fn

        def recording_loss(preds, batch):
            self.loss_inputs.update(p.dtype for p in preds)
            return loss_fn(preds, batch)

        trainer.loss_fn = recording_loss

    def on_train_batch_end(self, trainer) -> None:
        self.weights.update(p.dtype for p in trainer.model.parameters())
        self.weights.update(p.dtype for p in trainer.ema.ema.parameters())


def test_bf16_training_autocasts_convolutions_and_loss_falls(tmp_path):
    """--bf16 (CPU mixed precision): convolutions run in bfloat16, weights and EMA stay float32, and the smoke
    recipe's losses fall as in float32."""
    from utils.callbacks import default_callbacks
    from utils.engine import fit
    from utils.training import make_task

    no_augment = ["mosaic=0", "fliplr=0", "hsv_h=0", "hsv_s=0", "hsv_v=0", "translate=0", "scale=0"]
    cfg = _config(tmp_path, "bf16", epochs=15, bf16=True, noplots=True,
                  hyp_override=["warmup_epochs=0", "nbs=8", "lr0=0.02", *no_augment])
    probe, callbacks = DtypeProbe(), default_callbacks()
    callbacks.add_logger(probe)
    fit(make_task(cfg), cfg, callbacks)
    assert probe.conv_out == {torch.bfloat16}
    assert probe.loss_inputs == {torch.float32}
    assert probe.weights == {torch.float32}
    rows = _results(tmp_path / "bf16")
    for part in ("box", "cls"):
        losses = [float(row[f"train/{part}"]) for row in rows]
        assert _fitted_drop(losses) > 0.07, (part, losses)
    assert float(rows[-1]["val/box"]) < float(rows[0]["val/box"]), "the validation box loss did not fall"


def _fitted_drop(values: list[float]) -> float:
    """Relative fall of the least-squares line through per-epoch values, from the first epoch to the last.

    One epoch's mean loss jumps by ~5 % on 36 images; a line through all of them does not.
    """
    epochs = np.arange(len(values))
    slope, start = np.polyfit(epochs, values, 1)
    return float(-slope * epochs[-1] / start)


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--cfg", "yolov5n.yaml", "--data", str(SAMPLE), "--imgsz", "96",
            "--batch-size", "8", "--epochs", "4", "--workers", "0", "--device", "cpu", "--deterministic",
            "--noautoanchor", "--noplots", "--project", str(run_dir.parent), "--name", run_dir.name, "--exist-ok",
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full), check=True, env=_env(), cwd=ROOT, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "results.csv").exists() and len(_results(killed)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(_results(killed)) < 4

    subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(killed / "weights" / "last.pt")],
                   check=True, env=_env(), cwd=ROOT, capture_output=True)
    a = torch.load(full / "weights" / "last.pt", weights_only=True)
    b = torch.load(killed / "weights" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["metrics"] == b["metrics"]

    finished = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(killed / "weights" / "last.pt")],
                              env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode != 0 and "training finished" in finished.stderr + finished.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_cpu_processes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run = tmp_path / "ddp"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", *_train_cmd(run)[1:]]
    cmd[cmd.index("--epochs") + 1] = "1"
    result = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "weights" / "last.pt").exists() and len(_results(run)) == 1
