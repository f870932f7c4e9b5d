"""Model core: every model YAML, exact published sizes, bad YAMLs, activations (the per-block registry contract
is tests/test_registry.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from models.activations import activation_scope, make_activation
from models.yaml_config import ModelConfigError, load_model_yaml
from models.yolo import DetectionModel, build_model
from utils.common.torch_utils import count_parameters, model_gflops

ROOT = Path(__file__).resolve().parents[1]

# v7.0 model summaries, nc=80, 640x640 (../shared/fixtures/README.md, issue 2)
OFFICIAL = {
    "yolov5n": (1_872_157, 4.6, 1_867_405, 4.5),
    "yolov5s": (7_235_389, 16.6, 7_225_885, 16.4),
    "yolov5m": (21_190_557, 49.2, 21_172_173, 48.9),
    "yolov5l": (46_563_709, 109.6, 46_533_693, 109.0),
    "yolov5x": (86_749_405, 206.3, 86_705_005, 205.5),
}

# Every detection YAML under models/ and models/hub/ built with its own nc: pinned parameter counts.
PINNED = {  # P6 models agree with v7.0's published 3.2/12.6/35.7/76.8/140.7 M
    "hub/yolov5-p2.yaml": 47_493_372,
    "hub/yolov5-v3-style.yaml": 1_830_819,
    "hub/yolov5n6.yaml": 3_246_940,
    "hub/yolov5s6.yaml": 12_626_620,
    "hub/yolov5m6.yaml": 35_731_932,
    "hub/yolov5l6.yaml": 76_770_172,
    "hub/yolov5x6.yaml": 140_794_780,
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_sizes(name):
    params, gflops, fused_params, fused_gflops = OFFICIAL[name]
    model = DetectionModel(f"{name}.yaml")
    assert count_parameters(model) == params
    assert round(model_gflops(model, 640), 1) == gflops
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 128, 128))[0].shape == (1, 3 * (16**2 + 8**2 + 4**2), 85)
    model.fuse()
    assert count_parameters(model) == fused_params
    assert round(model_gflops(model, 640), 1) == fused_gflops


@pytest.mark.parametrize("rel", list(PINNED))
def test_hub_yaml_builds_forward_and_pinned_params(rel):
    model = DetectionModel(ROOT / "models" / rel)
    assert count_parameters(model) == PINNED[rel]
    model.eval()
    with torch.no_grad():
        pred, raw = model(torch.rand(1, 3, 128, 128))
    head = model.model[-1]
    cells = sum(head.na * (128 // int(s)) ** 2 for s in head.stride)
    assert pred.shape == (1, cells, head.no)
    assert len(raw) == head.nl


def test_legacy_fixture_yaml_param_count(fixtures_dir):
    assert count_parameters(DetectionModel(fixtures_dir / "legacy-v3-style.yaml")) == 1_830_819


def test_strides_and_anchor_units():
    model = DetectionModel("yolov5s.yaml", nc=3)
    head = model.model[-1]
    assert head.stride.tolist() == [8.0, 16.0, 32.0]
    # anchors are stored in grid units: pixels / stride
    assert torch.allclose(head.anchors[0, 0], torch.tensor([10 / 8, 13 / 8]))
    assert torch.allclose(head.anchors[2, 2], torch.tensor([373 / 32, 326 / 32]))
    assert head.nc == 3 and head.no == 8


def test_bias_priors():
    model = DetectionModel("yolov5n.yaml", nc=80)
    head = model.model[-1]
    bias = head.m[0].bias.view(head.na, -1)
    # a freshly built conv bias is U(-1/sqrt(fan_in), +) around 0; the prior shifts it by log(8 / (640/8)^2)
    fan_in = head.m[0].in_channels
    expected_obj = torch.log(torch.tensor(8 / (640 / 8) ** 2))
    assert (bias[:, 4] - expected_obj).abs().max() <= 1 / fan_in**0.5 + 1e-6


def test_train_and_eval_output_layouts():
    model = DetectionModel("yolov5n.yaml", nc=6)
    x = torch.rand(2, 3, 96, 128)
    model.train()
    raw = model(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 12, 16, 11), (2, 3, 6, 8, 11), (2, 3, 3, 4, 11)]
    model.eval()
    with torch.no_grad():
        pred, raw_eval = model(x)
    assert pred.shape == (2, 3 * (12 * 16 + 6 * 8 + 3 * 4), 11)
    assert [r.shape for r in raw_eval] == [r.shape for r in raw]


def test_fuse_keeps_outputs():
    model = DetectionModel("yolov5n.yaml", nc=6).eval()
    for m in model.modules():  # non-trivial BN statistics so that fusion has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)[0]
        after = model.fuse()(x)[0]
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name, batchnorms", [("yolov5s-mobilenetv3s", 57), ("yolov5s-shufflenetv2", 49)])
def test_fuse_folds_every_batchnorm_of_zoo_detectors(name, batchnorms):
    """The zoo blocks keep BatchNorms outside Conv blocks (ShuffleNetV2's branch Sequentials, its stem's ``bn``):
    fuse() folds them all, found from the graph, and the outputs stay those of the unfused model within float32
    rounding (atol 1e-3 + rtol 1e-4, as above; measured max 2e-3 on box values up to 1.4e3, while leaving out one
    BatchNorm, every fourth tried, moves them by 9 px or more with these weights)."""
    from conftest import spread_weights

    model = spread_weights(DetectionModel(ROOT / "models" / "zoo" / f"{name}.yaml", width_multiple=0.25, nc=2))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batchnorms
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        before = model.eval()(x)[0]
        after = model.fuse()(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-4)


class _Branches(nn.Module):
    """One foldable pair (``stem``) next to each kind the rule must leave alone."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)  # a biased conv folds too
        self.side, self.side_bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)  # output also added
        self.twice, self.twice_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)  # the conv runs twice
        self.reflect, self.reflect_bn = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8)
        self.cat_bn = nn.BatchNorm2d(24)  # fed by a concatenation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem_bn(self.stem(x)).relu()
        z = self.side(y)
        branches = (self.side_bn(z) + z, self.twice_bn(self.twice(self.twice(y))), self.reflect_bn(self.reflect(y)))
        return self.cat_bn(torch.cat(branches, 1))


