"""Latency as the pruning budget (issue 33 point 1): a fake runtime with known per-layer costs gives the expected
plans (slimming's threshold, EagleEye's band), the per-layer table is cached, reused and invalidated, the width
multiple is measured, the flags fail in one line; and on ONNX Runtime the profile maps every conv layer and the
prediction meets the measurement at the profiled points. No test times anything: real timings only flow
through, the fake's are exact."""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import prune_eagleeye
import prune_slim
from models.yolo import build_model
from utils.common.cli import run_cli
from utils.compress.prune import eagleeye, slim
from utils.compress.prune.analysis import analyse_channels
from utils.compress.prune.cost import CostModel
from utils.compress.prune.latency import (
    PROBE_WIDTHS,
    TABLE_FILE,
    LatencySettings,
    TableCache,
    latency_model,
    measure_multiple,
    round_up,
)
from utils.compress.prune.plan import plan_from_counts
from utils.compress.prune.runtimes import RUNTIMES, Runtime, registered_runtime
from utils.compress.prune.surgery import prune_model
from utils.export.common import prepare_for_export
from utils.export.spec import Requirement
from utils.runners.prune import PruneOptions, run_prune_eagleeye, run_prune_slim
from utils.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "data" / "neu-det-sample.yaml")
IMGSZ = 64
SCALE_LEVELS = 8  # BatchNorm scales take this many values, so every slimming threshold can be tried


# ------------------------------------------------------------------------------------------- the fake runtime
def conv_macs(model: nn.Module, imgsz: int = IMGSZ) -> dict[int, float]:
    """MACs of each layer's convolutions, counted by hooks on the model itself (independent of CostModel)."""
    totals: dict[int, float] = {}
    hooks = []
    for index, layer in enumerate(model.model):
        for module in layer.modules():
            if isinstance(module, nn.Conv2d):
                def hook(conv, inputs, output, index=index):
                    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
                    totals[index] = totals.get(index, 0.0) + float(output.numel() * per_output)
                hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    for h in hooks:
        h.remove()
    return totals


def per_mac(layer: int) -> float:
    """The fake's known cost of one MAC in ``layer`` (ms): layers differ by 5x, so time is not FLOPs."""
    return (1 + 4 * (layer % 3 == 0)) * 1e-6


FREE_LAYER_MS = 0.05  # a layer without convolutions (Concat, Upsample)
UNMAPPED_MS = 0.1  # a node named after no layer
CALL_MS = 0.2  # per-call overhead no profile shows


def fake_ms(model: nn.Module) -> float:
    """The fake runtime's latency of a (prepared or not) model: the ground truth the tests check plans against."""
    macs = conv_macs(model)
    return (sum(per_mac(i) * m for i, m in macs.items()) + FREE_LAYER_MS * (len(model.model) - len(macs))
            + UNMAPPED_MS + CALL_MS)


def fake_runtime(step: int = 16, name: str = "fake") -> type[Runtime]:
    """A runtime class whose model latency is :func:`fake_ms` and whose conv probes cost one unit per ``step``
    output channels begun; ``profiled`` lists each profile call (a fresh class per test: no shared state)."""

    class Fake(Runtime):
        profiled: list[int] = []

        def version(self) -> str:
            return "fake 1.0"

        def open(self, model, example, folder, samples=None):
            return model

        def profile(self, handle, runs):
            type(self).profiled.append(1)
            macs = conv_macs(handle)
            nodes = {f"/model.{i}/conv/Conv": per_mac(i) * macs[i] if i in macs else FREE_LAYER_MS
                     for i in range(len(handle.model))}
            return {**nodes, "ReorderOutput": UNMAPPED_MS}

        def latency(self, handles, runs):
            return [fake_ms(h) if hasattr(h, "yaml") else 0.5 + math.ceil(h[0].out_channels / step)
                    for h in handles]

    Fake.name = name
    return Fake


# ------------------------------------------------------------------------------------------- the model
def quantised_model() -> nn.Module:
    """yolov5n (6 classes) whose BatchNorm scales take :data:`SCALE_LEVELS` values (seeded)."""
    torch.manual_seed(0)
    model = build_model(ROOT / "models" / "yolov5n.yaml", nc=6)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            levels = torch.randint(1, SCALE_LEVELS + 1, (module.num_features,), generator=generator)
            module.weight.data = levels.float() / SCALE_LEVELS
    return model.eval()


