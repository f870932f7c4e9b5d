"""--batch-size -1 (AutoBatch): the batch chosen from probed memory, the CPU fallback, refused values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from models.yolo import DetectionModel
from utils.train.autobatch import DEFAULT_BATCH, _sum_outputs, batch_for_memory, resolve_batch_size
from utils.train.config import TrainConfig


def test_batch_where_the_fitted_line_meets_the_budget():
    # 1 GB of weights and workspace plus 0.25 GB per image: a 9 GB budget holds 32 images
    measured = [(b, 1e9 + 0.25e9 * b) for b in (1, 2, 4, 8, 16)]
    assert batch_for_memory(measured, 9e9) == 32
    noisy = [(b, m * (1.01 if i % 2 else 0.99)) for i, (b, m) in enumerate(measured)]
    assert 30 <= batch_for_memory(noisy, 9e9) <= 34
    assert batch_for_memory(measured, 0.5e9) == 1  # not even one image fits the budget: never below 1
    assert batch_for_memory(measured[:1], 9e9) == 1  # only batch 1 fitted in memory at all
    assert batch_for_memory([(1, 2e9), (2, 1e9)], 9e9) == DEFAULT_BATCH  # no sensible line


def test_cpu_falls_back_to_v7_default_and_bad_sizes_are_refused(monkeypatch):
    cfg = TrainConfig(cfg="yolov5n.yaml", batch_size=-1, device="cpu")

    def must_not_build():
        raise AssertionError("the CPU fallback needs no model")

    assert resolve_batch_size(cfg, must_not_build).batch_size == DEFAULT_BATCH
    assert resolve_batch_size(dataclasses.replace(cfg, batch_size=8), must_not_build).batch_size == 8
    with pytest.raises(ValueError, match="--batch-size 0: give a positive batch size, or -1 for AutoBatch"):
        resolve_batch_size(dataclasses.replace(cfg, batch_size=0), must_not_build)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="with DDP give the total batch size"):
        resolve_batch_size(cfg, must_not_build)


def test_probe_scalar_reaches_every_detection_map():
    model = DetectionModel("yolov5n.yaml", nc=2).train()
    _sum_outputs(model(torch.rand(1, 3, 64, 64))).backward()
    head = model.model[-1]
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in head.m)
    assert _sum_outputs({"a": torch.ones(2, 3), "b": [torch.zeros(1), torch.ones(4)]}).item() == pytest.approx(2.0)


def test_training_with_autobatch_on_cpu_records_the_batch_it_used(tmp_path):
    from utils.runners.train import run_train

    sample = Path(__file__).resolve().parents[1] / "data" / "neu-det-sample.yaml"
    cfg = TrainConfig(cfg="yolov5n.yaml", data=str(sample), imgsz=64, batch_size=-1, epochs=1, workers=0,
                      device="cpu", project=str(tmp_path), name="auto", noautoanchor=True, noval=True, noplots=True,
                      max_batches=1)
    run_train(cfg)
    assert yaml.safe_load((tmp_path / "auto" / "opt.yaml").read_text())["batch_size"] == DEFAULT_BATCH
