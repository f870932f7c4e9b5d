"""The pruning workflow end to end on the embedded sample (issue 23): sparse training, prune_slim.py,
prune_eagleeye.py, a distilled fine-tune of the pruned model, val.py and an ONNX export; and the tools' errors."""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import pytest
import torch
import yaml

import export
import prune_eagleeye
import prune_slim
import train
import val
from benchmarks import prune_tp
from utils.common.cli import run_cli
from utils.compress.prune.analysis import analyse_channels
from utils.compress.prune.cost import CostModel
from utils.weights.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "data" / "neu-det-sample.yaml")
IMG = "128"


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> Path:
    """yolov5n trained 2 epochs with --sparse on the sample (what prune_slim.py expects)."""
    project = tmp_path_factory.mktemp("prune-e2e")
    code = run_cli(train.main, ["--cfg", "yolov5n.yaml", "--data", SAMPLE, "--imgsz", IMG, "--epochs", "2",
                                "--batch-size", "8", "--workers", "0", "--sparse", "1e-3", "--noplots",
                                "--project", str(project), "--name", "sparse", "--noautoanchor"])
    assert code == 0
    return project / "sparse" / "weights" / "best.pt"


def test_slim_prunes_to_the_budget_and_fine_tunes_with_a_teacher(sparse_run, tmp_path, caplog, capsys):
    path = tmp_path / "slim.yaml"
    with caplog.at_level(logging.INFO):
        code = run_cli(prune_slim.main, ["--weights", str(sparse_run), "--data", SAMPLE, "--imgsz", IMG,
                                         "--remain-ratio", "0.6", "--path", str(path), "--workers", "0"])
    assert code == 0
    out = caplog.text
    assert "layer  module" in out and "parameters" in out and "pruned model before fine-tuning: mAP@.5" in out

    pruned = load_checkpoint(path.with_suffix(".pt")).model
    original = load_checkpoint(sparse_run).model
    assert yaml.safe_load(path.read_text())["pruned"]["widths"] == pruned.yaml["pruned"]["widths"]
    analysis = analyse_channels(original)
    cost = CostModel(original, analysis.groups, int(IMG))
    kept = _measured_ratio(original, pruned, int(IMG))
    assert kept <= 0.6 and kept > 0.3
    for module in pruned.modules():  # every cut width is a multiple of 8 (the default --round 8)
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.num_features % 8 == 0
    assert cost.full > 0

    # the same cut with --calib-batches 0 keeps the trained BatchNorm statistics: identical weights, and the
    # default run's re-estimated statistics differ from them
    plain_path = tmp_path / "plain.yaml"
    assert run_cli(prune_slim.main, ["--weights", str(sparse_run), "--data", SAMPLE, "--imgsz", IMG, "--remain-ratio",
                                     "0.6", "--path", str(plain_path), "--workers", "0", "--noval",
                                     "--calib-batches", "0"]) == 0
    plain = load_checkpoint(plain_path.with_suffix(".pt")).model.state_dict()
    calibrated = pruned.state_dict()
    assert all(torch.equal(plain[k], v) for k, v in calibrated.items() if not k.endswith(("running_mean", "running_var",
                                                                                          "num_batches_tracked")))
    stats = [k for k in calibrated if k.endswith("running_mean")]
    assert all(not torch.equal(plain[k], calibrated[k]) for k in stats)

    # fine-tune: --cfg pruned.yaml --weights pruned.pt, distilled from the unpruned model
    project = tmp_path / "runs"
    code = run_cli(train.main, ["--cfg", str(path), "--weights", str(path.with_suffix(".pt")), "--data", SAMPLE,
                                "--imgsz", IMG, "--epochs", "1", "--batch-size", "8", "--workers", "0",
                                "--teacher", str(sparse_run), "--noplots", "--project", str(project),
                                "--name", "ft", "--noautoanchor"])
    assert code == 0
    best = project / "ft" / "weights" / "best.pt"
    rows = list(csv.DictReader((project / "ft" / "results.csv").open()))
    assert float(rows[-1]["train/distill"]) > 0
    fine_tuned = load_checkpoint(best).model
    assert [p.shape for p in fine_tuned.parameters()] == [p.shape for p in pruned.parameters()]

    assert run_cli(val.main, ["--weights", str(best), "--data", SAMPLE, "--img", IMG, "--workers", "0",
                              "--project", str(tmp_path / "val"), "--noplots"]) == 0
    printed = {}
    for label, weights in (("pruned", best), ("unpruned", sparse_run)):
        capsys.readouterr()
        assert run_cli(export.main, ["--weights", str(weights), "--include", "onnx", "--imgsz", IMG,
                                     "--output-dir", str(tmp_path / label), "--no-compare"]) == 0
        printed[label] = capsys.readouterr().out
    onnx_file, unpruned = tmp_path / "pruned" / "best.onnx", tmp_path / "unpruned" / "best.onnx"
    assert onnx_file.stat().st_size < 0.75 * unpruned.stat().st_size
    # export.py prints the parameter count and the artifact's size
    assert f"{sum(p.numel() for p in fine_tuned.parameters()):,} parameters" in printed["pruned"]
    assert f"({onnx_file.stat().st_size / 1e6:.2f} MB)" in printed["pruned"]


def _measured_ratio(original: torch.nn.Module, pruned: torch.nn.Module, imgsz: int) -> float:
    from tests.test_prune import measured_macs

    return measured_macs(pruned, imgsz) / measured_macs(original, imgsz)


