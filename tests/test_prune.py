"""Channel pruning (issue 23) on every shipped model YAML: exact where it must be, and pruned models that train,
save, reload and export like any other; the cost model, the slimming and EagleEye plans, and what stays whole."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from conftest import flat_tensors
from torch import nn

from models.channels import widths_table
from models.yolo import build_model
from utils.compress.prune.analysis import analyse_channels
from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import ChannelAnalysis, batchnorm_members, declared_constraints
from utils.compress.prune.plan import keep_count, plan_from_counts
from utils.compress.prune.surgery import prune_model
from utils.weights.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
ALL_YAMLS = sorted(str(p.relative_to(MODELS)) for p in [*MODELS.glob("*.yaml"), *MODELS.glob("*/*.yaml")])
LARGE = ("yolov5m", "yolov5l", "yolov5x")  # built at depth 0.33 / width 0.25: same operators, a fraction of the size
IMGSZ = 64


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Scales, shifts and statistics far from the defaults, so that a wrongly cut channel shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.2
            module.running_mean = torch.randn(n, generator=generator) * 0.2
            module.running_var = torch.rand(n, generator=generator) * 1.5 + 0.5


@functools.cache
def analysed(name: str) -> tuple[nn.Module, ChannelAnalysis]:
    """The YAML's model (compact for the large ones) with random BatchNorms, and its channel analysis."""
    from models.yaml_config import load_model_yaml

    cfg = load_model_yaml(MODELS / name)
    if any(Path(name).name.startswith(prefix) for prefix in LARGE):
        cfg["depth_multiple"], cfg["width_multiple"] = 0.33, 0.25
    torch.manual_seed(0)
    model = build_model(cfg)
    randomise_batchnorm(model)
    model.eval()
    return model, analyse_channels(model, IMGSZ)


