"""Classification (issue 6): classifier YAMLs, masked multi-head loss, data layouts, converters, training."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_two_head_set, write_jpg

from models.classify import (
    Classify,
    MultiHeadClassify,
    is_classifier_config,
    normalize_heads,
)
from models.yaml_config import ModelConfigError, load_model_yaml
from models.yolo import ClassificationModel
from utils.common.torch_utils import count_parameters, model_gflops
from utils.data.classify import (
    create_classify_loader,
    create_split_loader,
    detect_layout,
    load_classify_data,
    parse_fields_name,
    split_samples,
)
from utils.data.classify_convert import convert_multilabel, convert_singlelabel
from utils.data.classify_convert import main as convert_main
from utils.evaluation.classification import validate_classifier
from utils.inference.classification import predict_images, write_predictions_csv
from utils.runners.train import make_task
from utils.tasks import TaskOptions, build_task
from utils.tasks.base import ModelSource
from utils.tasks.classify import ClassifyTask, masked_head_losses, sequential_phase
from utils.train.config import TrainConfig
from utils.weights.checkpoint import transfer_from_detector

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FASHION = SHARED / "datasets" / "fashion-color-type"
NEU = SHARED / "datasets" / "neu-det"
CLS_YAMLS = sorted((ROOT / "models" / "cls").glob("*.yaml"))

# parameters with the YAMLs' own nc (1000) / default heads (4, 3, 2 classes)
PINNED = {
    "yolov5n-cls": 2_493_000, "yolov5s-cls": 5_453_480, "yolov5m-cls": 12_957_640, "yolov5l-cls": 26_552_680,
    "yolov5n-mcls-s": 1_884_009, "yolov5n-mcls-m": 3_067_753, "yolov5n-mcls-l": 3_510_889,
    "yolov5s-mcls-s": 5_499_849, "yolov5s-mcls-m": 10_226_633, "yolov5s-mcls-l": 11_997_641,
    "yolov5n-mcls-s-dp": 1_474_569, "yolov5n-mcls-s-dw": 1_295_081, "yolov5n-mcls-s-nofc": 1_884_009,
    "yolov5s-mcls-m-dp": 6_458_505, "yolov5s-mcls-m-dw": 4_722_377,
}
# v7.0 README: YOLOv5{n,s,m,l}-cls params (M) and GFLOPs at 224 with 1000 classes, Conv+BN fused
OFFICIAL_CLS = {"yolov5n-cls": (2.5, 0.5), "yolov5s-cls": (5.4, 1.4), "yolov5m-cls": (12.9, 3.9),
                "yolov5l-cls": (26.5, 8.5)}


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (the ../shared folder with data sets and fixtures is absent)")
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------- models
def test_every_cls_yaml_is_listed():
    assert {p.stem for p in CLS_YAMLS} == set(PINNED)


@pytest.mark.parametrize("path", CLS_YAMLS, ids=lambda p: p.stem)
def test_cls_yaml_builds_forward_backward(path):
    torch.manual_seed(0)
    model = ClassificationModel(path)
    assert count_parameters(model) == PINNED[path.stem]
    assert model.stride.tolist() == [32.0] and is_classifier_config(model.yaml)
    out = model(torch.rand(2, 3, 64, 64))
    if isinstance(model.model[-1], MultiHeadClassify):
        assert list(out) == ["head1", "head2", "head3"]
        assert [tuple(v.shape) for v in out.values()] == [(2, 4), (2, 3), (2, 2)]
        loss = sum(v.logsumexp(1).sum() for v in out.values())
    else:
        assert out.shape == (2, 1000)
        loss = out.logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list(OFFICIAL_CLS))
def test_cls_sizes_match_v7(name):
    params, gflops = OFFICIAL_CLS[name]
    model = ClassificationModel(f"{name}.yaml").eval().fuse()  # v7.0's table counts the fused model
    assert round(count_parameters(model) / 1e6, 1) == params
    # v7.0 profiled at 32 x 32 and scaled by area to 224, which also scales the pooled linear layer
    thop = pytest.importorskip("thop")
    macs = thop.profile(copy.deepcopy(model), inputs=(torch.zeros(1, 3, 32, 32),), verbose=False)[0]
    assert round(macs * 2 / 1e9 * 49, 1) == gflops
    assert model_gflops(model, 224) < gflops  # our count is exact: the linear layer runs once


def test_heads_override_and_names():
    heads = [{"name": "color", "names": ["black", "blue", "red"]}, {"name": "type", "nc": 4}]
    model = ClassificationModel("yolov5n-mcls-m.yaml", heads=heads)
    assert model.heads == [{"name": "color", "names": ["black", "blue", "red"]},
                           {"name": "type", "names": ["0", "1", "2", "3"]}]
    assert model.names[:3] == ["color/black", "color/blue", "color/red"] and model.nc == 7
    model.eval()
    out = model(torch.rand(1, 3, 64, 64))
    assert {k: v.shape[1] for k, v in out.items()} == {"color": 3, "type": 4}
    # the head spec lives in the YAML, so a model rebuilt from it (a checkpoint) has the same heads
    assert ClassificationModel(model.yaml).heads == model.heads


def test_nc_symbols_and_single_head_names():
    cfg = load_model_yaml("yolov5n-mcls-s.yaml")
    del cfg["heads"]
    cfg.update(nc1=4, nc2=3, nc3=2)
    cfg["head"][-1][3] = [["nc1", "nc2", "nc3"], "s"]
    model = ClassificationModel(cfg)
    assert [h["name"] for h in model.heads] == ["head1", "head2", "head3"]
    assert model.model[-1].ncs == [4, 3, 2]
    single = ClassificationModel("yolov5n-cls.yaml", heads=[{"name": "defect", "names": ["a", "b"]}])
    assert single.names == ["a", "b"] and single.heads[0]["name"] == "defect"
    assert single(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    assert ClassificationModel("yolov5n-cls.yaml", nc=7).model[-1].linear.out_features == 7


def test_head_count_mismatch_and_bad_options_fail():
    cfg = load_model_yaml("yolov5n-mcls-s.yaml")
    cfg["head"][-1][3] = [[4, 3], "s"]
    with pytest.raises(ModelConfigError, match="do not match"):
        ClassificationModel(cfg, heads=[{"name": "a", "nc": 2}])
    bad = copy.deepcopy(load_model_yaml("yolov5n-mcls-s.yaml"))
    bad["head"][-1][3] = ["heads", {"size": "s", "colour": 1}]
    with pytest.raises(ModelConfigError, match="unknown option"):
        ClassificationModel(bad)
    with pytest.raises(ModelConfigError, match="unique"):
        normalize_heads([{"name": "a", "nc": 2}, {"name": "a", "nc": 3}])


def test_classify_from_several_layers():
    cfg = load_model_yaml("yolov5n-cls.yaml")
    cfg["head"] = [[[4, 6, 8], 1, "Classify", ["nc"]]]
    cfg["nc"] = 5
    model = ClassificationModel(cfg)
    head = model.model[-1]
    assert isinstance(head, Classify) and len(head.conv) == 3 and head.linear.in_features == 3 * 1280
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_variants_use_their_convs():
    dp = ClassificationModel("yolov5n-mcls-s-dp.yaml")
    dw = ClassificationModel("yolov5n-mcls-s-dw.yaml")
    kernels_dp = {tuple(m.kernel_size) for m in dp.modules() if isinstance(m, torch.nn.Conv2d)}
    assert (3, 1) in kernels_dp and (1, 3) in kernels_dp and (3, 3) not in kernels_dp
    depthwise = [m for m in dw.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)
    nofc = ClassificationModel("yolov5n-mcls-s-nofc.yaml")
    assert not any(isinstance(m, torch.nn.Linear) for m in nofc.modules())


def test_transfer_from_detector():
    weights = need(SHARED / "fixtures" / "yolov5n-neu-det-v7.pt")
    model = ClassificationModel("yolov5n-mcls-s.yaml")
    transferred, total = transfer_from_detector(model, weights)
    backbone = [k for k in model.state_dict() if int(k.split(".")[1]) <= 8]
    assert transferred == len(backbone) and total == len(model.state_dict())
    from utils.weights.checkpoint import load_checkpoint

    det = load_checkpoint(weights).model.float()
    key = "model.4.m.0.cv2.conv.weight"
    assert torch.equal(model.state_dict()[key], det.state_dict()[key].float())


def test_checkpoint_round_trip(tmp_path):
    from utils.weights.checkpoint import load_checkpoint, save_checkpoint

    heads = [{"name": "color", "names": ["k", "b", "r"]}, {"name": "type", "nc": 2}]
    cfg = load_model_yaml("yolov5n-mcls-s.yaml")
    cfg["head_balance"] = "uncertainty"
    model = ClassificationModel(cfg, heads=heads).eval()
    save_checkpoint(model, tmp_path / "m.pt", None, task="classify")
    loaded = load_checkpoint(tmp_path / "m.pt").model
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert loaded.heads == model.heads and all(torch.allclose(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- loss
def test_masked_loss_matches_hand_computed_ce():
    torch.manual_seed(0)
    preds = {"color": torch.randn(6, 3, requires_grad=True), "type": torch.randn(6, 4, requires_grad=True),
             "defect": torch.randn(6, 6, requires_grad=True)}
    targets = torch.tensor([[0, 1, -1], [2, -1, -1], [-1, 3, -1], [1, 0, -1], [-1, -1, -1], [0, 2, -1]])
    losses, active = masked_head_losses(preds, targets, ["color", "type", "defect"])
    color_rows, type_rows = [0, 1, 3, 5], [0, 2, 3, 5]
    expected_color = np.mean([-F.log_softmax(preds["color"][i], 0)[targets[i, 0]].item() for i in color_rows])
    expected_type = np.mean([-F.log_softmax(preds["type"][i], 0)[targets[i, 1]].item() for i in type_rows])
    assert losses[0].item() == pytest.approx(expected_color, rel=1e-6)
    assert losses[1].item() == pytest.approx(expected_type, rel=1e-6)
    assert losses[2].item() == 0.0 and active.tolist() == [True, True, False]
    losses.sum().backward()
    assert torch.count_nonzero(preds["color"].grad[[2, 4]]) == 0  # rows without a color label get no gradient
    assert torch.count_nonzero(preds["defect"].grad) == 0


def _task(tmp_path: Path, data: Path, **overrides) -> tuple[ClassifyTask, ModelSource]:
    base = dict(cfg="yolov5n-mcls-s.yaml", data=str(data), hyp="", epochs=3, batch_size=16, imgsz=64, workers=0,
                device="cpu", project=str(tmp_path), name="run", exist_ok=True, noplots=True, seed=0)
    base.update(overrides)
    cfg = TrainConfig(**base)
    task = make_task(cfg)
    task.hyp = {"label_smoothing": 0.0, "dropout": 0.0}
    return task, cfg.model_source()


def test_criterion_weights_and_uncertainty(tmp_path):
    data = make_two_head_set(tmp_path / "set")
    task, source = _task(tmp_path, data)
    assert task.head_weights.tolist() == [2.0, 1.0]  # from the data YAML's weight: entries
    model = task.build_model(source)
    preds = {"color": torch.randn(4, 3), "type": torch.randn(4, 4)}
    targets = torch.tensor([[0, 1], [1, -1], [2, 3], [0, 0]])
    losses, _ = masked_head_losses(preds, targets, ["color", "type"])
    total, items = task.criterion(model)(preds, {"targets": targets, "n": 4})
    assert total.item() == pytest.approx((2 * losses[0] + losses[1]).item() * 4 / 64, rel=1e-6)
    assert torch.allclose(items, losses)

    task, source = _task(tmp_path, data, head_balance="uncertainty", head_weights=[1.0, 1.0])
    model = task.build_model(source)
    log_vars = model.head_balance.log_vars
    assert any(p is log_vars for p in model.parameters())  # the engine's optimiser sees it
    with torch.no_grad():
        log_vars.copy_(torch.tensor([0.5, -0.5]))
    total, _ = task.criterion(model)(preds, {"targets": targets, "n": 64})
    expected = sum(torch.exp(-s) * loss + s / 2 for s, loss in zip(log_vars.detach(), losses))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert log_vars.grad is not None and torch.count_nonzero(log_vars.grad) == 2


def test_sequential_phases_and_plan(tmp_path):
    assert [sequential_phase(e, 7, 3) for e in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [sequential_phase(e, 5, 2, finetune_epochs=1) for e in range(5)] == [0, 0, 1, 1, -1]
    with pytest.raises(ValueError, match="one epoch per head"):
        sequential_phase(0, 3, 3, finetune_epochs=1)
    task, source = _task(tmp_path, make_two_head_set(tmp_path / "set"), heads_mode="sequential", finetune_epochs=1)
    task.build_model(source)
    first, second, last = task.epoch_plan(0, 3), task.epoch_plan(1, 3), task.epoch_plan(2, 3)
    assert first.trainable("model.0.conv.weight") and first.trainable("model.9.branches.0.tail.linear.weight")
    assert not first.trainable("model.9.branches.1.tail.linear.weight")
    assert second.trainable("model.9.branches.1.tail.linear.weight") and not second.trainable("model.8.cv1.conv.weight")
    assert task.active_heads == [0, 1] and last.trainable is None and last.lr_scale == 0.1


# ---------------------------------------------------------------------------------------------- data
def test_parse_fields_and_layout_detection(tmp_path):
    assert parse_fields_name("00012_0_2_", 2) == [0, 2]
    assert parse_fields_name("00012_x_-1_", 2) == [-1, -1]
    assert parse_fields_name("00012_0_", 2) is None and parse_fields_name("abc_0_1_", 2) is None
    write_jpg(tmp_path / "fields" / "00000_1_2_.jpg")
    write_jpg(tmp_path / "prefix" / "crazing_1.jpg")
    write_jpg(tmp_path / "folder" / "cat" / "a.jpg")
    assert [detect_layout(tmp_path / d) for d in ("fields", "prefix", "folder")] == ["fields", "prefix", "folder"]


def test_bad_files_reported_and_skipped(tmp_path, caplog):
    root = tmp_path / "set"
    data = make_two_head_set(root, n=4)
    (root / "images" / "train" / "00010_1_1_.jpg").write_bytes(b"not a jpeg")
    write_jpg(root / "images" / "train" / "00011_7_1_.jpg")  # class 7 > 3 colors
    write_jpg(root / "images" / "train" / "00012_1_.jpg")  # one field for two heads
    samples, issues = split_samples(load_classify_data(data), "train")
    assert len(samples) == 4
    reasons = {Path(p).name: r for p, r in issues.skipped}
    assert set(reasons) == {"00010_1_1_.jpg", "00011_7_1_.jpg", "00012_1_.jpg"}
    assert "unreadable" in reasons["00010_1_1_.jpg"] and "out of range" in reasons["00011_7_1_.jpg"]
    assert "00010_1_1_.jpg" in caplog.text


def test_folder_layout_single_head(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(3):
                write_jpg(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "data.yaml").write_text("train: train\nval: val\n")
    data = load_classify_data(tmp_path / "data.yaml")
    assert data.heads == [{"name": "class", "names": ["cat", "dog"]}]
    samples, _ = split_samples(data, "val")
    assert [t for _, t in samples] == [[0]] * 3 + [[1]] * 3


def test_fashion_dataset_and_loader():
    data = load_classify_data(need(FASHION / "fashion-color-type.yaml"))
    assert data.head_names == ["color", "type"]
    train, issues = split_samples(data, "train")
    val, _ = split_samples(data, "val")
    assert (len(train), len(val), issues.skipped) == (1947, 487, [])
    first = next(s for s in train if Path(s[0]).name == "00000_2_0_.jpg")
    assert first[1] == [2, 0]
    loader, dataset = create_classify_loader(train[:32], 96, 16, augment=True, workers=0, shuffle=True,
                                             hyp={"crop_scale_min": 0.3, "randaugment": True})
    images, targets, paths = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 96, 96)
    assert targets.dtype == torch.long and targets.shape == (16, 2) and len(paths) == 16
    assert [c.sum() for c in dataset.label_counts([3, 4])] == [32, 32]


def test_multisource_targets(tmp_path):
    need(FASHION)
    need(NEU)
    spec = {"path": str(FASHION), "train": "images/train", "val": "images/val",
            "heads": [{"name": "color", "names": ["black", "blue", "red"]},
                      {"name": "type", "names": ["dress", "jeans", "shirt", "shoes"]},
                      {"name": "defect", "train": str(NEU / "images" / "train"), "val": str(NEU / "images" / "val"),
                       "names": ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale",
                                 "scratches"]}]}
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(spec))
    data = load_classify_data(path)
    assert [s.layout for s in data.sources["val"]] == ["prefix", "fields"]
    val, _ = split_samples(data, "val", verify=False)
    targets = torch.tensor([t for _, t in val])
    neu_rows, fashion_rows = targets[:, 2] >= 0, targets[:, 0] >= 0
    assert int(neu_rows.sum()) == 360 and int(fashion_rows.sum()) == 487
    assert (targets[neu_rows, :2] == -1).all() and (targets[fashion_rows, 2] == -1).all()
    assert torch.bincount(targets[neu_rows, 2]).tolist() == [60] * 6


# ---------------------------------------------------------------------------------------------- converters
def _vehicle_tree(root: Path) -> Path:
    src = root / "images"
    for vehicle, color in (("car", (0, 0, 255)), ("bus", (0, 255, 0))):
        for view in ("head", "tail"):
            for i in range(5):
                write_jpg(src / vehicle / f"{vehicle}-whole" / f"{vehicle}-{view}" / f"{i}.jpg", color)
        for i in range(5):
            write_jpg(src / vehicle / f"{vehicle}-half" / f"{i}.png", color)
    (src / "car" / "car-half" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return src


def test_convert_multilabel(tmp_path):
    src = _vehicle_tree(tmp_path)
    data_yaml = convert_multilabel(src, tmp_path / "out", (0.6, 0.2, 0.2), seed=1, head_names=["kind", "part", "view"])
    spec = yaml.safe_load(data_yaml.read_text())
    assert spec["heads"] == [{"name": "kind", "names": ["bus", "car"]}, {"name": "part", "names": ["half", "whole"]},
                             {"name": "view", "names": ["head", "tail"]}]
    files = sorted(p.name for p in (tmp_path / "out" / "images").rglob("*.*"))
    assert len(files) == 30 and "00000" in files[0]
    assert sum(1 for f in files if "_x_" in f) == 10  # half-vehicle images have no view label
    data = load_classify_data(data_yaml)
    counts = {s: len(split_samples(data, s)[0]) for s in ("train", "val", "test")}
    assert counts == {"train": 18, "val": 6, "test": 6}  # 3 per group of 5 in train, stratified
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    assert len(rows) == 30 and {r["split"] for r in rows} == {"train", "val", "test"}
    again = convert_multilabel(src, tmp_path / "again", (0.6, 0.2, 0.2), seed=1, head_names=["kind", "part", "view"])
    assert (again.parent / "manifest.csv").read_text().replace("again", "out") == \
        (tmp_path / "out" / "manifest.csv").read_text()  # seeded: same split and order


def test_convert_singlelabel_folder_and_flat(tmp_path):
    src = _vehicle_tree(tmp_path)
    assert convert_main(["singlelabel", "--src", str(src), "--out", str(tmp_path / "fold"), "--level", "1"]) == 0
    data = load_classify_data(tmp_path / "fold" / "data.yaml")
    assert data.heads == [{"name": "class", "names": ["bus", "car"]}] and data.sources["train"][0].layout == "folder"
    assert sum(len(split_samples(data, s)[0]) for s in ("train", "val", "test")) == 30
    flat = convert_singlelabel(src, tmp_path / "flat", (0.8, 0.2), level="leaf", layout="flat")
    data = load_classify_data(flat)
    assert data.heads[0]["names"] == ["bus-half", "bus-whole-head", "bus-whole-tail", "car-half", "car-whole-head",
                                      "car-whole-tail"]
    assert len(split_samples(data, "train")[0]) == 24 and not data.sources["test"]


# ---------------------------------------------------------------------------------------------- validation, predict
def test_validate_and_predict(tmp_path):
    data = make_two_head_set(tmp_path / "set")
    task, source = _task(tmp_path, data)
    model = task.build_model(source)
    val_loader, _ = create_split_loader(data, "val", imgsz=64, batch_size=4)
    metrics = validate_classifier(model, val_loader, task.heads, save_dir=tmp_path / "plots", plots=True)
    assert 0 <= metrics["color/top1"] <= 1 and "color/top5" not in metrics
    assert metrics["confusion"]["type"].sum() == 5  # 3 of the 8 val images carry no type label
    assert (tmp_path / "plots" / "confusion_matrix_color.png").stat().st_size > 1000
    assert model.training  # the caller's mode is restored
    paths = sorted((tmp_path / "set" / "images" / "val").glob("*.jpg"))[:3]
    rows = predict_images(model, paths, 64)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rows[0]["color"] in ["k", "b", "r"] and 0 < rows[0]["type_conf"] <= 1
    out = write_predictions_csv(rows, tmp_path / "pred.csv")
    assert read_csv(out)[0]["color"] == rows[0]["color"]


# ---------------------------------------------------------------------------------------------- training (engine)
def _fashion_subset(tmp_path: Path, n_train: int = 64, n_val: int = 32) -> Path:
    need(FASHION)
    for split, n in (("train", n_train), ("val", n_val)):
        files = sorted((FASHION / "images" / split).glob("*.jpg"))[:n]
        for f in files:
            target = tmp_path / "fashion" / split / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    spec = yaml.safe_load((FASHION / "fashion-color-type.yaml").read_text())
    spec.update(path=str(tmp_path / "fashion"), train="train", val="val")
    (tmp_path / "fashion.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "fashion.yaml"


def _train_cfg(tmp_path: Path, data: Path, name: str, **overrides) -> TrainConfig:
    base = dict(cfg="yolov5n-mcls-s.yaml", data=str(data), hyp="", epochs=3, batch_size=16, imgsz=48, workers=0,
                device="cpu", project=str(tmp_path), name=name, exist_ok=True, seed=0, optimizer="Adam",
                hyp_override=["lr0=0.003", "warmup_epochs=0", "crop_scale_min=0.5"], noplots=True)
    base.update(overrides)
    return TrainConfig(**base)


def _train_losses(run: Path) -> list[float]:
    with open(run / "results.csv") as fh:
        return [float(r["train/color"]) + float(r["train/type"]) for r in csv.DictReader(fh)]


def test_joint_training_loss_falls(tmp_path):
    from utils.train.engine import fit

    data = _fashion_subset(tmp_path)
    cfg = _train_cfg(tmp_path, data, "joint", epochs=4, batch_size=32)
    metrics = fit(make_task(cfg), cfg)
    losses = _train_losses(tmp_path / "joint")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert {"color/top1", "type/top1", "mean/top1"} <= set(metrics)
    assert (tmp_path / "joint" / "weights" / "best.pt").exists()


def test_sequential_training_freezes_backbone(tmp_path):
    from utils.train.callbacks import default_callbacks
    from utils.train.engine import Trainer

    data = _fashion_subset(tmp_path, n_train=32, n_val=16)
    cfg = _train_cfg(tmp_path, data, "seq", epochs=3, heads_mode="sequential", finetune_epochs=1, imgsz=32)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(trainer) -> None:
        snapshots[trainer.epoch] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    callbacks = default_callbacks()
    callbacks.add("on_train_epoch_start", snapshot)
    trainer = Trainer(make_task(cfg), cfg, callbacks)
    trainer.fit()
    before, after = snapshots[1], snapshots[2]  # epoch 1 = head 2 (type) only; epoch 2 = joint fine-tune

    def changed(prefix: str) -> bool:
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    backbone = [k for k in before if int(k.split(".")[1]) < 9]
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # weights and BN statistics, bit for bit
    assert not changed("model.9.branches.0.") and changed("model.9.branches.1.")
    assert any(not torch.equal(snapshots[0][k], before[k]) for k in backbone)  # phase 1 did train the backbone
    final = trainer.model.state_dict()
    assert any(not torch.equal(after[k], final[k]) for k in backbone)  # the fine-tune trains everything


FASHION = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashion-color-type"
FASHION_HEADS = [{"name": "color", "names": ["black", "blue", "red"]},
                 {"name": "type", "names": ["dress", "jeans", "shirt", "shoes"]}]


@pytest.fixture(scope="module")
def fashion_checkpoint(tmp_path_factory) -> Path:
    """An untrained two-head classifier whose logits still differ from image to image: BN statistics measured
    on the data set's images and the final layers scaled up (a fresh model's activations fade with depth)."""
    from utils.weights.checkpoint import save_checkpoint

    if not FASHION.exists():
        pytest.skip(f"{FASHION} not present (../shared absent)")
    torch.manual_seed(0)
    model = ClassificationModel("yolov5n-mcls-s.yaml", heads=FASHION_HEADS)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=16 / module.in_features**0.5)
    files = sorted((FASHION / "images" / "val").glob("*.jpg"))[:32]
    images = torch.stack([torch.from_numpy(cv2.resize(cv2.imread(str(f)), (32, 32))[:, :, ::-1].copy())
                          for f in files]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        model.train()(images)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("fashion") / "cls.pt")


def test_val_and_detect_cli_on_a_classifier_checkpoint(fashion_checkpoint, tmp_path):
    """val.py / detect.py route classifier checkpoints to per-head accuracy and per-head predictions."""
    from utils.runners.detect import DetectOptions, run_detect
    from utils.runners.val import ValOptions, run_val

    weights, data = fashion_checkpoint, FASHION
    metrics = run_val(ValOptions(str(weights), str(data / "fashion-color-type.yaml"), imgsz=32, batch_size=64,
                                 workers=0, device="cpu", project=str(tmp_path), name="val", noplots=True))
    assert {"color/top1", "type/top1", "mean/top1"} <= set(metrics)
    assert int(metrics["confusion"]["color"].sum()) == 487
    images = sorted((data / "images" / "val").glob("*.jpg"))[:3]
    rows = run_detect(DetectOptions(str(weights), str(images[0].parent / f"{images[0].stem[:4]}*.jpg"), imgsz=32,
                                    device="cpu", project=str(tmp_path), name="pred", exist_ok=True, save_csv=True))
    assert rows and {"color", "type", "color_conf"} <= set(rows[0])
    assert (tmp_path / "pred" / "predictions.csv").exists()


def test_val_on_an_exported_classifier_matches_pytorch(fashion_checkpoint, tmp_path):
    """val.py takes the ONNX export of a multi-head classifier (heads from its sidecar) and scores every image
    as the checkpoint does: same per-head confusion matrices."""
    from utils.export import ExportOptions, export_model
    from utils.runners.val import ValOptions, run_val

    onnx_file = export_model(ExportOptions(weights=fashion_checkpoint, include=("onnx",), imgsz=(32, 32), dynamic=True,
                                         output_dir=tmp_path))["onnx"]
    results = [run_val(ValOptions(str(weights), str(FASHION / "fashion-color-type.yaml"), imgsz=32, batch_size=64,
                                  workers=0, device="cpu", project=str(tmp_path), name=Path(weights).suffix[1:],
                                  noplots=True)) for weights in (fashion_checkpoint, onnx_file)]
    pytorch, onnx = results
    for head in ("color", "type"):
        assert len(np.unique(pytorch["confusion"][head].nonzero()[1])) > 1, "predictions all one class: no test"
        np.testing.assert_array_equal(onnx["confusion"][head], pytorch["confusion"][head])
        assert onnx[f"{head}/top1"] == pytorch[f"{head}/top1"]


def test_int8_export_of_a_two_head_classifier_calibrates_on_its_data(fashion_checkpoint, tmp_path):
    """--int8 with a classification data YAML (heads, no names): calibration lists the split as the trainer does
    and prepares images as the classification val loader does (centre crop); both INT8 artifacts (ONNX Runtime
    QDQ, OpenVINO NNCF) keep both heads and mostly agree with PyTorch. Bound: top-1 agreement >= 0.6 per head on
    64 val images (measured 0.77-0.92 for this untrained model with logits up to ~130; chance is 0.33 / 0.25)."""
    from utils.data.classify import ClassificationDataset, load_classify_data, split_samples
    from utils.export import ExportOptions, export_model
    from utils.export.common import center_crop_tensor
    from utils.export.registry import load_backend
    from utils.weights.checkpoint import load_checkpoint

    data = FASHION / "fashion-color-type.yaml"
    files = build_task("classify", data, TaskOptions()).calibration_files("val")
    assert len(files) == 487
    samples, _ = split_samples(load_classify_data(data), "val", verify=False)
    loader_image = ClassificationDataset(samples, 32)[0][0].float() / 255
    assert torch.equal(center_crop_tensor(samples[0][0], (32, 32)), loader_image)
    artifacts = export_model(ExportOptions(weights=fashion_checkpoint, include=("onnx", "openvino"), imgsz=(32, 32),
                                         int8=True, data=data, calib_images=64, output_dir=tmp_path))
    images = torch.stack([center_crop_tensor(f, (32, 32)) for f in files[:64]])
    with torch.no_grad():
        expected = load_checkpoint(fashion_checkpoint).model.eval()(images)
    for name in ("onnx_int8", "openvino"):
        backend = load_backend(artifacts[name])
        assert backend.metadata["precision"] == "int8" and backend.metadata["calibration_images"] == 64
        output = backend(images)
        for head in ("color", "type"):
            agreement = (output[head].argmax(1) == expected[head].argmax(1)).float().mean()
            assert agreement >= 0.6, (name, head, float(agreement))
