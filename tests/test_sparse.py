"""Network Slimming sparse training (issue 23): which gammas are penalised, the exact gradient term, its decay,
and a short --sparse run on the embedded sample that switches gammas off, logged in results.csv, TensorBoard
and bn_gamma.png."""

from __future__ import annotations

import copy
import csv
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from models.yolo import ClassificationModel, DetectionModel
from utils.common.cli import run_cli
from utils.compress.prune.analysis import analyse_channels
from utils.compress.sparsity import (
    SHARE_COLUMN,
    SlimmingTarget,
    add_l1_subgradient,
    check_sparse_flags,
    prunable_batchnorm_paths,
    prunable_batchnorms,
    small_gamma_share,
    sparsity_strength,
)
from utils.runners.train import make_task
from utils.train.config import TrainConfig
from utils.train.engine import fit
from utils.weights.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample.yaml"


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_prunable_batchnorms_follow_the_dependency_groups():
    detector = DetectionModel("yolov5n.yaml", nc=6)
    assert prunable_batchnorms(detector) == _batchnorms(detector)  # Detect holds no BatchNorm
    assert len(prunable_batchnorms(detector)) == 57  # 57 Conv blocks in yolov5n (v7.0 summary: 214 layers)

    # a head keeps only its logits: its own Conv + C3 stage and its 1280-wide conv are prunable
    classifier = ClassificationModel("yolov5n-mcls-m.yaml")
    assert len(_batchnorms(classifier.model[-1])) > 0
    assert prunable_batchnorms(classifier) == _batchnorms(classifier)

    # CBAM keeps its channels (its spatial gate averages over them): the C3 outputs feeding a CBAM are not ranked
    cbam = DetectionModel(ROOT / "models" / "zoo" / "yolov5x-p2-cbam.yaml", depth_multiple=0.33, width_multiple=0.25)
    ranked = {id(bn) for bn in prunable_batchnorms(cbam)}
    gated = [i - 1 for i, layer in enumerate(cbam.model) if type(layer).__name__ == "CBAM"]
    assert len(gated) == 6
    assert all(id(cbam.model[i].cv3.bn) not in ranked for i in gated)
    assert id(cbam.model[0].conv.bn) in ranked and 0 < len(ranked) < len(_batchnorms(cbam))


def test_strength_schedule():
    assert sparsity_strength(1e-3, "none", 7, 10) == 1e-3
    assert sparsity_strength(1e-3, "linear", 0, 5) == pytest.approx(1e-3)
    assert sparsity_strength(1e-3, "linear", 1, 5) == pytest.approx(1e-3 * (1 - 0.9 * 0.25))
    assert sparsity_strength(1e-3, "linear", 4, 5) == pytest.approx(1e-4)
    assert sparsity_strength(1e-3, "cos", 1, 5) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))))
    assert sparsity_strength(1e-3, "cos", 2, 5) == pytest.approx(1e-3 * 0.55)
    assert sparsity_strength(1e-3, "cos", 4, 5) == pytest.approx(1e-4)


def test_l1_subgradient_is_added_exactly():
    gamma = nn.Parameter(torch.tensor([0.5, -0.25, 0.0, 2.0]))
    gamma.grad = torch.tensor([0.1, 0.1, 0.1, -0.3])
    frozen = nn.Parameter(torch.tensor([1.0]))  # no gradient (frozen layer): left alone
    add_l1_subgradient([gamma, frozen], 0.01)
    assert torch.equal(gamma.grad, torch.tensor([0.1, 0.1, 0.1, -0.3]) + torch.tensor([0.01, -0.01, 0.0, 0.01]))
    assert frozen.grad is None


class FirstStepGrads:
    """Gradients and weights as the optimizer's first step sees them (after the trainer's hooks)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def on_pretrain_routine_end(self, trainer) -> None:
        model = trainer.model

        def record(_optimizer, _args, _kwargs) -> None:
            if not self.grads:
                for name, p in model.named_parameters():
                    self.weights[name] = p.detach().clone()
                    if p.grad is not None:
                        self.grads[name] = p.grad.detach().clone()

        trainer.optimizer.register_step_pre_hook(record)


def _start_checkpoint(path: Path) -> Path:
    """yolov5n (6 classes) whose prunable gammas are spread uniformly over [0, 0.2), as gammas of a trained
    network spread: a short run can then show which of them the L1 term pushes below 0.01."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=6)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in prunable_batchnorms(model):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) * 0.2)
    return save_checkpoint(model, path)