def images(batch: int = 2, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, channels, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_pruning_removes_exactly_the_zeroed_channels(name):
    """Zero gamma and beta of a random third of every group's channels (in all of the group's BatchNorms), cut
    exactly those channels: the outputs equal the unpruned model's (float64), and the pruned model rebuilt from
    its YAML alone plus its state_dict gives the same outputs bit for bit."""
    base, analysis = analysed(name)
    assert analysis.groups, f"{name}: nothing prunable"
    model = copy.deepcopy(base).double()
    generator = torch.Generator().manual_seed(2)
    keep = {}
    for number, group in enumerate(analysis.groups):
        order = torch.randperm(group.size, generator=generator)
        dropped = order[: max(group.size // 3, 1)] if group.size > 1 else order[:0]
        keep[number] = order[len(dropped):].sort().values
        for member, bn in batchnorm_members(group, model.model):
            positions = member.index[torch.isin(member.root, dropped)]
            bn.weight.data[positions] = 0
            bn.bias.data[positions] = 0
    x = images(dtype=torch.float64)
    with torch.no_grad():
        reference = flat_tensors(model(x))
        pruned = prune_model(model, analysis.groups, keep)
        result = flat_tensors(pruned(x))
        rebuilt = build_model(pruned.yaml).double().eval()
        rebuilt.load_state_dict(pruned.state_dict())
        again = flat_tensors(rebuilt(x))
    assert count(pruned) < count(model)
    for ref, out, out2 in zip(reference, result, again, strict=True):
        assert ref.shape == out.shape
        assert (ref - out).abs().max() <= 1e-5
        assert torch.equal(out, out2)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomly_pruned(name: str) -> tuple[nn.Module, nn.Module, dict[int, int]]:
    """(unpruned model, the model pruned to random widths rounded to 8, the kept count per group)."""
    base, analysis = analysed(name)
    generator = torch.Generator().manual_seed(3)
    counts = {i: keep_count(float(torch.empty(1).uniform_(0.2, 0.9, generator=generator)) * g.size, g.size, 0.1, 8)
              for i, g in enumerate(analysis.groups)}
    scores = [torch.rand(g.size, generator=generator) for g in analysis.groups]
    return base, prune_model(base, analysis.groups, plan_from_counts(scores, counts)), counts


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_random_pruning_keeps_declared_channels_reloads_and_exports(name, tmp_path):
    """Random widths (rounded to 8): what the registry keeps whole keeps its widths, every group keeps a
    multiple of 8 (or all) of its channels, and the saved checkpoint reloads with the safe loader and exports to
    ONNX, where ONNX Runtime reproduces PyTorch (the one ONNX export of each shipped YAML in the suite)."""
    base, pruned, counts = randomly_pruned(name)
    for i, group in enumerate(analysed(name)[1].groups):
        assert counts[i] % 8 == 0 or counts[i] == group.size
    changed = widths_table(base.model, pruned.model)
    protected = declared_constraints(base.model)
    assert not set(changed) & protected.whole
    assert all(path not in protected.fixed_outputs or pruned.model.get_submodule(path).weight.shape[0]
               == base.model.get_submodule(path).weight.shape[0] for path in changed)

    checkpoint = save_checkpoint(pruned.eval(), tmp_path / "pruned.pt", None)
    loaded = load_checkpoint(checkpoint).model.eval()
    x = images(batch=1, channels=pruned.yaml.get("ch", 3))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(flat_tensors(pruned(x)), flat_tensors(loaded(x))))
    _exports_and_matches(checkpoint, tmp_path)


@pytest.mark.parametrize("name", ["yolov5s.yaml", "cls/yolov5n-mcls-l.yaml"])
def test_pruned_model_trains_one_step(name):
    """A pruned detector and a pruned multi-head classifier (whose head stages are pruned too) train: every
    parameter gets a finite gradient and the step changes them. The zoo YAMLs' own training step is in
    tests/test_zoo.py; the exactness test above proves every shipped YAML's pruned forward pass."""
    _, model, _ = randomly_pruned(name)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = images(batch=2, channels=model.yaml.get("ch", 3))
    loss = sum(t.float().square().mean() for t in flat_tensors(model(x)))
    assert torch.isfinite(loss)
    loss.backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{key}: no finite gradient"
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    unchanged = [k for (k, p), a in zip(model.named_parameters(), before) if torch.equal(a, p)]
    assert not unchanged, f"the step left {unchanged} as they were"


def _exports_and_matches(checkpoint: Path, tmp_path: Path) -> None:
    from utils.export import ExportOptions, export_model
    from utils.export.registry import load_backend

    artifacts = export_model(ExportOptions(weights=checkpoint, include=("onnx",), imgsz=(IMGSZ, IMGSZ),
                                         output_dir=tmp_path))
    model = load_checkpoint(checkpoint).model.eval()
    x = images(batch=1, channels=model.yaml.get("ch", 3))
    with torch.no_grad():
        reference = model(x)
    reference = reference[0] if isinstance(reference, tuple) else reference
    result = load_backend(artifacts["onnx"])(x)
    for ref, out in zip(flat_tensors(reference), flat_tensors(result), strict=True):
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)


def test_cost_model_counts_the_pruned_models_macs():
    """The cost of a plan computed from widths equals the conv and linear MACs measured on the pruned model."""
    model, analysis = analysed("yolov5s.yaml")
    cost = CostModel(model, analysis.groups, 128)
    counts = {i: keep_count(0.5 * g.size, g.size, 0.1, 8) for i, g in enumerate(analysis.groups)}
    pruned = prune_model(model, analysis.groups, plan_from_counts([torch.arange(g.size).float()
                                                                   for g in analysis.groups], counts))
    assert cost.macs(counts) == measured_macs(pruned, 128)
    assert cost.full == measured_macs(model, 128)
    assert 0.2 < cost.ratio(counts) < 0.4  # half the channels: about a quarter of the MACs


def measured_macs(model: nn.Module, imgsz: int) -> float:
    """Independent count: a forward hook on every conv and linear layer of the real model."""
    total = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total.append(output.numel() * module.in_channels // module.groups * kh * kw)
        else:
            total.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    for h in hooks:
        h.remove()
    return float(sum(total))


def test_blocks_declared_whole_report_why():
    """Swin (C3STR's stage), CBAM, SKAttention and ShuffleNet units keep their channels and the report names
    the layers and the block that keeps them."""
    cases = {"zoo/yolov5s-c3str.yaml": "C3STR", "zoo/yolov5x-p2-cbam.yaml": "CBAM",
             "zoo/yolov5s-skattention-p2.yaml": "SKAttention", "zoo/yolov5s-shufflenetv2.yaml": "ShuffleBlock",
             "zoo/yolov5x-tph.yaml": "TransformerBlock"}
    for name, block in cases.items():
        model, analysis = analysed(name)
        reasons = {reason for layer_reasons in analysis.kept_whole.values() for reason in layer_reasons}
        assert any(reason.startswith(f"{block} keeps its channels") for reason in reasons), (name, reasons)
        whole_layers = [i for i, layer in enumerate(model.model)
                        if any(type(m).__name__ == block for m in layer.modules())]
        assert whole_layers and set(whole_layers) & set(analysis.kept_whole)


def test_eagleeye_scores_a_seeded_sample_spread_over_the_validation_split():
    """Scoring on the first files would score NEU-DET's sorted val split on its first classes only."""
    from utils.tasks import TaskOptions, build_task, model_info

    model = build_model(MODELS / "yolov5n.yaml", nc=6)
    sample = str(ROOT / "data" / "neu-det-sample.yaml")

    def score_files(seed: int) -> list[str]:
        task = build_task("detect", sample, TaskOptions(imgsz=64, batch_size=2, workers=0, seed=seed))
        task.check_model(model_info(model), "yolov5n.yaml")
        return [str(path) for batch in task.sample_batches(6) for path in batch[2]][:6]

    first = score_files(0)
    assert score_files(0) == first and len(first) == 6  # the same sample for the same seed
    assert score_files(1) != first
    sorted_first = sorted(Path(f).name for f in (ROOT / "data" / "neu-det-sample" / "images" / "val").iterdir())[:6]
    assert sorted(Path(f).name for f in first) != sorted_first
    assert len({Path(f).name.rsplit("_", 1)[0] for f in first}) >= 3  # several classes, not two