def test_eagleeye_writes_every_candidate_and_keeps_the_best(sparse_run, tmp_path):
    path = tmp_path / "ee.yaml"
    code = run_cli(prune_eagleeye.main, ["--weights", str(sparse_run), "--data", SAMPLE, "--imgsz", IMG,
                                         "--remain-ratio", "0.5", "--delta", "0.05", "--max-iter", "3",
                                         "--calib-batches", "1", "--batch-size", "8", "--score-images", "12",
                                         "--path", str(path), "--workers", "0", "--noval"])
    assert code == 0
    rows = list(csv.DictReader(path.with_name("ee_candidates.csv").open()))
    assert len(rows) == 3
    assert all(abs(float(r["flops_ratio"]) - 0.5) <= 0.05 for r in rows)
    assert path.with_name("ee_candidates.png").stat().st_size > 5000
    best = max(rows, key=lambda r: float(r["score"]))
    meta = load_checkpoint(path.with_suffix(".pt")).meta
    assert meta["pruned"]["best_candidate"] == int(best["candidate"])
    original = load_checkpoint(sparse_run).model
    pruned = load_checkpoint(path.with_suffix(".pt")).model
    assert abs(_measured_ratio(original, pruned, int(IMG)) - float(best["flops_ratio"])) < 1e-5  # CSV keeps 5 decimals


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            sha.update(file.name.encode())
            sha.update(file.read_bytes())
    return sha.hexdigest()


@pytest.mark.parametrize("tool,args,message", [
    (prune_eagleeye, ["--remain-ratio", "1.5"], "--remain-ratio 1.5: expected a share"),
    (prune_eagleeye, ["--remain-ratio", "0.5", "--delta", "0"], "--delta 0.0"),
    (prune_eagleeye, ["--remain-ratio", "0.05", "--delta", "0.01", "--min-keep", "0.9"], "cannot be met"),
    (prune_eagleeye, ["--remain-ratio", "0.5", "--latency-tries", "0"], "--latency-tries 0: expected 1"),
    (prune_slim, ["--global-percent", "0"], "--global-percent 0.0: expected a share"),
    (prune_slim, ["--remain-ratio", "0.05", "--min-keep", "0.9"], "--remain-ratio 0.05"),
    (prune_slim, ["--global-percent", "0.3", "--round", "0"], "--round 0"),
    (prune_slim, ["--global-percent", "0.3", "--calib-batches", "-1"], "--calib-batches -1"),
    (prune_slim, ["--global-percent", "0.3", "--latency-tries", "0"], "--latency-tries 0: expected 1"),
    (prune_tp, ["--remain-ratio", "1.5"], "--remain-ratio 1.5: expected a share"),
    (prune_tp, ["--remain-ratio", "0.5", "--steps", "0"], "--steps 0"),
    (prune_tp, ["--latency-ms", "0"], "--latency-ms 0.0: expected a positive number"),
    (prune_tp, ["--remain-ratio", "0.5", "--delta", "1"], "--delta 1.0"),
    (prune_tp, ["--remain-ratio", "0.02", "--min-keep", "0.9", "--steps", "1"], "--remain-ratio 0.02: at the largest"),
    (prune_tp, [], "one of the arguments --remain-ratio --latency-ms --speedup is required"),
    (prune_tp, ["--speedup", "1"], "--speedup 1.0: expected a speed-up above 1"),
])
def test_bad_flags_end_in_one_line(sparse_run, tmp_path, capsys, tool, args, message):
    data_before = _digest(ROOT / "data" / "neu-det-sample")
    code = run_cli(tool.main, ["--weights", str(sparse_run), "--data", SAMPLE, "--imgsz", IMG,
                               "--path", str(tmp_path / "p.yaml"), "--workers", "0", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "p.pt").exists()
    assert _digest(ROOT / "data" / "neu-det-sample") == data_before


def test_existing_result_is_never_replaced(sparse_run, tmp_path, capsys):
    target = tmp_path / "p.yaml"
    target.write_text("# mine\n")
    code = run_cli(prune_slim.main, ["--weights", str(sparse_run), "--data", SAMPLE, "--global-percent", "0.3",
                                     "--path", str(target)])
    assert code == 2 and "already exists; pass --exist-ok" in capsys.readouterr().err
    assert target.read_text() == "# mine\n"
    # --exist-ok sets it aside (into previous/ beside it), whole, and writes the new pair
    code = run_cli(prune_slim.main, ["--weights", str(sparse_run), "--data", SAMPLE, "--imgsz", IMG, "--global-percent",
                                     "0.3", "--path", str(target), "--workers", "0", "--noval", "--calib-batches", "0",
                                     "--exist-ok"])
    assert code == 0
    assert (tmp_path / "previous" / "p.yaml").read_text() == "# mine\n"
    assert "pruned:" in target.read_text() and target.with_suffix(".pt").is_file()


def test_slimming_a_model_not_trained_sparse_warns(tmp_path, caplog):
    """The v7.0 fixture was trained without --sparse: slimming it works but says it is weak."""
    from conftest import shared_path

    fixture = shared_path("fixtures", "yolov5n-neu-det-v7.pt")
    code = run_cli(prune_slim.main, ["--weights", str(fixture), "--data", SAMPLE, "--imgsz", IMG,
                                     "--global-percent", "0.3", "--path", str(tmp_path / "p.yaml"), "--noval"])
    assert code == 0
    assert "looks trained without --sparse" in caplog.text


def test_teacher_with_other_classes_is_refused(sparse_run, tmp_path, capsys):
    other = tmp_path / "other.pt"
    from models.yolo import DetectionModel
    from utils.weights.checkpoint import save_checkpoint

    save_checkpoint(DetectionModel("yolov5n.yaml", nc=3), other)
    code = run_cli(train.main, ["--cfg", "yolov5n.yaml", "--data", SAMPLE, "--imgsz", IMG, "--epochs", "1",
                                "--teacher", str(other), "--project", str(tmp_path), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "3" in err and "6" in err