@functools.cache
def analysed_model():
    model = quantised_model()
    return model, analyse_channels(model, IMGSZ)


def fake_table(tmp_path: Path, runtime: Runtime, multiple: int = 8):
    model, analysis = analysed_model()
    cost = CostModel(model, analysis.groups, IMGSZ)
    settings = LatencySettings(runtime.name, IMGSZ, runtime.threads, 0.1, multiple)
    return latency_model(model, cost, analysis.groups, runtime, settings, TableCache(tmp_path / TABLE_FILE))


def pruned_with(counts: dict[int, int]) -> nn.Module:
    model, analysis = analysed_model()
    order = [torch.arange(g.size, 0, -1).float() for g in analysis.groups]
    return prune_model(model, analysis.groups, plan_from_counts(order, counts), record=False)


# ------------------------------------------------------------------------------------------- the plans
def test_latency_model_predicts_the_fake_runtime_exactly(tmp_path):
    """Per-layer costs linear in MACs, constant layers and overheads: interpolation must reproduce them for any
    plan, not just the profiled widths (and the FLOPs share must not: the layers' costs differ)."""
    model, analysis = analysed_model()
    latency = fake_table(tmp_path, fake_runtime()(2))
    assert latency.full == pytest.approx(fake_ms(model), rel=1e-9)
    generator = torch.Generator().manual_seed(3)
    differs = 0
    for _ in range(4):
        counts = {i: int(torch.randint(1, g.size + 1, (1,), generator=generator)) for i, g in
                  enumerate(analysis.groups)}
        truth = fake_ms(pruned_with(counts))
        assert latency.ms(counts) == pytest.approx(truth, rel=1e-9)
        differs += abs(latency.ratio(counts) - latency.flops_ratio(counts)) > 0.01
    assert differs  # the budget is not the FLOPs share in disguise


def test_slimming_to_a_latency_budget_finds_the_expected_threshold(tmp_path):
    """The expected threshold by exhaustion: every distinct scale tried, each plan cut for real and its fake
    latency computed; the lowest threshold within the budget is the answer."""
    model, analysis = analysed_model()
    latency = fake_table(tmp_path, fake_runtime()(2))
    scales = slim.group_scales(model.model, analysis.groups)
    asked_ms = 0.6 * latency.full
    thresholds = sorted({float(v) for s in scales for v in s})
    assert len(thresholds) <= SCALE_LEVELS
    truth = {t: fake_ms(pruned_with(slim.slimming_counts(scales, t, 0.1, 8))) for t in thresholds}
    expected = min(t for t in thresholds if truth[t] <= asked_ms)
    assert any(truth[t] > asked_ms for t in thresholds)  # the budget binds

    found = slim.budget_threshold(scales, latency, asked_ms / latency.full, 0.1, 8)
    assert found == expected
    counts = slim.slimming_counts(scales, found, 0.1, 8)
    assert counts == slim.slimming_counts(scales, expected, 0.1, 8)
    assert latency.ms(counts) == pytest.approx(truth[expected], rel=1e-9) and truth[expected] <= asked_ms


def test_eagleeye_candidates_lie_in_the_latency_band(tmp_path):
    """Every candidate's fake latency (cut for real) is within --delta of the asked share; its FLOPs share,
    recorded beside, is another number."""
    model, analysis = analysed_model()
    latency = fake_table(tmp_path, fake_runtime()(2))
    settings = eagleeye.SearchSettings(remain_ratio=0.7, delta=0.02, max_iter=4, multiple=8,
                                       budget_flag="--speedup 1.43")
    calibration = [torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))]
    candidates = eagleeye.search(model, analysis.groups, latency, calibration, lambda candidate: 0.0, settings)
    assert len(candidates) == 4
    for candidate in candidates:
        measured = fake_ms(pruned_with(candidate.counts)) / fake_ms(model)
        assert abs(measured - 0.7) <= 0.02
        assert candidate.budget_ratio == pytest.approx(measured, rel=1e-9)
        assert candidate.flops_ratio == pytest.approx(latency.cost.ratio(candidate.counts))


