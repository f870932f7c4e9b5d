"""Pieces of the training loop that need no data: config/hyp validation, freezing, EMA, schedules, SAM."""

from __future__ import annotations

import math

import pytest
import torch

from models.yolo import DetectionModel
from utils.train.config import HYP_DEFAULTS, HypError, TrainConfig, build_parser, load_hyp, parse_train_args
from utils.train.ema import ModelEMA
from utils.train.freeze import (
    alternate_plan,
    apply_trainable,
    freeze_batchnorm_stats,
    frozen_layer_indices,
    parse_freeze_schedule,
    trainable_except,
)
from utils.train.optim import SAM, build_optimizer, lr_lambda, parameter_groups, warmup_step


def test_hyp_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "hyp.bad.yaml"
    path.write_text("lr0: 0.01\nlearning_rate: 0.1\n")
    with pytest.raises(HypError, match=r"hyp\.bad\.yaml: unknown hyperparameter 'learning_rate'"):
        load_hyp(path)


def test_hyp_override_and_type_check(tmp_path):
    hyp = load_hyp(None, ["lr0=0.005", "mosaic=0"])
    assert hyp["lr0"] == 0.005 and hyp["mosaic"] == 0 and hyp["momentum"] == HYP_DEFAULTS["momentum"]
    with pytest.raises(HypError, match="'lr0' must be a number"):
        load_hyp(None, ["lr0=fast"])


def test_parser_has_yolov5_flags():
    cfg = parse_train_args(["--cfg", "yolov5n.yaml", "--img", "320", "--batch-size", "8", "--freeze", "backbone",
                            "--resume", "--cos-lr", "--optimizer", "AdamW", "--cache", "--evolve"])
    assert cfg.imgsz == 320 and cfg.batch_size == 8 and cfg.freeze == ["backbone"]
    assert cfg.resume is True and cfg.cos_lr and cfg.optimizer == "AdamW"
    assert cfg.cache == "ram" and cfg.evolve == 300
    assert parse_train_args(["--evolve", "5"]).evolve == 5  # an int, not the string "5"
    # v7.0's own tutorial line: "--batch" was an ambiguous prefix (--batch-size / --batch_size) until it was an alias
    tutorial = parse_train_args(["--img", "640", "--batch", "16", "--epochs", "3", "--data", "coco128.yaml",
                                 "--weights", "yolov5s.pt"])
    assert (tutorial.imgsz, tutorial.batch_size, tutorial.epochs) == (640, 16, 3)
    assert parse_train_args(["--resume", "runs/train/exp/weights/last.pt"]).resume == "runs/train/exp/weights/last.pt"
    flags = build_parser(TrainConfig).format_help()
    for flag in ("--weights", "--data", "--hyp", "--epochs", "--noautoanchor", "--image-weights", "--multi-scale",
                 "--single-cls", "--sync-bn", "--workers", "--project", "--exist-ok", "--label-smoothing",
                 "--patience", "--save-period", "--seed", "--deterministic", "--freeze-schedule", "--rect"):
        assert flag in flags


@pytest.fixture(scope="module")
def model():
    return DetectionModel("yolov5n.yaml", nc=3)


def test_freeze_specs(model):
    assert frozen_layer_indices(model, ["10"]) == set(range(10))
    assert frozen_layer_indices(model, ["backbone"]) == set(range(10))
    assert frozen_layer_indices(model, ["0", "3", "5"]) == {0, 3, 5}
    with pytest.raises(ValueError, match="--freeze expects"):
        frozen_layer_indices(model, ["neck"])


def test_freeze_backbone_freezes_exactly_backbone(model):
    apply_trainable(model, trainable_except(set(range(10))))
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1])
        assert p.requires_grad == (layer >= 10), name
    model.train()
    freeze_batchnorm_stats(model)
    assert not model.model[0].bn.training and model.model[10].bn.training
    apply_trainable(model, None)


def test_alternate_schedule():
    assert parse_freeze_schedule("alternate:3") == 3
    with pytest.raises(ValueError):
        parse_freeze_schedule("alternate:1")
    backbone = {0, 1}
    first, text = alternate_plan(0, 3, backbone)
    assert first("model.0.conv.weight") and not first("model.5.conv.weight") and "backbone" in text
    second, text = alternate_plan(1, 3, backbone)
    assert not second("model.0.conv.weight") and second("model.5.conv.weight") and "head" in text
    assert alternate_plan(3, 3, backbone)[1] == alternate_plan(0, 3, backbone)[1]


def test_parameter_groups_cover_everything_once(model):
    decayed, norms, biases = parameter_groups(model)
    assert len(decayed) + len(norms) + len(biases) == len(list(model.parameters()))
    assert all(p.dim() == 1 for p in norms) and all(p.dim() == 4 for p in decayed)
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 5e-4, 0.0]


