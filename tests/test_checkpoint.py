"""v7.0 checkpoint compatibility (reference outputs), our checkpoint format, safe loading, weight transfer."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch

from models.yolo import DetectionModel
from utils.weights.checkpoint import (
    CheckpointError,
    legacy_allow_list,
    load_checkpoint,
    save_atomic,
    save_checkpoint,
    transfer_weights,
)


@pytest.mark.parametrize("name", ["yolov5n-neu-det-v7", "legacy-v3-style"])
def test_v7_checkpoint_reproduces_reference_outputs(fixtures_dir, name):
    loaded = load_checkpoint(fixtures_dir / f"{name}.pt")
    expected = torch.load(fixtures_dir / f"{name}.expected.pt")
    with torch.no_grad():
        pred, raw = loaded.model(expected["images"].float() / 255)
    assert pred.shape == expected["pred"].shape
    assert (pred[..., :4] - expected["pred"][..., :4]).abs().max() <= 1e-3
    assert (pred[..., 4:] - expected["pred"][..., 4:]).abs().max() <= 1e-4
    for ours, ref in zip(raw, expected["raw"]):
        assert (ours - ref).abs().max() <= 1e-4


def test_v7_checkpoint_metadata(fixtures_dir):
    loaded = load_checkpoint(fixtures_dir / "yolov5n-neu-det-v7.pt")
    assert loaded.format == "yolov5-v7-pickle"
    assert loaded.meta["names"] == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert loaded.meta["stride"] == [8.0, 16.0, 32.0]
    assert next(loaded.model.parameters()).dtype == torch.float32  # stored fp16, loaded as fp32


def test_v7_reference_nms(fixtures_dir):
    from utils.common.boxes import non_max_suppression

    loaded = load_checkpoint(fixtures_dir / "yolov5n-neu-det-v7.pt")
    expected = torch.load(fixtures_dir / "yolov5n-neu-det-v7.expected.pt")
    with torch.no_grad():
        pred = loaded.model(expected["images"].float() / 255)[0]
    detections = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45, max_det=300)
    for ours, ref in zip(detections, expected["nms_conf0.25_iou0.45"]):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-3)


def test_safe_loader_refuses_unknown_class(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": argparse.Namespace(x=1)}, path)  # a class outside the allow-list
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle: it names argparse\.Namespace,"):
        load_checkpoint(path)


def _save_under_fake_module(monkeypatch, path, dotted_name: str, value, payload) -> None:
    """torch.save ``payload`` while ``value`` is importable as ``dotted_name``, so the pickle names exactly that
    path (the way a file made by other code would). The fake modules are gone again once the test ends."""
    module_name, attribute = dotted_name.rsplit(".", 1)
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    value.__module__, value.__qualname__ = module_name, attribute
    setattr(sys.modules[module_name], attribute, value)
    torch.save(payload, path)


@pytest.mark.parametrize("dotted_name", ["yolov5x.models.yolo.DetectionModel", "yolov5.models.yolo.detection.Model",
                                         "yolov5.models.common.Conv.Conv", "ultralytics.models.yolo.DetectionModel"])
def test_look_alike_class_paths_are_refused(monkeypatch, tmp_path, dotted_name):
    """Only the exact module paths of a clone (models.*) and of the PyPI package (yolov5.models.*) are mapped."""
    look_alike = type("LookAlike", (torch.nn.Module,), {})
    path = tmp_path / "look-alike.pt"
    _save_under_fake_module(monkeypatch, path, dotted_name, look_alike, {"model": look_alike()})
    assert dotted_name in torch.serialization.get_unsafe_globals_in_checkpoint(path)  # the pickle names it
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert f"refused to unpickle: it names {dotted_name}, outside the allow-list" in message


@pytest.mark.parametrize("dotted_name", ["yolov5.models.common.os.system", "yolov5.models.yolo.torch.load",
                                         "models.common.subprocess.run", "yolov5.models.common.C3.forward"])
def test_functions_reached_through_mapped_modules_are_refused_and_never_called(monkeypatch, tmp_path, dotted_name):
    """A pickle that calls a function named under a mapped module (REDUCE on a GLOBAL) is refused before
    anything is looked up or called, and the message names only the refused global, not the allowed layers."""
    calls = []

    def spy(*args):
        calls.append(args)

    class Call:
        def __reduce__(self):
            return spy, ("echo pwned",)

    path = tmp_path / "function.pt"
    payload = {"model": torch.nn.Conv2d(1, 1, 1), "hook": Call()}
    _save_under_fake_module(monkeypatch, path, dotted_name, spy, payload)
    with pytest.raises(CheckpointError, match=rf"it names {dotted_name.replace('.', '[.]')}, outside") as refused:
        load_checkpoint(path)
    assert "Conv2d" not in str(refused.value)
    assert calls == []


def test_mapped_names_are_exact_yolov5_class_paths():
    """Every name the allow-list accepts is a class under our modules, torch.nn, or v7.0's two modules with or
    without the package prefix; no module, function or wildcard."""
    import inspect

    for item in legacy_allow_list():
        cls, name = item if isinstance(item, tuple) else (item, f"{item.__module__}.{item.__qualname__}")
        assert inspect.isclass(cls) and issubclass(cls, torch.nn.Module), name
        module, class_name = name.rsplit(".", 1)
        assert class_name == cls.__name__ or (class_name, cls.__name__) == ("Model", "DetectionModel"), name
        assert module.startswith(("models.", "torch.nn.")) or module in {"yolov5.models.common", "yolov5.models.yolo"}


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found; put the \.pt file there or pass --weights PATH$"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=r"weights are not downloaded .* fetch yolov5s6\.pt from https://"):
        load_checkpoint(tmp_path / "yolov5s6.pt")  # v7.0 would download official names; we say where to get them


def test_our_format_round_trip_loads_without_allow_list(tmp_path):
    model = DetectionModel("yolov5n.yaml", nc=3).eval()
    model.names = ["a", "b", "c"]
    path = save_checkpoint(model, tmp_path / "best.pt", train_state={"epoch": 4}, epoch=4)
    raw = torch.load(path, weights_only=True)  # plain data only: the default safe loader suffices
    assert raw["format"].startswith("yolo-kit") and raw["train_state"] == {"epoch": 4}
    loaded = load_checkpoint(path)
    assert loaded.model.names == ["a", "b", "c"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded.model(x)[0])


def test_channels_last_model_is_saved_contiguous(tmp_path):
    model = DetectionModel("yolov5n.yaml", nc=3).eval().to(memory_format=torch.channels_last)
    assert not model.model[0].conv.weight.is_contiguous()
    raw = torch.load(save_checkpoint(model, tmp_path / "last.pt"), weights_only=True)
    assert all(tensor.is_contiguous() for tensor in raw["state_dict"].values())
    assert torch.equal(raw["state_dict"]["model.0.conv.weight"], model.model[0].conv.weight)


def test_our_format_rejects_other_architecture(tmp_path):
    model = DetectionModel("yolov5n.yaml", nc=3)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, path)
    data = torch.load(path, weights_only=True)
    data["yaml"]["width_multiple"] = 0.5  # the YAML now describes a yolov5s-sized model
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: checkpoint does not fit this architecture"):
        load_checkpoint(path)


def test_transfer_to_other_nc_reports_counts(fixtures_dir, caplog):
    source = load_checkpoint(fixtures_dir / "yolov5n-neu-det-v7.pt").model
    target = DetectionModel("yolov5n.yaml", nc=2)
    with caplog.at_level("INFO"):
        transferred, total = transfer_weights(target, source.state_dict(), "yolov5n-neu-det-v7.pt")
    # everything but the three Detect convs' weight and bias (255->21 outputs) transfers
    assert total == len(target.state_dict())
    assert transferred == total - 6
    assert f"Transferred {transferred}/{total}" in caplog.text
    assert torch.equal(target.model[0].conv.weight, source.model[0].conv.weight)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
