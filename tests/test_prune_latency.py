"""Latency as the pruning budget (issue 33 point 1): a fake runtime with known per-layer costs gives the expected
plans (slimming's threshold, EagleEye's band), the per-layer table is cached, reused and invalidated, the width
multiple is measured, a missing runtime package is one error line (the flags' checks are rows of
tests/test_bad_inputs.py); on ONNX Runtime the profile maps every conv layer and the prediction meets the
measurement at the profiled points. And slimming's BatchNorm-scale mass report and warning (point 2b). No test
times anything: real timings only flow through, the fake's are exact."""

from __future__ import annotations

import copy
import csv
import functools
import json
import logging
import math
import random
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import prune_eagleeye
import prune_slim
from models.yolo import build_model
from tests.fake_runtimes import conv_macs, fake_ms, fake_runtime
from tests.tiny_detector import TINY
from utils.common.cli import run_cli
from utils.common.errors import UserError
from utils.common.torch_utils import count_parameters
from utils.compress.prune import eagleeye, slim
from utils.compress.prune import latency as latency_module
from utils.compress.prune import runtimes as runtimes_module
from utils.compress.prune.analysis import analyse_channels
from utils.compress.prune.cost import CostModel
from utils.compress.prune.groups import batchnorm_members
from utils.compress.prune.latency import (
    PROBE_REPEATS,
    PROBE_WIDTHS,
    TABLE_FILE,
    LatencySettings,
    TableCache,
    choose_multiple,
    latency_model,
    measure_multiple,
    round_up,
)
from utils.compress.prune.plan import plan_from_counts
from utils.compress.prune.runtimes import RUNTIMES, Runtime, registered_runtime
from utils.compress.prune.surgery import prune_model
from utils.export.common import prepare_for_export
from utils.export.spec import Requirement
from utils.runners import prune as prune_runner
from utils.runners.prune import (
    LANDING_TOLERANCE,
    MASS_SHARE_WARNING,
    PruneOptions,
    report_scale_mass,
    run_prune_eagleeye,
    run_prune_slim,
)
from utils.weights.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "data" / "neu-det-sample.yaml")
IMGSZ = 64
SCALE_LEVELS = 6  # BatchNorm scales take this many values, so every slimming threshold can be tried


# ------------------------------------------------------------------------------------------- the model
def quantised_model() -> nn.Module:
    """:data:`TINY` whose BatchNorm scales take :data:`SCALE_LEVELS` values (seeded): dense, not sparse."""
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(TINY))
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


def fake_table(folder: Path, runtime: Runtime, multiple: int = 8):
    model, analysis = analysed_model()
    cost = CostModel(model, analysis.groups, IMGSZ)
    settings = LatencySettings(runtime.name, IMGSZ, runtime.threads, 0.1, multiple)
    return latency_model(model, cost, analysis.groups, runtime, settings, TableCache(folder / TABLE_FILE))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> SimpleNamespace:
    """One table measured on a fake runtime (profiled 4 times), shared by the tests that read it."""
    runtime_class = fake_runtime()
    folder = tmp_path_factory.mktemp("table")
    return SimpleNamespace(runtime_class=runtime_class, folder=folder, latency=fake_table(folder, runtime_class(2)))


def pruned_with(counts: dict[int, int]) -> nn.Module:
    model, analysis = analysed_model()
    order = [torch.arange(g.size, 0, -1).float() for g in analysis.groups]
    return prune_model(model, analysis.groups, plan_from_counts(order, counts), record=False)