def _run(tmp_path: Path, start: Path, name: str, sparse: float, **overrides) -> tuple[Path, FirstStepGrads]:
    # nbs=8: one optimizer step per batch of 8, 3 batches per epoch; no warm-up, so the steps use lr0 = 0.01
    cfg = TrainConfig(weights=str(start), data=str(SAMPLE), imgsz=64, batch_size=8, epochs=2, max_batches=3, workers=0,
                      device="cpu", project=str(tmp_path), name=name, exist_ok=True, seed=0, noautoanchor=True,
                      noval=True, sparse=sparse,
                      hyp_override=["warmup_epochs=0", "nbs=8"], **overrides)
    from utils.train.callbacks import default_callbacks

    probe, callbacks = FirstStepGrads(), default_callbacks()
    callbacks.add_logger(probe)
    fit(make_task(cfg), cfg, callbacks)
    return tmp_path / name, probe


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, Path, FirstStepGrads]:
    """The start checkpoint and a run from it without --sparse (what both sparse runs are compared with)."""
    tmp_path = tmp_path_factory.mktemp("plain")
    start = _start_checkpoint(tmp_path / "start.pt")
    return (start, *_run(tmp_path, start, "plain", 0.0, noplots=True))


def test_sparse_run_switches_gammas_off_and_logs_them(tmp_path, plain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    start, plain, plain_probe = plain_run
    student = load_checkpoint(start).model
    prunable = {id(bn.weight) for bn in prunable_batchnorms(student)}
    gamma_names = [name for name, p in student.named_parameters() if id(p) in prunable]
    assert len(gamma_names) == 57

    def share(checkpoint: Path) -> float:  # |gamma| < 0.01 among the prunable gammas saved in a checkpoint
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        values = torch.cat([state[name].flatten() for name in gamma_names])
        return float((values.abs() < 0.01).float().mean())

    initial_share = share(start)
    assert initial_share == pytest.approx(small_gamma_share(student))
    strength = 0.25
    sparse, sparse_probe = _run(tmp_path, start, "sparse", strength)

    # The first optimizer step of both runs sees the same task gradients (same seed, same start): --sparse adds
    # exactly S * sign(gamma) to the prunable gammas' gradients and changes nothing else.
    assert set(plain_probe.grads) == set(sparse_probe.grads) and set(gamma_names) <= set(sparse_probe.grads)
    for name, grad in sparse_probe.grads.items():
        assert torch.equal(plain_probe.weights[name], sparse_probe.weights[name]), name
        if name in gamma_names:
            expected = plain_probe.grads[name] + strength * torch.sign(sparse_probe.weights[name])
            torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
            assert not torch.equal(grad, plain_probe.grads[name])
        else:
            assert torch.equal(grad, plain_probe.grads[name]), name

    # 6 steps at lr 0.01: the L1 term drives a quarter of the gammas below 0.01, the plain run none more
    plain_share, sparse_share = share(plain / "weights" / "last.pt"), share(sparse / "weights" / "last.pt")
    assert initial_share == pytest.approx(0.0532, abs=0.002)  # U[0, 0.2): ~5 % below 0.01
    assert plain_share < initial_share + 0.03, (initial_share, plain_share)
    assert sparse_share > plain_share + 0.15, (plain_share, sparse_share)

    # every checkpoint says how sparse it was trained (best.pt holds no training state): prune_slim.py reads it
    for run, expected in ((plain, 0.0), (sparse, strength)):
        for name in ("best.pt", "last.pt"):
            assert torch.load(run / "weights" / name, weights_only=True)["sparse"] == expected

    rows = _rows(sparse)
    logged = [float(row[SHARE_COLUMN]) for row in rows]
    assert len(logged) == 2 and initial_share < logged[0] < logged[1]
    assert logged[1] == pytest.approx(sparse_share, abs=1e-6)  # the saved (EMA) model's share
    assert SHARE_COLUMN not in _rows(plain)[0]
    events = EventAccumulator(str(next(sparse.glob("events.out.tfevents.*"))), size_guidance={"histograms": 0})
    events.Reload()
    assert [e.step for e in events.Scalars(SHARE_COLUMN)] == [0, 1]
    histograms = events.Histograms("sparsity/gamma")
    assert [h.step for h in histograms] == [0, 1]
    assert histograms[-1].histogram_value.num == sum(bn.weight.numel() for bn in prunable_batchnorms(student))
    assert (sparse / "bn_gamma.png").stat().st_size > 10_000
    assert not (plain / "bn_gamma.png").exists()


def test_sparse_remain_aims_the_penalty_at_what_prune_slim_cuts(tmp_path, plain_run):
    import prune_slim

    start, plain, plain_probe = plain_run
    model = load_checkpoint(start).model
    analysis = analyse_channels(model)
    paths = prunable_batchnorm_paths(model, analysis)
    masks = dict(zip(paths, SlimmingTarget(model, analysis, 0.5, 64).masks(model, paths), strict=True))
    aimed = sum(int(m.sum()) for m in masks.values())
    assert 0 < aimed < sum(m.numel() for m in masks.values())
    fresh = copy.deepcopy(model)  # every gamma 1, as built from scratch: no ranking, nothing aimed at yet
    for bn in prunable_batchnorms(fresh, paths):
        torch.nn.init.ones_(bn.weight)
    target = SlimmingTarget(fresh, analysis, 0.5, 64)
    assert all(not mask.any() for mask in target.masks(fresh, paths))
    with pytest.raises(ValueError, match=r"even cutting every channel to --min-keep 0\.1 keeps"):
        SlimmingTarget(model, analysis, 0.01, 64)

    # the aimed channels are exactly those prune_slim.py --remain-ratio 0.5 removes from the same model (every
    # start gamma is a distinct random value, so the pruned model's gammas say which channels it kept)
    pruned_yaml = tmp_path / "slim50.yaml"
    assert prune_slim.main(["--weights", str(start), "--data", str(SAMPLE), "--imgsz", "64", "--remain-ratio", "0.5",
                            "--calib-batches", "0", "--noval", "--path", str(pruned_yaml)]) == 0
    pruned = load_checkpoint(pruned_yaml.with_suffix(".pt")).model.model
    for path, mask in masks.items():
        gamma = model.model.get_submodule(path).weight.detach()
        kept = set(pruned.get_submodule(path).weight.detach().tolist())
        assert set(gamma[mask == 0].tolist()) == kept, path

    # the L1 term reaches only the aimed gammas; 6 steps switch most of them off and leave the others as a plain
    # run leaves them
    strength = 0.25
    run, probe = _run(tmp_path, start, "aimed", strength, sparse_remain=0.5, noplots=True)
    name_of = {id(p): name for name, p in model.named_parameters()}
    gamma_names = {name_of[id(model.model.get_submodule(path).weight)]: path for path in paths}
    for name, grad in probe.grads.items():
        expected = plain_probe.grads[name]
        if name in gamma_names:
            expected = expected + strength * torch.sign(probe.weights[name]) * masks[gamma_names[name]]
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6, msg=name)

    def small(checkpoint: Path, aimed_channels: bool) -> float:
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        values = torch.cat([state[name][(masks[path] == 1) == aimed_channels] for name, path in gamma_names.items()])
        return float((values.abs() < 0.01).float().mean())

    for aimed_channels, least, most in ((True, 0.4, 1.0), (False, -0.03, 0.03)):
        change = small(run / "weights" / "last.pt", aimed_channels) - small(plain / "weights" / "last.pt",
                                                                            aimed_channels)
        assert least < change <= most, (aimed_channels, change)