# ------------------------------------------------------------------------------------------- the cache
def test_table_is_cached_reused_and_invalidated(tmp_path, caplog):
    runtime_class = fake_runtime()
    first = fake_table(tmp_path, runtime_class(2))
    measured_once = len(runtime_class.profiled)
    assert measured_once == len(first.points) == 4  # 100/75/50/25 %
    stored = json.loads((tmp_path / TABLE_FILE).read_text())["entries"]
    assert [e["kind"] for e in stored] == ["table"]
    assert stored[0]["key"]["runtime"] == "fake" and stored[0]["key"]["threads"] == 2
    assert stored[0]["key"]["imgsz"] == IMGSZ and stored[0]["key"]["version"] == "fake 1.0"

    again = fake_table(tmp_path, runtime_class(2))
    assert len(runtime_class.profiled) == measured_once  # read, not measured
    assert [p.ms for p in again.points] == [p.ms for p in first.points]

    with caplog.at_level(logging.INFO):
        fake_table(tmp_path, runtime_class(3))
    assert len(runtime_class.profiled) == 2 * measured_once
    assert "threads 2 (now 3): measuring again" in caplog.text
    assert len(json.loads((tmp_path / TABLE_FILE).read_text())["entries"]) == 2  # the older table is kept


def test_width_multiple_follows_the_runtimes_steps(tmp_path, caplog):
    model, analysis = analysed_model()
    cache = TableCache(tmp_path / TABLE_FILE)
    with caplog.at_level(logging.INFO):
        assert measure_multiple(model, analysis.groups, fake_runtime(step=16)(2), IMGSZ, cache) == 16
    assert "width multiple on fake: 16" in caplog.text and "16: 1.000" in caplog.text  # what was measured is logged
    stored = [e for e in json.loads((tmp_path / TABLE_FILE).read_text())["entries"] if e["kind"] == "multiple"]
    assert sorted(int(w) for w in stored[0]["ms"]) == sorted(PROBE_WIDTHS)
    assert all(round_up(w, m) in PROBE_WIDTHS for w in PROBE_WIDTHS for m in (1, 4, 8, 16, 32))
    other = fake_runtime(step=8, name="fake8")
    assert measure_multiple(model, analysis.groups, other(2), IMGSZ, cache) == 8


# ------------------------------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latency") / "quantised.pt"
    save_checkpoint(quantised_model(), path)
    return path


def test_slim_tool_prunes_to_a_speedup_on_a_registered_runtime(checkpoint, tmp_path):
    """End to end: --speedup on the fake runtime, --round measured (16), the prediction met exactly by the
    fake's measurement of the saved model, the budget recorded; a second run reads the table."""
    runtime_class = fake_runtime()
    options = PruneOptions(weights=str(checkpoint), data=SAMPLE, path=str(tmp_path / "a.yaml"), imgsz=IMGSZ,
                           workers=0, noval=True, runtime="fake", speedup=1.4)
    with registered_runtime(runtime_class):
        result = run_prune_slim(options, None, None)
        latency = result.latency
        assert latency["multiple"] == 16 and latency["budget"] == "--speedup 1.4"
        assert latency["asked_ms"] == pytest.approx(latency["unpruned_ms"] / 1.4)
        assert latency["measured_ms"] <= latency["asked_ms"] and latency["measured_speedup"] >= 1.4
        assert latency["gap_predicted"] == pytest.approx(0, abs=1e-9)
        profiled = len(runtime_class.profiled)
        run_prune_slim(PruneOptions(**{**options.__dict__, "path": str(tmp_path / "b.yaml")}), None, None)
        assert len(runtime_class.profiled) == profiled  # the table beside --path was reused
    from utils.weights.checkpoint import load_checkpoint

    saved = load_checkpoint(result.weights_path)
    assert saved.meta["pruned"]["speedup"] == 1.4 and saved.meta["pruned"]["runtime"] == "fake"
    assert saved.meta["latency"]["measured_ms"] == pytest.approx(fake_ms(saved.model))
    for module in saved.model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_features % 16 == 0


def test_eagleeye_tool_writes_predicted_latency(checkpoint, tmp_path):
    path = tmp_path / "ee.yaml"
    with registered_runtime(fake_runtime()):
        code = run_cli(prune_eagleeye.main, [
            "--weights", str(checkpoint), "--data", SAMPLE, "--imgsz", str(IMGSZ), "--runtime", "fake",
            "--latency-ms", str(0.75 * fake_ms(quantised_model())), "--round", "8", "--delta", "0.03",
            "--max-iter", "2", "--calib-batches", "1", "--batch-size", "4", "--score-images", "4", "--workers", "0",
            "--noval", "--path", str(path)])
    assert code == 0
    rows = list(csv.DictReader(path.with_name("ee_candidates.csv").open()))
    assert len(rows) == 2 and all(abs(float(r["latency_ratio"]) - 0.75) <= 0.03 for r in rows)