def test_fold_takes_only_convs_read_by_their_batchnorm_alone():
    from conftest import spread_weights

    from models.fusion import ConvBN, conv_bn_pairs, fold_conv_bn

    model = spread_weights(_Branches()).eval()
    x = torch.rand(1, 3, 16, 16)
    pairs = conv_bn_pairs(model, x)
    assert pairs == [ConvBN("stem", "stem_bn")]
    with torch.no_grad():
        before = model(x)
        after = fold_conv_bn(model, pairs)(x)
    assert isinstance(model.stem_bn, nn.Identity)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)] == [
        "side_bn", "twice_bn", "reflect_bn", "cat_bn"]
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- YAML mistakes (block contract: test_registry.py)
def test_registry_lists_known_modules_on_unknown_name(tmp_path):
    cfg = load_model_yaml("yolov5n.yaml")
    cfg["backbone"][2][2] = "C3x"
    with pytest.raises(ModelConfigError, match=r"layer 2: unknown module 'C3x'; known: .*C3"):
        DetectionModel(cfg)


def test_bad_from_index_names_layer():
    cfg = load_model_yaml("yolov5n.yaml")
    cfg["head"][2][0] = [-1, 30]  # layer 12 concatenates a layer that does not exist yet
    with pytest.raises(ModelConfigError, match=r"layer 12: 'from' index 30"):
        DetectionModel(cfg)


def test_wrong_argument_count_shows_signature():
    cfg = load_model_yaml("yolov5n.yaml")
    cfg["backbone"][9][3] = [1024, 5, 1, 2, 3]  # SPPF takes (c1, c2, k)
    with pytest.raises(ModelConfigError, match=r"layer 9 \(SPPF.*expected SPPF\(c1: 'int', c2: 'int', k: 'int' = 5\)"):
        DetectionModel(cfg)


def test_missing_nc_and_anchors():
    cfg = load_model_yaml("yolov5n.yaml")
    del cfg["nc"]
    with pytest.raises(ModelConfigError, match="no 'nc'"):
        DetectionModel(cfg)
    cfg = load_model_yaml("yolov5n.yaml")
    del cfg["anchors"]
    with pytest.raises(ModelConfigError, match=r"layer 24: uses 'anchors'"):
        DetectionModel(cfg)


def test_broken_yaml_file_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("nc: 3\nbackbone: [[-1, 1, Conv, [16, 3, 2]]\nhead: [", encoding="utf-8")
    with pytest.raises(ModelConfigError, match=r"broken\.yaml"):
        DetectionModel(path)


def test_row_shape_checked():
    cfg = load_model_yaml("yolov5n.yaml")
    cfg["backbone"][3] = [-1, 1, "Conv"]
    with pytest.raises(ModelConfigError, match="layer 3: expected \\[from, n, module, args\\]"):
        DetectionModel(cfg)


def test_yaml_strings_are_never_evaluated():
    cfg = load_model_yaml("yolov5n.yaml")
    cfg["backbone"][0][3] = ["__import__('os').getcwd()", 6, 2, 2]
    with pytest.raises(ModelConfigError):
        DetectionModel(cfg)


def test_activation_per_model_does_not_leak():
    cfg = load_model_yaml("yolov5n.yaml")
    cfg["activation"] = "nn.LeakyReLU(0.1)"
    leaky = DetectionModel(copy.deepcopy(cfg), nc=2)
    default = DetectionModel("yolov5n.yaml", nc=2)
    assert isinstance(leaky.model[0].act, nn.LeakyReLU) and leaky.model[0].act.negative_slope == 0.1
    assert isinstance(default.model[0].act, nn.SiLU)
    with activation_scope("nn.Hardswish()"):
        assert isinstance(make_activation(), nn.Hardswish)
    assert isinstance(make_activation(), nn.SiLU)


def test_overrides_from_code():
    model = DetectionModel("yolov5s.yaml", nc=7, depth_multiple=0.33, width_multiple=0.25)
    assert model.nc == 7 and count_parameters(model) == count_parameters(DetectionModel("yolov5n.yaml", nc=7))


def test_build_model_picks_detector():
    assert isinstance(build_model("yolov5n.yaml", nc=2), DetectionModel)


def test_backbone_indices():
    assert DetectionModel("yolov5n.yaml").backbone_indices() == list(range(10))
