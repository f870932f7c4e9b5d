"""The stacked compression chain (benchmarks/compress.py, issue 33 points 3 and 7) in smoke mode: a detector on the
embedded sample and a two-head classifier made from the same images go through prune -> distilled fine-tune ->
QAT -> INT8 ONNX Runtime and OpenVINO, every artifact scored and timed; a second run resumes without redoing."""

from __future__ import annotations

import csv
import dataclasses
import shlex

import onnx
import pytest

from benchmarks import compress
from tests.fake_runtimes import fake_ms, fake_runtime
from tests.tiny_detector import tiny_yaml
from utils.compress.prune.runtimes import registered_runtime
from utils.weights.checkpoint import load_checkpoint

pytest.importorskip("torchao", reason="the chain's QAT stage needs torchao (requirements.txt)")


def test_smoke_chain_on_a_detector_and_a_two_head_classifier(tmp_path, monkeypatch):
    """One pruning method per budget keeps the test short (test_prune_cli.py, test_prune_peer.py and
    test_prune_latency.py cover each method alone). The detector: the peer at half the FLOPs, through QAT and INT8.
    The classifier: a latency budget (--speedup on the fake runtime of tests/fake_runtimes.py, whose latency is
    exact), slim (with its sparse stage) and the peer aimed at slim's measured latency, each with the control (the
    unpruned model through the same distilled fine-tune), stopping after that fine-tune (a two-head classifier's QAT
    checkpoint and INT8 export: tests/test_qat.py). The control's QAT and INT8 stages are the pruned model's code
    path with another label, so they run in neither."""
    detector, classifier = compress.smoke_settings(tmp_path, cfg=str(tiny_yaml(tmp_path)))
    chains = [dataclasses.replace(detector, methods=("peer",), control=False),
              dataclasses.replace(classifier, methods=("peer", "slim"), quantize=False, speedup=1.5, runtime="fake")]
    with registered_runtime(fake_runtime()):
        tables = [compress.run_chain(settings) for settings in chains]
    floats = [("unpruned", "unpruned"), ("unpruned", "unpruned FP32 ONNX"), ("unpruned", "unpruned OpenVINO f32"),
              ("unpruned", "unpruned OpenVINO bf16 (CPU default)")]
    for settings, rows in zip(chains, tables, strict=True):
        columns = compress.metric_columns([row["result"] for row in rows])
        assert all(0 <= float(row[name]) <= 1 for row in rows for name, _ in columns)
        assert all(float(row[f"latency b1 {settings.imgsz} (ms)"]) > 0 for row in rows)
        written = list(csv.reader((settings.work / f"table{compress.tagged(settings)}.csv").open()))
        assert len(written) == 1 + len(rows) and written[0][-1] == "command"
        markdown = (settings.work / f"table{compress.tagged(settings)}.md").read_text()
        assert markdown.count("\n| ") == len(rows)  # the header opens the file

    # the detector at half the FLOPs: every artifact scored by val.py on the whole val split
    rows, prefix = tables[0], "pruned + kd + QAT INT8"
    assert [(r["model"], r["stage"]) for r in rows] == [*floats, ("peer", "pruned"), ("peer", "pruned + kd"),
                                                        ("peer", f"{prefix} onnxruntime"),
                                                        ("peer", f"{prefix} openvino")]
    by_stage = {row["stage"]: row for row in rows}
    full, pruned = by_stage["unpruned"]["result"], by_stage["pruned"]["result"]
    assert 0.5 - detector.delta <= pruned["gflops"] / full["gflops"] <= 0.5 + detector.delta
    assert by_stage["pruned + kd"]["result"]["params"] == pruned["params"]
    assert "--teacher" in by_stage["pruned + kd"]["command"]
    assert "--qat" in (detector.work / "stages" / "peer-qat.json").read_text()
    # INT8 files are a fraction of the FP32 ONNX (~0.3: the Detect output convs stay FP32)
    fp32_bytes = by_stage["unpruned FP32 ONNX"]["result"]["bytes"]
    assert by_stage[f"{prefix} onnxruntime"]["result"]["bytes"] < 0.7 * fp32_bytes
    assert {row["result"]["metrics"]["n_images"] for row in rows} == {12}
    assert "mAP@.5:.95" in rows[0]

    # the classifier under the latency budget: our method first, the peer at the latency it measured
    rows, settings = tables[1], chains[1]
    slim, peer = "slim x1.5 fake", "peer x1.5 fake"
    assert [(r["model"], r["stage"]) for r in rows] == [
        *floats, (slim, "pruned"), (peer, "pruned"), ("unpruned", "control: kd"), (slim, "pruned + kd"),
        (peer, "pruned + kd")]
    assert "defect top-1" in rows[0] and "extent top-1" in rows[0]
    work = settings.work / "pruned"
    slim_model, peer_model = (load_checkpoint(work / f"{name.replace(' ', '-')}.pt") for name in (slim, peer))
    report = slim_model.meta["latency"]
    assert report["measured_speedup"] >= 1.5 and report["measured_ms"] == pytest.approx(fake_ms(slim_model.model))
    assert abs(fake_ms(peer_model.model) / report["measured_ms"] - 1) <= settings.delta
    assert f"--speedup {report['measured_speedup']:.4f} --runtime fake" in rows[5]["command"]
    control, kd = rows[6], rows[7]
    assert control["result"]["params"] == rows[0]["result"]["params"]
    assert _recipe(control["command"]) == _recipe(kd["command"])  # same recipe, data and teacher
    reseeded = compress.train_argv(dataclasses.replace(settings, seed=3), "kd", 1, [])
    assert "--seed 0" in kd["command"] and reseeded[reseeded.index("--seed") + 1] == "3"  # --seed: every stage

    # --latency-imgsz: an exported row is timed from the same export run again at that size
    resized = dataclasses.replace(chains[0], latency_imgsz=96)
    onnx_row = next(r for r in compress.build_rows(resized) if r.stage == "unpruned FP32 ONNX")
    timed = compress.latency_artifact(resized, onnx_row)
    assert timed != onnx_row.artifact and timed.parent.name == "unpruned-fp32-96px"
    shape = onnx.load(str(timed)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape] == [1, 3, 96, 96]

    # resume: every stage, score and timing is on disk, so nothing runs again
    monkeypatch.setattr(compress, "run_stage", _resume_only(compress.run_stage))
    again = compress.run_chain(chains[0])
    assert [r["result"] for r in again] == [r["result"] for r in tables[0]]


