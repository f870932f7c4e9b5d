"""val.py reproduces YOLOv5 v7.0's validation of the reference checkpoint on NEU-DET exactly
(../shared/fixtures/README.md): same letterboxing, rect batches, NMS, matching and AP."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pytest

from utils.runners.val import ValOptions, run_val

REFERENCE = {"P": 0.470102, "R": 0.583027, "mAP50": 0.561134, "mAP50-95": 0.247021}
PER_CLASS_MAP = [0.061419, 0.243277, 0.478773, 0.340831, 0.164762, 0.193062]


@pytest.fixture(scope="module")
def reference_metrics(fixtures_dir, neu_det_yaml, tmp_path_factory):
    return run_val(ValOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(neu_det_yaml), imgsz=256, batch_size=32,
                              workers=2, device="cpu", project=str(tmp_path_factory.mktemp("val")), name="ref",
                              noplots=True, save_json=True))


def test_counts(reference_metrics):
    assert reference_metrics["n_images"] == 360
    assert reference_metrics["n_labels"] == 828  # one duplicate box in patches_198 is dropped


def test_map_matches_v7(reference_metrics):
    assert reference_metrics["mAP50"] == pytest.approx(REFERENCE["mAP50"], abs=5e-4)
    assert reference_metrics["mAP50-95"] == pytest.approx(REFERENCE["mAP50-95"], abs=5e-4)
    assert reference_metrics["P"] == pytest.approx(REFERENCE["P"], abs=2e-3)
    assert reference_metrics["R"] == pytest.approx(REFERENCE["R"], abs=2e-3)


def test_per_class_map_matches_v7(reference_metrics):
    ours = [reference_metrics["per_class"][k]["AP50-95"] for k in range(6)]
    assert ours == pytest.approx(PER_CLASS_MAP, abs=1e-3)


def test_pycocotools_cross_check(reference_metrics, neu_det_yaml):
    from utils.data import create_dataloader, load_data_config
    from utils.evaluation.coco_eval import cocoeval_cross_check

    data = load_data_config(neu_det_yaml)
    _, dataset = create_dataloader(data["val"], 256, 32, 32, augment=False, pad=0.5, rect=True)
    coco = cocoeval_cross_check(dataset, reference_metrics["predictions_json"], 6)
    # Independent scorer, same predictions: COCO matches per area range with maxDets 100 and stops its curve at
    # the highest recall reached, v7.0 extends it to recall 1, so the two agree closely but not exactly.
    assert abs(reference_metrics["mAP50-95"] - coco["mAP50-95"]) < 0.01
    assert abs(reference_metrics["mAP50"] - coco["mAP50"]) < 0.02


def test_onnx_export_validates_like_pytorch(reference_metrics, fixtures_dir, neu_det_yaml, tmp_path):
    """A v7.0 user's `export.py --include onnx --dynamic` (batch, height and width free, as in v7.0), then val.py
    on the ONNX file: v7.0's 288x288 rect batches reach the graph, so the PyTorch numbers come back (only float
    summation order differs)."""
    import export

    assert export.main(["--weights", str(fixtures_dir / "yolov5n-neu-det-v7.pt"), "--include", "onnx", "--imgsz",
                        "256", "--dynamic", "--no-compare", "--output-dir", str(tmp_path)]) == 0
    metrics = run_val(ValOptions(str(tmp_path / "yolov5n-neu-det-v7.onnx"), str(neu_det_yaml), imgsz=256, batch_size=32,
                                 workers=2, device="cpu", project=str(tmp_path), name="onnx", noplots=True))
    assert metrics["n_images"] == 360 and metrics["n_labels"] == 828
    for key in ("mAP50", "mAP50-95"):
        assert metrics[key] == pytest.approx(reference_metrics[key], abs=1e-3), key
    print(f"ONNX --dynamic: mAP50 {metrics['mAP50']:.6f}, mAP50-95 {metrics['mAP50-95']:.6f}; PyTorch "
          f"{reference_metrics['mAP50']:.6f}, {reference_metrics['mAP50-95']:.6f}")


def test_val_command_line_exits_cleanly_with_its_outputs_written(fixtures_dir, sample_data_yaml, root, tmp_path):
    """`python val.py` skips the interpreter's teardown (utils.common.cli): exit status 0, the table printed, the
    predictions JSON and the plots complete on disk."""
    weights = fixtures_dir / "yolov5n-neu-det-v7.pt"
    result = subprocess.run([sys.executable, str(root / "val.py"), "--weights", str(weights), "--data",
                             str(sample_data_yaml), "--img", "256", "--workers", "0", "--save-json", "--project",
                             str(tmp_path), "--name", "cli"], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "all" in result.stdout and "results saved to" in result.stdout.splitlines()[-1]
    table = [line.split()[0] for line in result.stdout.splitlines() if len(line.split()) >= 6]
    for name in ("crazing", "inclusion", "scratches"):  # per class without --verbose below 50 classes, as v7.0
        assert name in table, result.stdout
    out = tmp_path / "cli"
    assert json.loads((out / "predictions.json").read_text())  # complete JSON
    for plot in ("confusion_matrix.png", "PR_curve.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert cv2.imread(str(out / plot)) is not None, plot  # a complete, decodable PNG


def test_task_picks_the_split_and_a_missing_one_says_so(fixtures_dir, sample_data_yaml, tmp_path):
    """--task train scores the training images (v7.0); scoring the val split under the name 'test' would report
    numbers for the wrong images, so a missing split is an error."""
    weights = str(fixtures_dir / "yolov5n-neu-det-v7.pt")
    metrics = run_val(ValOptions(weights, str(sample_data_yaml), imgsz=128, task="train", workers=0, device="cpu",
                                 project=str(tmp_path), noplots=True))
    assert metrics["n_images"] == 36  # the sample's training images, not its 12 val images
    with pytest.raises(ValueError, match=r"--task test: .*neu-det-sample\.yaml has no 'test' split"):
        run_val(ValOptions(weights, str(sample_data_yaml), task="test", device="cpu", project=str(tmp_path)))