def test_lr_schedules():
    linear, cosine = lr_lambda(100, 0.01, False), lr_lambda(100, 0.01, True)
    assert linear(0) == 1 and math.isclose(linear(100), 0.01) and math.isclose(linear(50), 0.505)
    assert cosine(0) == 1 and math.isclose(cosine(100), 0.01) and math.isclose(cosine(50), 0.505)


def test_warmup_ramps(model):
    optimizer = build_optimizer(model, "SGD", 0.01, 0.937, 5e-4)
    for group in optimizer.param_groups:
        group["initial_lr"] = 0.01
    hyp = {"warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.937}
    accumulate = warmup_step(optimizer, 0, 100, 1.0, hyp, batch_size=16)
    assert accumulate == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1) and optimizer.param_groups[1]["lr"] == 0.0
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.8)
    accumulate = warmup_step(optimizer, 100, 100, 1.0, hyp, batch_size=16)
    assert accumulate == 4  # nominal batch 64 / 16
    assert all(g["lr"] == pytest.approx(0.01) for g in optimizer.param_groups)


def test_ema_follows_formula():
    net = torch.nn.Linear(2, 1)
    ema = ModelEMA(net, decay=0.9, tau=1.0)
    start = ema.ema.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    d = 0.9 * (1 - math.exp(-1))
    assert torch.allclose(ema.ema.weight, d * start + (1 - d) * net.weight)
    assert not any(p.requires_grad for p in ema.ema.parameters())


