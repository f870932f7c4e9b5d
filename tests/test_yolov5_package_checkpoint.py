"""Checkpoints saved by the PyPI ``yolov5`` package (``yolov5.models.yolo.DetectionModel`` ...) load wherever a
v7.0 checkpoint does: same outputs as the package computed, and train.py / val.py / detect.py / export.py run on
them (../shared/fixtures/README.md, ``yolov5pip-neu-det-e3.pt``, made by ``yolov5==7.0.14``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from utils.common.boxes import non_max_suppression
from utils.weights.checkpoint import load_checkpoint

NEU_DET_NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
V7_VAL_MAP50 = 0.0037  # v7.0 val.py at 256 on the NEU-DET val split (fixtures README), given to 2 digits


@pytest.fixture(scope="module")
def pip_weights(fixtures_dir):
    return fixtures_dir / "yolov5pip-neu-det-e3.pt"


@pytest.fixture(scope="module")
def expected(fixtures_dir):
    return torch.load(fixtures_dir / "yolov5pip-neu-det-e3.expected.pt")


def test_the_fixture_names_the_package_paths(pip_weights):
    """Guards the premise: the file pickles the package's module paths, not v7.0's (else this file tests nothing)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(pip_weights)
    assert "yolov5.models.yolo.DetectionModel" in found and "yolov5.models.common.C3" in found
    assert not [name for name in found if name.startswith("models.")]


def test_outputs_equal_the_package_outputs(pip_weights, expected, reference_threads):
    loaded = load_checkpoint(pip_weights)
    with torch.no_grad():
        pred, raw = loaded.model(expected["images"].float() / 255)
    assert pred.shape == expected["pred"].shape == (4, 4032, 11)
    assert float((pred - expected["pred"]).abs().max()) <= 1e-5  # measured: 0.0
    for ours, ref in zip(raw, expected["raw"], strict=True):
        assert float((ours - ref).abs().max()) <= 1e-5  # measured: 0.0
    detections = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45, max_det=300)
    assert [d.shape for d in detections] == [r.shape for r in expected["nms_conf0.25_iou0.45"]]


def test_metadata_says_where_the_file_came_from(pip_weights):
    loaded = load_checkpoint(pip_weights)
    assert loaded.format == "yolov5-v7-pickle"
    assert loaded.meta["source"] == "yolov5 package 7.0.14 pickle"
    assert loaded.meta["names"] == NEU_DET_NAMES and loaded.meta["stride"] == [8.0, 16.0, 32.0]


def test_train_weights_start_from_every_tensor(pip_weights, sample_data_yaml, tmp_path):
    """train.py --weights: the detector built for training holds the checkpoint's weights, all of them."""
    from utils.runners.train import make_task
    from utils.train.config import TrainConfig

    cfg = TrainConfig(weights=str(pip_weights), data=str(sample_data_yaml), epochs=1, imgsz=64, batch_size=8,
                      workers=0, device="cpu", project=str(tmp_path), name="t", noplots=True, noautoanchor=True)
    model = make_task(cfg).build_model(cfg.model_source())
    source = load_checkpoint(pip_weights).model.state_dict()
    built = model.state_dict()
    assert built.keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(built[key].float(), value.float()), key


def test_val_cli_scores_like_v7(pip_weights, neu_det_yaml, root, tmp_path):
    result = subprocess.run([sys.executable, str(root / "val.py"), "--weights", str(pip_weights), "--data",
                             str(neu_det_yaml), "--img", "256", "--noplots", "--project", str(tmp_path), "--name",
                             "pip"], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["all"])
    images, instances, _, _, map50, _ = row[1:]
    assert (int(images), int(instances)) == (360, 828)
    assert round(float(map50), 4) == V7_VAL_MAP50


def test_detect_cli_boxes_equal_nms_of_the_package_outputs(pip_weights, expected, neu_det_yaml, tmp_path):
    """detect.py's label files hold NMS of the package's own predictions (conf 0.003: the model is barely
    trained), mapped from the 256 letterbox back to the 200 x 200 originals."""
    from detect import main as detect_main

    files = [neu_det_yaml.parent / "images" / "val" / name for name in ("crazing_100.jpg", "crazing_102.jpg",
                                                                        "crazing_104.jpg", "crazing_111.jpg")]
    sources = tmp_path / "sources.txt"
    sources.write_text("\n".join(map(str, files)))
    code = detect_main(["--weights", str(pip_weights), "--source", str(sources), "--imgsz", "256", "--conf-thres",
                        "0.003", "--save-txt", "--save-conf", "--device", "cpu", "--project", str(tmp_path),
                        "--name", "det", "--exist-ok"])
    assert code == 0
    reference = non_max_suppression(expected["pred"], conf_thres=0.003, iou_thres=0.45, max_det=1000)
    for file, ref in zip(files, reference, strict=True):
        assert (tmp_path / "det" / file.name).is_file()
        rows = torch.tensor([[float(v) for v in line.split()]
                             for line in (tmp_path / "det" / "labels" / f"{file.stem}.txt").read_text().splitlines()])
        assert len(rows) == len(ref) > 20
        xyxy = (ref[:, :4] * 200 / 256).clamp(0, 200) / 200
        xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
        ours = rows[rows[:, 5].argsort(descending=True)]
        theirs = torch.cat((ref[:, 5:6], xywh, ref[:, 4:5]), 1)
        assert torch.allclose(ours, theirs, atol=2e-3)


def test_export_onnx_runs_like_pytorch(pip_weights, tmp_path, capsys):
    from export import main as export_main

    assert export_main(["--weights", str(pip_weights), "--include", "onnx", "--imgsz", "256", "--output-dir",
                        str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "max |output - PyTorch|" in x)
    assert float(line.split("=")[1].split()[0]) < 1e-3
    assert (tmp_path / "yolov5pip-neu-det-e3.onnx").is_file()


def test_prune_slim_cuts_a_package_checkpoint(pip_weights, sample_data_yaml, tmp_path):
    """The pruning tools read checkpoints through the same loader: a package .pt prunes to a plain YAML + .pt."""
    import prune_slim
    from utils.common.cli import run_cli

    path = tmp_path / "pruned.yaml"
    assert run_cli(prune_slim.main, ["--weights", str(pip_weights), "--data", str(sample_data_yaml), "--imgsz",
                                     "128", "--global-percent", "0.3", "--path", str(path), "--noval"]) == 0
    pruned = load_checkpoint(path.with_suffix(".pt")).model
    original = load_checkpoint(pip_weights).model
    assert 0 < sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())
    assert pruned.names == original.names
