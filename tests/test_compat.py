"""Files written by main before the restructuring (tests/fixtures/compat, see its README) still load and give
the outputs that version computed: checkpoints, a pruned YAML + .pt pair, a QAT checkpoint, export sidecars."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.yolo import DetectionModel
from utils.export.registry import load_backend
from utils.weights.checkpoint import load_checkpoint, read_checkpoint

COMPAT = Path(__file__).resolve().parent / "fixtures" / "compat"
EXPECTED = torch.load(COMPAT / "expected.pt", weights_only=True)


def assert_same_outputs(output, expected) -> None:
    if isinstance(expected, dict):
        assert list(output) == list(expected)
        for name in expected:
            torch.testing.assert_close(output[name], expected[name], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def eval_output(model: torch.nn.Module, images: torch.Tensor):
    with torch.no_grad():
        out = model.eval()(images)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name, images", [("detector.pt", "det_images"), ("pruned.pt", "det_images"),
                                          ("qat.pt", "det_images"), ("classifier.pt", "cls_images")])
def test_checkpoints_give_their_outputs(name, images):
    loaded = load_checkpoint(COMPAT / name)
    assert_same_outputs(eval_output(loaded.model, EXPECTED[images]), EXPECTED[name])


def test_pruned_yaml_builds_the_architecture_of_its_checkpoint():
    model = DetectionModel(COMPAT / "pruned.yaml")
    model.load_state_dict(read_checkpoint(COMPAT / "pruned.pt")["state_dict"])
    assert_same_outputs(eval_output(model, EXPECTED["det_images"]), EXPECTED["pruned.pt"])


@pytest.mark.parametrize("name, images", [("detector.onnx", "det_images"), ("detector_int8.onnx", "det_images"),
                                          ("detector_openvino_model", "det_images"),
                                          ("classifier.onnx", "cls_images")])
def test_exported_artifacts_and_sidecars_load(name, images):
    backend = load_backend(COMPAT / name)
    assert backend.task == ("classify" if name.startswith("classifier") else "detect")
    assert_same_outputs(backend(EXPECTED[images]), EXPECTED[name])