def bn_mass(model: nn.Module) -> float:
    """Sum of |gamma| over every BatchNorm of ``model`` (every one is prunable in :data:`TINY`)."""
    return sum(float(m.weight.detach().abs().double().sum()) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


# ------------------------------------------------------------------------------------------- the plans
def test_latency_model_predicts_the_fake_runtime_exactly(measured):
    """Per-layer costs linear in MACs, constant layers and overheads: interpolation must reproduce them for any
    plan, not just the profiled widths (and the FLOPs share must not: the layers' costs differ)."""
    model, analysis = analysed_model()
    latency = measured.latency
    assert latency.full == pytest.approx(fake_ms(model), rel=1e-9)
    generator = torch.Generator().manual_seed(3)
    differs = 0
    for _ in range(3):
        counts = {i: int(torch.randint(1, g.size + 1, (1,), generator=generator)) for i, g in
                  enumerate(analysis.groups)}
        truth = fake_ms(pruned_with(counts))
        assert latency.ms(counts) == pytest.approx(truth, rel=1e-9)
        differs += abs(latency.ratio(counts) - latency.flops_ratio(counts)) > 0.01
    assert differs  # the budget is not the FLOPs share in disguise


def test_slimming_to_a_latency_budget_finds_the_expected_threshold(measured):
    """The expected threshold by exhaustion: every distinct scale tried, each plan cut for real and its fake
    latency computed; the lowest threshold within the budget is the answer."""
    model, analysis = analysed_model()
    latency = measured.latency
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
    assert latency.ms(counts) == pytest.approx(truth[expected], rel=1e-9) and truth[expected] <= asked_ms


def test_eagleeye_candidates_lie_in_the_latency_band(measured):
    """Every candidate's fake latency (cut for real) is within --delta of the asked share; its FLOPs share,
    recorded beside, is another number."""
    model, analysis = analysed_model()
    latency = measured.latency
    settings = eagleeye.SearchSettings(remain_ratio=0.7, delta=0.02, max_iter=2, multiple=8,
                                       budget_flag="--speedup 1.43")
    calibration = [torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))]
    candidates = eagleeye.search(model, analysis.groups, latency, calibration, lambda candidate: 0.0, settings)
    assert len(candidates) == 2
    for candidate in candidates:
        measured_share = fake_ms(pruned_with(candidate.counts)) / fake_ms(model)
        assert abs(measured_share - 0.7) <= 0.02
        assert candidate.budget_ratio == pytest.approx(measured_share, rel=1e-9)
        assert candidate.flops_ratio == pytest.approx(latency.cost.ratio(candidate.counts))


# ------------------------------------------------------------------------------------------- the cache
def test_table_is_cached_reused_and_invalidated(measured, caplog):
    runtime_class, folder = measured.runtime_class, measured.folder
    assert len(runtime_class.profiled) == len(measured.latency.points) == 4  # 100/75/50/25 %, profiled once
    stored = json.loads((folder / TABLE_FILE).read_text())["entries"]
    assert [e["kind"] for e in stored] == ["table"]
    assert stored[0]["key"]["runtime"] == "fake" and stored[0]["key"]["threads"] == 2
    assert stored[0]["key"]["imgsz"] == IMGSZ and stored[0]["key"]["version"] == "fake 1.0"

    again = fake_table(folder, runtime_class(2))
    assert len(runtime_class.profiled) == 4  # read, not measured
    assert [p.ms for p in again.points] == [p.ms for p in measured.latency.points]

    with caplog.at_level(logging.INFO):
        fake_table(folder, runtime_class(3))
    assert len(runtime_class.profiled) == 8
    assert "threads 2 (now 3): measuring again" in caplog.text
    assert len(json.loads((folder / TABLE_FILE).read_text())["entries"]) == 2  # the older table is kept


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


def test_width_multiple_survives_a_burst_of_load(tmp_path):
    """The probe widths are timed in PROBE_REPEATS independent sets and each keeps its fastest median: a set in
    which a burst of load tripled every other width (alone, it would choose multiple 1) changes nothing."""
    model, analysis = analysed_model()
    bursty = fake_runtime(step=16, name="bursty")
    steady, sets = bursty.latency, []

    def latency(self, handles, runs):
        values = steady(self, handles, runs)
        sets.append(values if sets else [v * (3 if i % 2 else 1) for i, v in enumerate(values)])
        return sets[-1]

    bursty.latency = latency
    assert measure_multiple(model, analysis.groups, bursty(2), IMGSZ, TableCache(tmp_path / TABLE_FILE)) == 16
    assert len(sets) == PROBE_REPEATS and choose_multiple(dict(zip(PROBE_WIDTHS, sets[0], strict=True)))[0] == 1


# ------------------------------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latency") / "quantised.pt"
    save_checkpoint(quantised_model(), path)
    return path


@pytest.fixture(scope="module")
def tool_runtime() -> type[Runtime]:
    """The fake runtime the tool tests share (its table, measured by the first, is read by the others)."""
    return fake_runtime()


def mass_share_logged(text: str) -> float:
    found = re.findall(r"the cut removes ([0-9.]+)% of their mass", text)
    assert len(found) == 1, text
    return float(found[0]) / 100