def test_flops_budget_stays_and_latency_is_reported(checkpoint, tmp_path):
    with registered_runtime(fake_runtime()):
        result = run_prune_slim(PruneOptions(weights=str(checkpoint), data=SAMPLE, path=str(tmp_path / "f.yaml"),
                                             imgsz=IMGSZ, workers=0, noval=True, runtime="fake", multiple=8), None,
                                0.5)
    assert result.latency["asked_ms"] is None and result.latency["gap_predicted"] == pytest.approx(0, abs=1e-9)
    assert result.latency["multiple"] == 8  # --round given wins over the measured multiple


# ------------------------------------------------------------------------------------------- the flags
@pytest.mark.parametrize("tool,args,message", [
    (prune_slim, ["--latency-ms", "10"], "--latency-ms 10 needs --runtime (onnxruntime|openvino|openvino-int8"),
    (prune_eagleeye, ["--speedup", "1.5"], "--speedup 1.5 needs --runtime"),
    (prune_slim, ["--speedup", "1.5", "--runtime", "tensorrt"], "--runtime tensorrt: unknown runtime; choose from"),
    (prune_slim, ["--speedup", "1", "--runtime", "onnxruntime"], "--speedup 1.0: expected a speed-up above 1"),
    (prune_eagleeye, ["--latency-ms", "0", "--runtime", "openvino"], "--latency-ms 0.0: expected milliseconds"),
    (prune_slim, ["--speedup", "2", "--runtime", "onnxruntime", "--threads", "0"], "--threads 0: expected 1"),
    (prune_slim, ["--speedup", "2", "--remain-ratio", "0.5", "--runtime", "onnxruntime"], "not allowed with"),
    (prune_eagleeye, ["--latency-ms", "5", "--speedup", "2", "--runtime", "openvino"], "not allowed with"),
    (prune_eagleeye, ["--runtime", "openvino"], "one of the arguments --remain-ratio --latency-ms --speedup"),
    (prune_slim, ["--speedup", "2", "--runtime", "missing"], "--runtime missing needs the 'no_such_package_"),
])
def test_bad_latency_flags_end_in_one_line_before_loading(tmp_path, capsys, tool, args, message):
    """The weights file is not a checkpoint: any check that came after loading would fail differently."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a checkpoint")
    missing = fake_runtime(name="missing")
    missing.requires = (Requirement("no_such_package_for_latency", "pip install it"),)
    with registered_runtime(missing):
        code = run_cli(tool.main, ["--weights", str(weights), "--data", SAMPLE, "--path", str(tmp_path / "p.yaml"),
                                   *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_library_callers_get_the_same_checks(tmp_path):
    from utils.common.errors import UserError

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    both = PruneOptions(weights=str(weights), data=SAMPLE, path=str(tmp_path / "p.yaml"), runtime="onnxruntime",
                        latency_ms=5, speedup=2)
    with pytest.raises(UserError, match="--latency-ms and --speedup are two budgets"):
        run_prune_slim(both, None, None)
    none = PruneOptions(weights=str(weights), data=SAMPLE, path=str(tmp_path / "p.yaml"))
    with pytest.raises(UserError, match="give a budget: one of --remain-ratio, --latency-ms, --speedup"):
        run_prune_eagleeye(none, eagleeye.SearchSettings(remain_ratio=None, delta=0.02, max_iter=1), 1, 1)
    assert "fake" not in RUNTIMES.names()


# ------------------------------------------------------------------------------------------- a real runtime
def test_onnxruntime_profile_maps_every_conv_layer(tmp_path):
    """ONNX Runtime's session profile, node names mapped to the YAML layers: every layer holding a convolution
    has a time at every point, and the prediction at the profiled widths is the measured total."""
    pytest.importorskip("onnxruntime")
    model, _ = analysed_model()
    runtime = RUNTIMES.create("onnxruntime", 1)
    latency = fake_table(tmp_path, runtime)
    conv_layers = set(conv_macs(prepare_for_export(model)))
    assert conv_layers and len(latency.points) == 4
    for point in latency.points:
        assert conv_layers <= set(point.layers), conv_layers - set(point.layers)
        assert latency.ms(point.counts) == pytest.approx(point.ms, rel=1e-9)
        assert point.ms > 0 and sum(point.layers.values()) > 0