def test_sam_perturbs_along_gradient_and_restores():
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    before = [p.clone() for p in net.parameters()]
    sam = SAM(optimizer, rho=0.05)
    sam.perturb()
    moved = torch.cat([(p - b).flatten() for p, b in zip(net.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.05, rel=1e-4)
    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def _v7_schedule(epochs: int, n_batches: int, batch_size: int, hyp: dict) -> list[tuple]:
    """(lr of the 3 groups, momentum, optimizer steps?) per iteration by YOLOv5 v7.0's train.py rules: warm-up
    over max(3 epochs, 100) iterations towards lr0 * lf(epoch), accumulation to 64 images, gradients left at an
    epoch's end dropped by the next epoch's zero_grad, and a LambdaLR reset to last_epoch = -1 and stepped after
    each epoch, so epoch e trains at lr0 * lf(e - 1) once warm-up is over."""
    lf = lr_lambda(epochs, hyp["lrf"], False)
    warmup = max(round(hyp["warmup_epochs"] * n_batches), 100)
    accumulate, last_step = max(round(64 / batch_size), 1), -1
    lrs, momentum, rows = [hyp["lr0"]] * 3, hyp["momentum"], []
    for epoch in range(epochs):
        for i in range(n_batches):
            ni = i + n_batches * epoch
            if ni <= warmup:
                accumulate = max(1, round(float(ni) / warmup * (64 / batch_size - 1) + 1))
                target = hyp["lr0"] * lf(epoch)
                lrs = [start + (target - start) * ni / warmup for start in (hyp["warmup_bias_lr"], 0.0, 0.0)]
                momentum = hyp["warmup_momentum"] + (hyp["momentum"] - hyp["warmup_momentum"]) * ni / warmup
            steps = ni - last_step >= accumulate
            last_step = ni if steps else last_step
            rows.append((*lrs, momentum, steps))
        lrs = [hyp["lr0"] * lf(epoch)] * 3
    return rows


def test_trainer_follows_v7_schedule(tmp_path):
    """Learning rates, momentum and optimizer-step decisions of every iteration equal v7.0's (forward and backward
    replaced by a constant gradient: only the schedule runs). The same comparison against v7.0's own code
    (PyPI yolov5 7.0.14) gave 0 differing iterations out of 1350 for the 30-epoch NEU-DET recipe."""
    from pathlib import Path

    from utils.runners.train import make_task
    from utils.train.callbacks import Callbacks
    from utils.train.engine import Trainer

    epochs, n_batches, batch_size = 7, 45, 32  # warm-up ends at iteration 135, inside epoch 3
    sample = Path(__file__).resolve().parents[1] / "data" / "neu-det-sample.yaml"
    cfg = TrainConfig(cfg="yolov5n.yaml", data=str(sample), epochs=epochs, imgsz=64, batch_size=batch_size,
                      workers=0, device="cpu", seed=0, project=str(tmp_path), name="s", noplots=True, noval=True,
                      noautoanchor=True)
    trainer = Trainer(make_task(cfg), cfg, Callbacks())
    trainer.setup()
    empty_batch = (torch.zeros(batch_size, 3, 64, 64, dtype=torch.uint8), torch.zeros(0, 6), (), ())
    trainer.train_loader = [empty_batch] * n_batches
    rows: list[list] = []

    def constant_gradient(batch):
        for p in trainer.model.parameters():
            p.grad = torch.full_like(p, 1e-3) if p.grad is None else p.grad + 1e-3
        groups = trainer.optimizer.param_groups
        rows.append([g["lr"] for g in groups] + [groups[0]["momentum"], False])
        return torch.zeros(3)

    optimizer_step = trainer._optimizer_step

    def recording_step(batch):
        optimizer_step(batch)
        rows[-1][-1] = True

    trainer._forward_backward, trainer._optimizer_step = constant_gradient, recording_step
    for epoch in range(epochs):
        trainer.epoch = epoch
        trainer._begin_epoch()
        trainer.train_one_epoch()
        trainer.scheduler.step()
    expected = _v7_schedule(epochs, n_batches, batch_size, trainer.hyp)
    assert len(rows) == len(expected) == epochs * n_batches
    for n, (got, want) in enumerate(zip(rows, expected)):
        assert got[:4] == pytest.approx(list(want[:4]), rel=1e-9, abs=1e-12), f"iteration {n}"
        assert got[4] == want[4], f"iteration {n}: optimizer step {got[4]}, v7.0 {want[4]}"
    assert trainer.ema.updates == sum(row[4] for row in expected)
    assert rows[-1][1] == pytest.approx(trainer.hyp["lr0"] * lr_lambda(epochs, trainer.hyp["lrf"], False)(epochs - 2))


def test_detection_training_starts_from_v7s_float16_rounded_weights(tmp_path):
    """v7.0's train.py calls ``model.half().float()`` after AutoAnchor: its seed-0 start is the seed-0 model
    rounded to float16. Ours must start from exactly those weights and buffers."""
    from pathlib import Path

    from models.yolo import DetectionModel
    from utils.runners.train import make_task
    from utils.train.callbacks import Callbacks
    from utils.train.engine import Trainer

    sample = Path(__file__).resolve().parents[1] / "data" / "neu-det-sample.yaml"
    cfg = TrainConfig(cfg="yolov5n.yaml", data=str(sample), epochs=1, imgsz=64, batch_size=8, workers=0,
                      device="cpu", seed=0, project=str(tmp_path), name="s", noplots=True, noautoanchor=True)
    trainer = Trainer(make_task(cfg), cfg, Callbacks())
    trainer.setup()
    torch.manual_seed(0)
    fresh = DetectionModel("yolov5n.yaml", nc=6).state_dict()
    started = trainer.model.state_dict()
    assert started.keys() == fresh.keys()
    rounded = [k for k, v in fresh.items() if v.is_floating_point() and not torch.equal(v, v.half().float())]
    assert rounded, "a seeded model has weights that float16 cannot hold: the check below would prove nothing"
    for key, value in fresh.items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(started[key], expected), key


def test_results_csv_keeps_every_value_under_its_header_when_columns_appear(tmp_path):
    """--noval validates only the last epoch: its metric columns join the file then, earlier rows blank."""
    import csv
    from types import SimpleNamespace

    from utils.train.callbacks import CSVLogger, plot_results_csv

    rows = [{"epoch": 0, "train/box": 0.5, "lr/pg0": 0.01},
            {"epoch": 1, "train/box": 0.4, "lr/pg0": 0.009},
            {"epoch": 2, "train/box": 0.3, "metrics/mAP50": 0.25, "val/box": 0.45, "lr/pg0": 0.008},
            {"epoch": 3, "train/box": 0.2, "lr/pg0": 0.007}]
    logger = CSVLogger()
    for row in rows:
        logger.on_fit_epoch_end(SimpleNamespace(save_dir=tmp_path, epoch_row=lambda row=row: row))
    with (tmp_path / "results.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert list(written[0]) == ["epoch", "train/box", "metrics/mAP50", "val/box", "lr/pg0"]
    assert [r["lr/pg0"] for r in written] == ["0.01", "0.009", "0.008", "0.007"]
    assert [r["metrics/mAP50"] for r in written] == ["", "", "0.25", ""]
    assert plot_results_csv(tmp_path / "results.csv").exists()  # blank cells are skipped, not plotted as 0


def test_bare_names_resolve_in_the_repository_from_any_folder(tmp_path, monkeypatch):
    from models.yaml_config import find_model_yaml
    from utils.data import load_data_config
    from utils.train.config import ROOT

    monkeypatch.chdir(tmp_path)  # v7.0: `--data coco128.yaml --hyp hyp.scratch-low.yaml` work from anywhere
    assert load_hyp("hyp.scratch-low.yaml") == load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml")
    assert load_data_config("neu-det-sample.yaml")["yaml_file"] == str(ROOT / "data" / "neu-det-sample.yaml")
    assert find_model_yaml("models/yolov5n.yaml") == ROOT / "models" / "yolov5n.yaml"
    (tmp_path / "hyp.scratch-low.yaml").write_text("lr0: 0.5\n")  # a file where the user points wins
    assert load_hyp("hyp.scratch-low.yaml")["lr0"] == 0.5
    with pytest.raises(FileNotFoundError, match=r"data YAML 'mine/neu\.yaml' not found"):
        load_data_config("mine/neu.yaml")  # a path with a folder is never swapped for a file of the same name