def test_slim_tool_prunes_to_a_speedup_then_a_flops_budget_reads_the_table(checkpoint, tool_runtime, tmp_path,
                                                                           caplog):
    """End to end: --speedup on the fake runtime, --round measured (16), the prediction met exactly by the
    fake's measurement of the saved model, the budget recorded. Then --remain-ratio 0.5 with --runtime and
    --round 16 beside it: the FLOPs budget stays, the latency is reported, the table is read, not measured; and
    this dense model cut to 50 % of its FLOPs gets the mass warning, its printed share the one computed here."""
    options = PruneOptions(weights=str(checkpoint), data=SAMPLE, path=str(tmp_path / "a.yaml"), imgsz=IMGSZ,
                           workers=0, noval=True, runtime="fake", speedup=1.4)
    with registered_runtime(tool_runtime):
        result = run_prune_slim(options, None, None)
        latency = result.latency
        assert latency["multiple"] == 16 and latency["budget"] == "--speedup 1.4"
        assert latency["asked_ms"] == pytest.approx(latency["unpruned_ms"] / 1.4)
        assert latency["measured_ms"] <= latency["asked_ms"] and latency["measured_speedup"] >= 1.4
        assert latency["gap_predicted"] == pytest.approx(0, abs=1e-9)
        assert len(latency["tries"]) == 1  # the table is exact: the rounding's distance is not measured again
        profiled = len(tool_runtime.profiled)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            flops = run_prune_slim(PruneOptions(**{**options.__dict__, "path": str(tmp_path / "f.yaml"),
                                                   "speedup": None, "multiple": 16}), None, 0.5)
        assert len(tool_runtime.profiled) == profiled  # the table beside --path was reused
    assert flops.latency["asked_ms"] is None and flops.latency["gap_predicted"] == pytest.approx(0, abs=1e-9)
    assert flops.latency["multiple"] == 16 and flops.latency["budget"] == "--remain-ratio 0.5"

    saved = load_checkpoint(result.weights_path)
    assert saved.meta["pruned"]["speedup"] == 1.4 and saved.meta["pruned"]["runtime"] == "fake"
    assert saved.meta["latency"]["measured_ms"] == pytest.approx(fake_ms(saved.model))
    for module in saved.model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_features % 16 == 0

    original = bn_mass(load_checkpoint(checkpoint).model)
    expected = (original - bn_mass(load_checkpoint(flops.weights_path).model)) / original
    assert expected > MASS_SHARE_WARNING
    assert mass_share_logged(caplog.text) == pytest.approx(expected, abs=6e-5)  # printed with 2 decimals (in %)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not sparse enough for this budget" in warnings[0]
    assert "looks trained without --sparse" in warnings[0] and "\n" not in warnings[0]


@pytest.fixture
def table_too_fast(tool_runtime, tmp_path, monkeypatch) -> PruneOptions:
    """A runtime whose cut models run 30 % slower than its per-layer table predicts (a cost no profile shows; here
    the pruned side of every measurement is scaled), and --speedup 1.25 options on a spread-weights checkpoint."""
    measure = prune_runner.measure_chosen

    def slower(model, pruned, *args):
        unpruned, chosen = measure(model, pruned, *args)
        return unpruned, 1.3 * chosen

    monkeypatch.setattr(prune_runner, "measure_chosen", slower)
    from conftest import spread_weights

    weights = save_checkpoint(spread_weights(build_model(copy.deepcopy(TINY))), tmp_path / "spread.pt")
    return PruneOptions(weights=str(weights), data=SAMPLE, path=str(tmp_path / "once.yaml"), imgsz=IMGSZ,
                        workers=0, batch_size=4, noval=True, runtime="fake", speedup=1.25, multiple=4)


def assert_landed_on_second_aim(landed: dict, first_try: dict) -> None:
    """The second cut is aimed at the ask over the table's error measured at the first (exactly 1.3), lands within
    the tolerance and is kept."""
    first, second = landed["tries"][:2]
    assert first == first_try
    assert second["aim"] == pytest.approx(1 / 1.25 / 1.3)
    assert abs(landed["landing_error"]) <= LANDING_TOLERANCE
    assert landed["landing_error"] == min((t["landing_error"] for t in landed["tries"]), key=abs)
    assert landed["measured_speedup"] == pytest.approx(1.25 / (1 + landed["landing_error"]))


