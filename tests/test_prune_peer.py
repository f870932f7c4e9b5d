"""The Torch-Pruning peer (issue 33 point 5): the library's own pruner on our models, to a FLOPs budget, saved as
our pruned YAML + .pt; what it keeps, how close it lands, and that the saved model is the pruned one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from benchmarks import prune_tp
from models.yolo import DetectionModel, build_model
from tests.test_prune import measured_macs, randomise_batchnorm
from utils.common.cli import run_cli
from utils.compress.prune.io import save_pruned
from utils.compress.prune.peer import PeerBudgetError, PeerSettings, prune_to_ratio, search_ratio
from utils.weights.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "data" / "neu-det-sample.yaml")
NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
IMGSZ = 64
TOLERANCE = 0.02  # prune_tp.py's default --delta: the measured FLOPs share lands within this of --remain-ratio


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """yolov5n for the sample's 6 classes with BatchNorms far from their defaults (a wrong cut shows)."""
    torch.manual_seed(0)
    model = DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=6).eval()
    randomise_batchnorm(model)
    model.names = NAMES
    path = tmp_path_factory.mktemp("peer") / "base.pt"
    save_checkpoint(model, path, names=NAMES)
    return path


def test_prune_tp_reaches_the_flops_budget_head_untouched(detector, tmp_path, caplog):
    """benchmarks/prune_tp.py to 50 % of the FLOPs: the independently counted MACs land within --delta of the budget
    and the Detect head's outputs keep their widths (benchmarks/compress.py's smoke test fine-tunes the result)."""
    path = tmp_path / "tp.yaml"
    with caplog.at_level(logging.INFO):
        code = run_cli(prune_tp.main, ["--weights", str(detector), "--data", SAMPLE, "--imgsz", str(IMGSZ),
                                       "--importance", "group-norm", "--steps", "2", "--remain-ratio", "0.5",
                                       "--path", str(path), "--workers", "0", "--noval"])
    assert code == 0
    assert "layer  module" in caplog.text and "Torch-Pruning (group-norm importance, 2 steps)" in caplog.text
    original = load_checkpoint(detector).model
    pruned = load_checkpoint(path.with_suffix(".pt")).model
    share = measured_macs(pruned, IMGSZ) / measured_macs(original, IMGSZ)
    assert abs(share - 0.5) <= TOLERANCE, share
    record = pruned.yaml["pruned"]
    assert record["method"] == "torch-pruning" and record["importance"] == "group-norm" and record["steps"] == 2
    assert record["remain_ratio"] == 0.5 and 0 < record["ratio"] < 0.9
    head, head0 = pruned.model[-1], original.model[-1]
    assert [m.out_channels for m in head.m] == [m.out_channels for m in head0.m] == [33, 33, 33]
    assert torch.equal(head.anchors, head0.anchors)
    assert sum(m.in_channels for m in head.m) < sum(m.in_channels for m in head0.m)  # what feeds it was cut


def test_saved_peer_model_rebuilds_from_its_yaml_with_equal_outputs(detector, tmp_path):
    """The pruned model in memory, its checkpoint, and the model built from the YAML alone with the checkpoint's
    weights give the same outputs (decoded boxes and raw maps); the unpruned model is left as it was."""
    original = load_checkpoint(detector).model.eval()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    pruned = prune_to_ratio(original, 0.3, PeerSettings(importance="group-norm", steps=2)).eval()
    assert {k: v.shape for k, v in original.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(original.state_dict()[k], v) for k, v in before.items())
    yaml_path, weights = save_pruned(pruned, tmp_path / "p.yaml", "test", names=NAMES)
    reloaded = load_checkpoint(weights).model.eval()
    rebuilt = build_model(yaml_path).eval()
    rebuilt.load_state_dict(reloaded.state_dict())
    image = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pruned(image)
        for model in (reloaded, rebuilt):
            got = model(image)
            assert torch.allclose(got[0], expected[0], atol=1e-5)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got[1], expected[1], strict=True))
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in original.parameters())


def test_l1_importance_keeps_the_filters_with_the_largest_l1_norm(detector):
    """``l1`` is classic filter pruning: in one step the stem keeps the filters whose own L1 norm is largest
    (the first layer of the group decides), in their original order."""
    original = load_checkpoint(detector).model.eval()
    pruned = prune_to_ratio(original, 0.5, PeerSettings(importance="l1", steps=1))
    weight = original.model[0].conv.weight
    kept = pruned.model[0].conv.weight.shape[0]
    assert kept == weight.shape[0] // 2
    top = weight.abs().sum(dim=(1, 2, 3)).topk(kept).indices.sort().values
    assert torch.equal(pruned.model[0].conv.weight, weight[top])


def test_search_lands_on_any_falling_measure_or_says_it_cannot(detector):
    """The bisection is generic (FLOPs share, latency): on the parameter share it lands within tolerance, and a
    budget below what the largest ratio reaches is refused with the value it got."""
    original = load_checkpoint(detector).model.eval()
    full = sum(p.numel() for p in original.parameters())

    def share(model: torch.nn.Module) -> float:
        return sum(p.numel() for p in model.parameters()) / full

    settings = PeerSettings(importance="l2", steps=1, tolerance=0.03)
    found = search_ratio(original, settings, share, 0.6)
    assert abs(found.value - 0.6) <= 0.03 and found.value == pytest.approx(share(found.model))
    assert 1 <= found.trials <= settings.iterations
    with pytest.raises(PeerBudgetError, match="at the largest ratio"):
        search_ratio(original, PeerSettings(steps=1, max_ratio=0.2), share, 0.1)