@pytest.mark.parametrize(("flags", "message"), [
    (["--sparse=-1e-4"], "--sparse -0.0001: the L1 strength on BatchNorm gammas must be >= 0"),
    (["--sparse", "nan"], "--sparse nan"),
    (["--sparse", "1e-3", "--sparse-remain", "1"], "--sparse-remain 1.0: expected the FLOPs share"),
])
def test_bad_sparse_flag_is_one_line_error(tmp_path, capsys, flags, message):
    argv = ["--cfg", "yolov5n.yaml", "--data", str(SAMPLE), "--device", "cpu", "--project", str(tmp_path), *flags]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir()), "nothing may be created before the flags are checked"


def test_adaptive_optimizers_take_the_l1_step_whatever_its_strength(caplog):
    """Why train.py warns on --sparse with Adam/AdamW: a gamma the task leaves alone (zero task gradient) moves by
    S * lr per SGD step, but by ~lr per Adam step for any S, so S cannot make gammas reach 0 sooner. The warning
    is one line for Adam and AdamW and absent for SGD."""
    def moved(optimizer_class, strength: float, steps: int = 10, lr: float = 0.01) -> float:
        gamma = nn.Parameter(torch.ones(4, dtype=torch.float64))
        optimizer = optimizer_class([gamma], lr=lr)
        for _ in range(steps):
            gamma.grad = torch.zeros_like(gamma)
            add_l1_subgradient([gamma], strength)
            optimizer.step()
        return float(1 - gamma.detach().mean())

    for strength in (1e-4, 1.0):
        assert moved(torch.optim.SGD, strength) == pytest.approx(10 * 0.01 * strength, rel=1e-5)
        assert moved(torch.optim.Adam, strength) == pytest.approx(10 * 0.01, rel=1e-3)

    for optimizer, warned in (("Adam", True), ("AdamW", True), ("SGD", False)):
        caplog.clear()
        check_sparse_flags(TrainConfig(cfg="yolov5n.yaml", data=str(SAMPLE), sparse=1e-3, optimizer=optimizer))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == warned and all(f"--optimizer {optimizer}" in w and "\n" not in w for w in warnings)
