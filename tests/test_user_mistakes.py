"""Mistakes in a user's data, model YAML or checkpoint that used to crash or pass silently (issue 25).

Label rows with class ids beyond ``nc`` are dropped in the training and validation loaders, a byte-order mark
does not cost the first box of a file, a checkpoint trained on other classes is refused by val.py (which prints
the data set's class names), detect.py classifies with a classifier checkpoint, all scripts round image sizes
to the stride alike, and model YAMLs with non-positive multiples or repeats are refused by file and layer.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from utils.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample"
SAMPLE_YAML = ROOT / "data" / "neu-det-sample.yaml"
NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def _copy_sample(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data, ignore=shutil.ignore_patterns("*.cache", "*.npy"))
    (tmp_path / "data.yaml").write_text(f"path: {data}\ntrain: images/train\nval: images/val\nnames: {NAMES}\n")
    return tmp_path / "data.yaml"


@pytest.fixture(scope="module")
def detector_checkpoint(tmp_path_factory) -> Path:
    """An untrained yolov5n for the 6 sample classes, saved under other class names (c0..c5)."""
    from models.yolo import DetectionModel
    from utils.weights.checkpoint import save_checkpoint

    model = DetectionModel("yolov5n.yaml", nc=6)
    model.names = [f"c{i}" for i in range(6)]
    return save_checkpoint(model, tmp_path_factory.mktemp("det") / "det6.pt")


# ------------------------------------------------------------------------------------ labels
def test_class_ids_beyond_nc_are_dropped_in_training_and_validation(tmp_path):
    """One row of class 9 (nc is 6) in every label file: training and val.py run and score the other rows."""
    from utils.data import list_image_files, scan_dataset
    from utils.runners.train import run_train
    from utils.runners.val import ValOptions, run_val

    data_yaml = _copy_sample(tmp_path)
    labels = sorted((data_yaml.parent / "data" / "labels").rglob("*.txt"))
    kept = scan_dataset(list_image_files(SAMPLE / "images" / "val"), nc=6, use_cache=False).report.instances
    for path in labels:
        path.write_text(path.read_text() + "9 0.5 0.5 0.2 0.2\n")
    cfg = TrainConfig(cfg="yolov5n.yaml", data=str(data_yaml), imgsz=64, batch_size=8, epochs=1, workers=0,
                      device="cpu", project=str(tmp_path / "runs"), name="ge_nc", noautoanchor=True, noplots=True,
                      max_batches=2)
    run_train(cfg)
    weights = tmp_path / "runs" / "ge_nc" / "weights" / "best.pt"
    metrics = run_val(ValOptions(str(weights), str(data_yaml), imgsz=64, batch_size=8, workers=0, device="cpu",
                                 project=str(tmp_path / "runs"), name="val", noplots=True))
    assert metrics["n_labels"] == kept  # the 12 rows of class 9 were dropped, every other row scored


def test_train_loader_reports_the_dropped_rows(tmp_path):
    from utils.data import create_dataloader

    data_yaml = _copy_sample(tmp_path)
    train_labels = sorted((data_yaml.parent / "data" / "labels" / "train").glob("*.txt"))
    for path in train_labels:
        path.write_text(path.read_text() + "6 0.5 0.5 0.2 0.2\n")
    _, dataset = create_dataloader(str(data_yaml.parent / "data" / "images" / "train"), 64, 4, 32, nc=6,
                                   cache_dir=tmp_path / "cache")
    assert dataset.report.rows_dropped["class_ge_nc"] == len(train_labels) == 36
    assert max(int(lb[:, 0].max()) for lb in dataset.labels if len(lb)) < 6


def test_byte_order_mark_keeps_the_first_box(tmp_path):
    from utils.data.scan import read_label_file

    label = tmp_path / "bom.txt"
    label.write_bytes("\ufeff0 0.5 0.5 0.2 0.2\n3 0.25 0.25 0.1 0.1\n".encode())
    check = read_label_file(str(label))
    assert check.labels[:, 0].tolist() == [0, 3]
    assert sum(check.dropped.values()) == 0 and not check.issues


# ------------------------------------------------------------------------------------ val.py / detect.py
def test_val_refuses_a_checkpoint_trained_on_other_classes(tmp_path):
    from models.yolo import DetectionModel
    from utils.runners.val import ValOptions, run_val
    from utils.weights.checkpoint import CheckpointError, save_checkpoint

    weights = save_checkpoint(DetectionModel("yolov5n.yaml", nc=3), tmp_path / "det3.pt")
    with pytest.raises(CheckpointError, match=r"det3\.pt predicts 3 classes but .*neu-det-sample\.yaml has 6"):
        run_val(ValOptions(str(weights), str(SAMPLE_YAML), imgsz=64, workers=0, device="cpu",
                           project=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()
    # --single-cls scores boxes whatever their class: any detector fits
    metrics = run_val(ValOptions(str(weights), str(SAMPLE_YAML), imgsz=64, workers=0, device="cpu", single_cls=True,
                                 project=str(tmp_path / "runs"), noplots=True))
    assert metrics["n_labels"] > 0


def test_val_prints_the_data_sets_class_names(detector_checkpoint, tmp_path, capsys):
    from utils.runners.val import ValOptions, run_val

    run_val(ValOptions(str(detector_checkpoint), str(SAMPLE_YAML), imgsz=64, workers=0, device="cpu", noplots=True,
                       project=str(tmp_path / "runs")))
    table = capsys.readouterr().out
    assert all(name in table for name in NAMES)
    assert "c0" not in table.split()


def test_val_and_detect_round_the_image_size_like_train(detector_checkpoint, tmp_path, caplog):
    """--imgsz 33 runs at 64 (the next multiple of stride 32) and says so: the same numbers as --imgsz 64."""
    from utils.runners.detect import DetectOptions, run_detect
    from utils.runners.val import ValOptions, run_val

    common = dict(workers=0, device="cpu", noplots=True, project=str(tmp_path / "runs"))
    with caplog.at_level(logging.WARNING, logger="utils.common.flags"):
        odd = run_val(ValOptions(str(detector_checkpoint), str(SAMPLE_YAML), imgsz=33, **common))
    assert "--imgsz 33 must be a multiple of the model's largest stride 32: using 64" in caplog.text
    even = run_val(ValOptions(str(detector_checkpoint), str(SAMPLE_YAML), imgsz=64, **common))
    assert (odd["P"], odd["R"], odd["mAP50-95"]) == (even["P"], even["R"], even["mAP50-95"])
    source = str(SAMPLE / "images" / "val" / "crazing_100.jpg")
    options = dict(conf_thres=0.001, device="cpu", nosave=True, project=str(tmp_path / "runs"))
    odd_det = run_detect(DetectOptions(str(detector_checkpoint), source, imgsz=33, **options))[0]["detections"]
    even_det = run_detect(DetectOptions(str(detector_checkpoint), source, imgsz=64, **options))[0]["detections"]
    assert len(even_det) > 0 and torch.equal(odd_det, even_det)


def test_train_rounds_the_image_size_with_a_log_line(caplog):
    from utils.common.flags import check_img_size

    with caplog.at_level(logging.WARNING, logger="utils.common.flags"):
        assert check_img_size(640, 32) == 640 and not caplog.text
        assert check_img_size(33, 32, floor=64) == 64 and check_img_size(100, 64) == 128
        assert check_img_size(16, 32, floor=64) == 64
    assert caplog.text.count("must be a multiple") == 3


def test_export_rounds_the_image_size(detector_checkpoint, tmp_path):
    from utils.export import ExportOptions, export_model, read_metadata

    options = ExportOptions(weights=detector_checkpoint, include=("torchscript",), imgsz=(33, 100),
                            output_dir=tmp_path)
    artifacts = export_model(options)
    assert options.imgsz == (64, 128)
    assert read_metadata(artifacts["torchscript"])["imgsz"] == [64, 128]


def test_detect_classifies_with_a_classifier_checkpoint(tmp_path, caplog):
    """A classifier checkpoint in detect.py: a line per image, annotated copies, label files and the CSV."""
    from models.yolo import ClassificationModel
    from utils.runners.detect import DetectOptions, run_detect
    from utils.weights.checkpoint import save_checkpoint

    model = ClassificationModel("yolov5n-cls.yaml", heads=[{"name": "class", "names": NAMES}])
    weights = save_checkpoint(model, tmp_path / "cls.pt")
    images = sorted((SAMPLE / "images" / "val").glob("*.jpg"))
    with caplog.at_level(logging.INFO, logger="utils.runners.detect"):
        rows = run_detect(DetectOptions(str(weights), str(SAMPLE / "images" / "val"), imgsz=64, device="cpu",
                                        save_txt=True, save_csv=True, project=str(tmp_path / "runs"), name="cls"))
    out = tmp_path / "runs" / "cls"
    assert len(rows) == len(images) == 12
    assert sorted(p.name for p in out.glob("*.jpg")) == [p.name for p in images]
    assert sorted(p.stem for p in (out / "labels").glob("*.txt")) == [p.stem for p in images]
    assert (out / "predictions.csv").read_text().count("\n") == 13
    first = (out / "labels" / f"{images[0].stem}.txt").read_text().split()
    assert first[0] == "class" and first[1] in NAMES and 0 < float(first[2]) <= 1
    assert f"{images[0]}: class {rows[0]['class']}" in caplog.text


# ------------------------------------------------------------------------------------ model YAMLs
@pytest.mark.parametrize(("old", "new", "message"), [
    ("depth_multiple: 0.33", "depth_multiple: 0", r"bad\.yaml: depth_multiple must be a number greater than 0"),
    ("depth_multiple: 0.33", "depth_multiple: -1", r"bad\.yaml: depth_multiple"),
    ("width_multiple: 0.25", "width_multiple: 0.0", r"bad\.yaml: width_multiple must be a number greater than 0"),
    ("[-1, 3, C3, [128]]", "[-1, -2, C3, [128]]", r"bad\.yaml: layer 2 \(C3\): repeat count n must be an integer"),
    ("[-1, 3, C3, [128]]", "[-1, 0, C3, [128]]", r"bad\.yaml: layer 2 \(C3\): repeat count"),
    ("[-1, 1, SPPF, [1024, 5]]", "[-1, 1.5, SPPF, [1024, 5]]", r"bad\.yaml: layer 9 \(SPPF\): repeat count"),
    # mistakes that once failed only inside the first forward pass (or in torch), now named by layer
    ("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, 0, 2]]", r"bad\.yaml: layer 1 .*kernel \(0, 0\)"),
    ("[-1, 1, Conv, [128, 3, 2]]", "[-1, 1, Conv, [128, 3, 0]]", r"bad\.yaml: layer 1 .*stride \(0, 0\)"),
    ("[-1, 1, Conv, [64, 6, 2, 2]]", "[-1, 1, Conv, [-64, 6, 2, 2]]", r"bad\.yaml: layer 0 \(Conv"),
    ("[[-1, 6], 1, Concat, [1]]", "[[-1, 4], 1, Concat, [1]]", r"bad\.yaml: layer 12 \(Concat, from \[-1, 4\]\)"),
    ("backbone:\n", "backbone: 5\nunused:\n", r"bad\.yaml: 'backbone' must be a list"),
    ("nc: 80", "nc: 80\nactivation: nn.Swish()", r"bad\.yaml: activation: unknown activation 'nn\.Swish\(\)'"),
])
def test_model_yaml_with_non_positive_sizes_is_refused(tmp_path, old, new, message):
    from models.yaml_config import ModelConfigError
    from models.yolo import DetectionModel

    text = (ROOT / "models" / "yolov5n.yaml").read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ModelConfigError, match=message):
        DetectionModel(path)


def test_depth_and_width_overrides_are_checked_too():
    from models.yaml_config import ModelConfigError
    from models.yolo import DetectionModel

    with pytest.raises(ModelConfigError, match="depth_multiple must be a number greater than 0, got 0"):
        DetectionModel("yolov5n.yaml", depth_multiple=0)
    with pytest.raises(ModelConfigError, match=r"nc \(number of classes\) must be an integer >= 1, got 0"):
        DetectionModel("yolov5n.yaml", nc=0)


def test_every_shipped_model_yaml_still_builds_its_rows():
    """The new row checks accept every YAML in models/ (n >= 1 everywhere, multiples > 0)."""
    from models.yaml_config import check_model_numbers, layer_rows, load_model_yaml

    yamls = sorted((ROOT / "models").rglob("*.yaml"))
    assert len(yamls) > 30
    for path in yamls:
        cfg = load_model_yaml(path)
        check_model_numbers(cfg)
        assert layer_rows(cfg)



# ------------------------------------------------------------------------------------ torchvision .pth
def test_train_weights_pth_loads_the_backbone_named_by_the_file(tmp_path):
    """train.py --cfg a zoo YAML --weights mobilenet_v3_small.pth: the backbone comes from the file (this path
    once failed with a TypeError); a file whose name says no architecture is refused naming the flag."""
    import torchvision

    from utils.common.errors import FlagError
    from utils.runners.train import make_task

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "imagenet-mobilenet_v3_small.pth"
    torch.save(reference.state_dict(), path)
    cfg = TrainConfig(cfg=str(ROOT / "models" / "zoo" / "yolov5s-mobilenetv3s.yaml"), weights=str(path),
                      data=str(SAMPLE_YAML))
    model = make_task(cfg).build_model(cfg.model_source())
    assert torch.equal(model.model[0].conv.weight, reference.features[0][0].weight)
    anonymous = tmp_path / "backbone.pth"
    shutil.copyfile(path, anonymous)
    with pytest.raises(FlagError, match=r"--weights .*backbone\.pth: name the torchvision state_dict file"):
        anonymous_cfg = TrainConfig(cfg=cfg.cfg, weights=str(anonymous), data=str(SAMPLE_YAML))
        make_task(anonymous_cfg).build_model(anonymous_cfg.model_source())