def test_slim_measures_again_where_the_table_is_off(tool_runtime, table_too_fast, tmp_path):
    """With --latency-tries 1 the predicted cut is kept, far from --speedup's ask; by default the table is aimed
    again and the second cut lands."""
    with registered_runtime(tool_runtime):
        once = run_prune_slim(table_too_fast, None, None, latency_tries=1).latency
        landed = run_prune_slim(replace(table_too_fast, path=str(tmp_path / "landed.yaml")), None, None).latency
    assert [t["landing_error"] for t in once["tries"]] == [once["landing_error"]]
    assert once["landing_error"] > LANDING_TOLERANCE and once["table_factor"] == pytest.approx(1.3)
    assert_landed_on_second_aim(landed, once["tries"][0])


def test_eagleeye_scales_its_best_candidate_where_the_table_is_off(tool_runtime, table_too_fast, tmp_path):
    """EagleEye's best candidate lands 30 % slow; rather than a second search, its widths are scaled to the
    corrected aim (test_scaled_counts_fill_the_aim_from_a_candidates_widths checks how): the table puts the kept
    plan at or under that aim, the model is smaller than the candidate, the YAML records the aim, and it lands."""
    settings = eagleeye.SearchSettings(remain_ratio=None, delta=0.05, max_iter=2)
    with registered_runtime(tool_runtime):
        result = run_prune_eagleeye(table_too_fast, settings, calibration_batches=1, score_images=4)
    landed, best = result.latency, result.extra["best"]
    assert best.budget_ratio == pytest.approx(1 / 1.25, abs=0.05)
    first = {**landed["tries"][0]}
    assert first["landing_error"] == pytest.approx(1.25 * 1.3 * landed["tries"][0]["predicted_ms"]
                                                   / landed["table_unpruned_ms"] - 1)
    assert_landed_on_second_aim(landed, first)

    saved = load_checkpoint(result.weights_path)
    assert saved.meta["pruned"]["scaled_to"] == pytest.approx(landed["aim"], abs=1e-6)
    assert landed["predicted_ms"] / landed["table_unpruned_ms"] <= landed["aim"] + 1e-9  # the table's view
    model, _ = prune_runner.load_trained(table_too_fast.weights)
    groups = prune_runner.analyse(model).groups
    _, candidate_plan = eagleeye.best_plan(model, groups, [best])
    candidate = prune_model(model, groups, candidate_plan, record=False)
    assert count_parameters(saved.model) < count_parameters(candidate)


def test_scaled_counts_fill_the_aim_from_a_candidates_widths():
    """scaled_counts: a candidate's widths (multiples of 4) scaled down to a smaller share of the budget: at most
    the aim, every group narrower than the candidate, and no group can take one more step of 4 without breaking
    the aim (one common factor alone stops short here: widths 16, 32, 48, ... step up together)."""
    model, analysis = analysed_model()
    cost, sizes = CostModel(model, analysis.groups, IMGSZ), [g.size for g in analysis.groups]
    settings = eagleeye.SearchSettings(remain_ratio=0.6, delta=0.05, max_iter=1, multiple=4)
    counts = eagleeye.draw_counts(random.Random(0), sizes, 0.8, settings)
    scaled = eagleeye.scaled_counts(counts, sizes, cost, 0.4, settings)
    assert cost.ratio(scaled) <= 0.4 < cost.ratio(counts)
    assert all(scaled[i] <= counts[i] and scaled[i] % 4 == 0 for i in scaled)
    for i in scaled:
        if scaled[i] < sizes[i]:
            assert cost.ratio({**scaled, i: scaled[i] + 4}) > 0.4, i
    with pytest.raises(eagleeye.BudgetError, match="--min-keep"):
        eagleeye.scaled_counts(counts, sizes, cost, 0.001, settings)