def _recipe(command: str) -> list[str]:
    """A fine-tune's command without what names its model and run: the recipe, data and teacher remain."""
    words = shlex.split(command)
    for flag in ("--weights", "--cfg", "--name"):
        if flag in words:
            del words[words.index(flag):words.index(flag) + 2]
    return words


def _resume_only(run_stage):
    def wrapped(s, name, artifact, script, argv, call):
        return run_stage(s, name, artifact, script, argv, lambda _argv: pytest.fail(f"stage {name} ran again"))
    return wrapped


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    settings = compress.ChainSettings(data=str(compress.SAMPLE), work=tmp_path / "run")
    for change, message in ((dict(ratio=1.5), "--ratio 1.5"), (dict(methods=("magic",)), "--methods magic"),
                            (dict(epochs=0), "--epochs 0"), (dict(data=str(tmp_path / "no.yaml")), "no.yaml"),
                            (dict(speedup=1.5), "--speedup 1.5 needs --runtime"),
                            (dict(speedup=0.5, runtime="openvino"), "--speedup 0.5: expected a speed-up above 1"),
                            (dict(speedup=2, runtime="openvino", methods=("peer",)), "the peer prunes to the latency"),
                            (dict(sparse_weights=str(tmp_path / "s.pt")),
                             f"--sparse-weights {tmp_path / 's.pt'}: file not found")):
        with pytest.raises(compress.FlagError, match=message.replace(".", r"\.")):
            compress.run_chain(dataclasses.replace(settings, **change))
    assert not (tmp_path / "run").exists()


def test_sparse_weights_replace_the_sparse_fine_tune(tmp_path, monkeypatch):
    """--sparse-weights (a model trained sparse from the start) is what slimming prunes: no sparse stage runs, and
    the prune stage's command names that file."""
    sparse = tmp_path / "sparse.pt"
    sparse.write_bytes(b"")
    settings = compress.ChainSettings(data=str(compress.SAMPLE), work=tmp_path / "run", methods=("slim",),
                                      sparse_weights=str(sparse))
    calls = []
    monkeypatch.setattr(compress, "run_stage", lambda s, name, artifact, script, argv, call: calls.append(
        (name, argv)) or (artifact, ""))
    compress.stage_prune(settings, "slim", tmp_path / "unpruned.pt")
    assert [name for name, _ in calls] == ["prune-slim"]
    assert calls[0][1][calls[0][1].index("--weights") + 1] == str(sparse)


def test_compress_script_refuses_a_bad_flag_in_one_line(tmp_path, capsys):
    from utils.common.cli import run_cli

    code = run_cli(compress.main, ["--data", str(compress.SAMPLE), "--ratio", "0", "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --ratio 0.0") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()
