"""train.py --evolve: every generation is scored by its task's own fitness (detectors and classifiers alike)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from conftest import make_two_head_set

from utils.runners.train import run_train
from utils.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def evolve_rows(cfg: TrainConfig) -> list[dict[str, float]]:
    run_train(cfg)
    with (Path(cfg.project) / f"{cfg.name}_evolve" / "evolve.csv").open(encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.mark.parametrize("kind", ["detect", "classify"])
def test_evolve_scores_each_generation_with_the_task_fitness(kind, tmp_path):
    if kind == "detect":
        model, data, imgsz = "yolov5n.yaml", str(ROOT / "data" / "neu-det-sample.yaml"), 64
        headline = ["P", "R", "mAP50", "mAP50-95"]
    else:
        model, data, imgsz = "yolov5n-mcls-s.yaml", str(make_two_head_set(tmp_path / "set")), 32
        headline = ["mean/top1", "color/top1", "type/top1"]
    cfg = TrainConfig(cfg=model, data=data, evolve=2, epochs=1, max_batches=1, imgsz=imgsz, batch_size=4, workers=0,
                      device="cpu", fp32=True, noautoanchor=True, project=str(tmp_path / "runs"), name="evo")
    rows = evolve_rows(cfg)
    assert len(rows) == 2 and list(rows[0])[: len(headline) + 1] == [*headline, "fitness"]
    for row in rows:  # the fitness that picks best.pt, recomputed here from the row's own metrics
        expected = 0.1 * row["mAP50"] + 0.9 * row["mAP50-95"] if kind == "detect" else row["mean/top1"]
        assert row["fitness"] == pytest.approx(expected, abs=1e-5)
    assert any(rows[0][k] != rows[1][k] for k in ("lr0", "momentum", "hsv_s", "scale"))  # generation 2 mutated
    best = yaml.safe_load((tmp_path / "runs" / "evo_evolve" / "hyp_evolve.yaml").read_text())
    assert best["lr0"] == pytest.approx(max(rows, key=lambda r: r["fitness"])["lr0"], rel=1e-5)