def test_no_mass_warning_when_the_cut_channels_are_near_zero(caplog):
    """A model whose channels to cut have gammas of 1e-4 (half of each group, in every BatchNorm of it): a
    50 % cut removes almost none of the mass and is not warned about; the share is the one computed here."""
    model, analysis = analysed_model()
    sparse = copy.deepcopy(model)
    for group in analysis.groups:
        for member, bn in batchnorm_members(group, sparse.model):
            small = member.root % 2 == 1
            bn.weight.data[member.index[small]] = 1e-4
            bn.weight.data[member.index[~small]] = 1.0
    scales = slim.group_scales(sparse.model, analysis.groups)
    plan = slim.slimming_plan(scales, slim.percent_threshold(scales, 0.5), 0.1, 8)
    with caplog.at_level(logging.INFO):
        share = report_scale_mass(sparse, analysis, plan, 0.5, "sparse.pt", trained_sparse=True)
    original = bn_mass(sparse)
    expected = (original - bn_mass(prune_model(sparse, analysis.groups, plan, record=False))) / original
    assert share == pytest.approx(expected, rel=1e-9) and 0 < expected < 1e-3
    assert mass_share_logged(caplog.text) == pytest.approx(expected, abs=6e-5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(len(kept) for kept in plan.values()) < sum(g.size for g in analysis.groups) * 0.75  # a real cut


def test_eagleeye_tool_writes_predicted_latency_measured_at_the_deployed_size(checkpoint, tool_runtime, tmp_path):
    """--latency-imgsz: the model trains and is scored at --imgsz, but every model the runtime opens (the table's
    widths, the chosen and the unpruned model) runs at the deployed size, and the table is keyed by it."""
    path = tmp_path / "ee.yaml"
    opened = len(tool_runtime.opened)
    with registered_runtime(tool_runtime):
        code = run_cli(prune_eagleeye.main, [
            "--weights", str(checkpoint), "--data", SAMPLE, "--imgsz", str(IMGSZ), "--runtime", "fake",
            "--latency-imgsz", str(2 * IMGSZ),
            "--latency-ms", str(0.75 * fake_ms(quantised_model())), "--round", "16", "--delta", "0.03",
            "--max-iter", "2", "--calib-batches", "1", "--batch-size", "4", "--score-images", "4", "--workers", "0",
            "--noval", "--path", str(path)])
    assert code == 0
    rows = list(csv.DictReader(path.with_name("ee_candidates.csv").open()))
    assert len(rows) == 2 and all(abs(float(r["latency_ratio"]) - 0.75) <= 0.03 for r in rows)
    assert len(tool_runtime.opened) - opened >= 6 and set(tool_runtime.opened[opened:]) == {2 * IMGSZ}
    tables = json.loads(path.with_name(TABLE_FILE).read_text())["entries"]
    assert [e["key"]["imgsz"] for e in tables] == [2 * IMGSZ]
    saved = load_checkpoint(path.with_suffix(".pt"))
    assert saved.meta["latency"]["imgsz"] == 2 * IMGSZ and saved.meta["imgsz"] == IMGSZ


def test_peer_reaches_a_latency_measured_on_the_named_runtime(checkpoint, tool_runtime, tmp_path):
    """benchmarks/prune_tp.py --latency-ms T --runtime R: Torch-Pruning's search times its candidates on the runtime
    our tools' budgets use (the fake, whose latency is known), so the peer and our tools meet at the same measured
    latency: the saved model's latency lands within --delta of T, and the pruned YAML records where it was timed."""
    from benchmarks import prune_tp

    target = 0.6 * fake_ms(quantised_model())
    path = tmp_path / "tp.yaml"
    with registered_runtime(tool_runtime):
        code = run_cli(prune_tp.main, ["--weights", str(checkpoint), "--data", SAMPLE, "--imgsz", str(IMGSZ),
                                       "--runtime", "fake", "--latency-ms", str(target), "--delta", "0.05",
                                       "--workers", "0", "--batch-size", "4", "--noval", "--path", str(path)])
    assert code == 0
    saved = load_checkpoint(path.with_suffix(".pt"))
    assert abs(fake_ms(saved.model) / target - 1) <= 0.05
    assert saved.meta["pruned"]["runtime"] == "fake"
    assert saved.meta["pruned"]["measured_ms"] == pytest.approx(fake_ms(saved.model), abs=1e-3)


# ------------------------------------------------------------------------------------------- the flags
# (the flags' domain checks are rows of tests/test_bad_inputs.py's table)
def test_missing_runtime_package_is_one_line_before_loading(tmp_path, capsys):
    """The weights file is not a checkpoint: a check that came after loading would fail differently."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a checkpoint")
    missing = fake_runtime(name="missing")
    missing.requires = (Requirement("no_such_package_for_latency", "pip install it"),)
    with registered_runtime(missing):
        code = run_cli(prune_slim.main, ["--weights", str(weights), "--data", SAMPLE, "--speedup", "2",
                                         "--runtime", "missing", "--path", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --runtime missing needs the 'no_such_package_for_latency'") and \
        err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_library_callers_get_the_same_checks(tmp_path):
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
@pytest.mark.parametrize("name", ["onnxruntime", "openvino-bf16"])
def test_runtime_profile_maps_every_conv_layer(name, tmp_path, monkeypatch):
    """ONNX Runtime's session profile and OpenVINO's performance counters (in bfloat16, the baseline to beat on
    CPUs with AMX), node names mapped to the YAML layers: every layer holding a convolution has a time at every
    point, and the prediction at the profiled widths is the measured total. (Two widths, few runs, no pause:
    this checks the mapping, it times nothing.)"""
    runtime = RUNTIMES.create(name, 1)
    try:
        runtime.check()
    except UserError as error:
        pytest.skip(str(error))
    monkeypatch.setattr(latency_module, "UNIFORM_WIDTHS", (1.0, 0.5))
    monkeypatch.setattr(latency_module, "PROFILE_RUNS", 2)
    monkeypatch.setattr(latency_module, "TIMING_RUNS", 1)
    monkeypatch.setattr(runtimes_module, "SETTLE_SECONDS", 0.0)
    model, _ = analysed_model()
    latency = fake_table(tmp_path, runtime)
    conv_layers = set(conv_macs(prepare_for_export(model)))
    assert conv_layers and len(latency.points) == 2
    for point in latency.points:
        assert conv_layers <= set(point.layers), conv_layers - set(point.layers)
        assert latency.ms(point.counts) == pytest.approx(point.ms, rel=1e-9)
        assert point.ms > 0 and sum(point.layers.values()) > 0
    if name == "openvino-bf16":
        handle = runtime.open(prepare_for_export(model), latency_module.example_input(model, IMGSZ), tmp_path)
        assert runtime._compile(handle.file, False).get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"


def test_latency_benchmark_times_checkpoints_side_by_side(checkpoint, tmp_path, capsys):
    """benchmarks/latency.py on the fake runtime: each checkpoint's ms is the runtime's, the speed-up is relative
    to the first checkpoint; ``--widths`` adds each checkpoint cut uniformly (every group keeps the share, rounded
    up to 8 channels); a missing file or a reference runtime not timed is one line before anything loads."""
    from benchmarks import latency as bench

    model, analysis = analysed_model()
    order = [torch.arange(g.size, 0, -1).float() for g in analysis.groups]
    counts = {number: group.size // 2 for number, group in enumerate(analysis.groups)}
    half = prune_model(model, analysis.groups, plan_from_counts(order, counts))  # records its widths: reloadable
    pruned = save_checkpoint(half, tmp_path / "half.pt")
    quarter_counts = {n: min(g.size, math.ceil(g.size / 4 / 8) * 8) for n, g in enumerate(analysis.groups)}
    quarter = pruned_with(quarter_counts)
    with registered_runtime(fake_runtime(name="fake-bench")):
        assert bench.main(["--weights", str(checkpoint), str(pruned), "--imgsz", str(IMGSZ), "--runtime",
                           "fake-bench", "--runs", "1", "--widths", "0.25", "--reference", "fake-bench"]) == 0
        assert run_cli(bench.main, ["--weights", str(checkpoint), str(tmp_path / "none.pt"), "--runtime",
                                    "fake-bench"]) == 2
        assert run_cli(bench.main, ["--weights", str(checkpoint), "--runtime", "fake-bench", "--reference",
                                    "openvino"]) == 2
        assert run_cli(bench.main, ["--weights", str(checkpoint), "--runtime", "fake-bench", "--widths", "1.5"]) == 2
    out, err = capsys.readouterr()
    full_ms, half_ms, quarter_ms = fake_ms(model), fake_ms(half), fake_ms(quarter)
    assert f"| {pruned} | {count_parameters(half) / 1e6:.3f} |" in out
    assert f"{half_ms:.2f} ({full_ms / half_ms:.2f}x) |" in out and f"{full_ms:.2f} (1.00x) |" in out
    assert f"| {checkpoint} at 25% width | {count_parameters(quarter) / 1e6:.3f} |" in out
    assert f"{quarter_ms:.2f} ({full_ms / quarter_ms:.2f}x) |" in out
    assert full_ms / half_ms > 1.5 and half_ms > quarter_ms
    assert err == (f"error: --weights {tmp_path / 'none.pt'}: file not found\n"
                   "error: --reference openvino: not one of --runtime fake-bench\n"
                   "error: --widths 1.5: expected a share of the channels between 0 and 1\n")
