"""The stacked compression chain (benchmarks/compress.py, issue 33 points 3 and 7) in smoke mode: a detector on the
embedded sample and a two-head classifier made from the same images go through prune -> distilled fine-tune ->
QAT -> INT8 ONNX Runtime and OpenVINO, every artifact scored and timed; a second run resumes without redoing."""

from __future__ import annotations

import csv
import dataclasses

import onnx
import pytest

from benchmarks import compress

pytest.importorskip("torchao", reason="the chain's QAT stage needs torchao (requirements.txt)")


def test_smoke_chain_on_a_detector_and_a_two_head_classifier(tmp_path, monkeypatch):
    """One pruning method per model keeps the test short (test_prune_cli.py and test_prune_peer.py cover each
    method alone): the peer on the detector, slim (with its sparse stage) on the classifier; the control chain
    (the same stages on the unpruned model) runs for the detector only, and the classifier stops after its
    distilled fine-tune (a two-head classifier's QAT checkpoint and INT8 export: tests/test_qat.py)."""
    detector, classifier = compress.smoke_settings(tmp_path)
    chains = [dataclasses.replace(detector, methods=("peer",)),
              dataclasses.replace(classifier, methods=("slim",), control=False, quantize=False)]
    tables = [compress.run_chain(settings) for settings in chains]
    for settings, rows in zip(chains, tables, strict=True):
        method = settings.methods[0]
        stages = [(r["model"], r["stage"]) for r in rows]
        control, prefix = "control: kd + QAT INT8", "pruned + kd + QAT INT8"
        control_rows = [("unpruned", "control: kd"), ("unpruned", f"{control} onnxruntime"),
                        ("unpruned", f"{control} openvino")] if settings.control else []
        quantized = [(method, f"{prefix} onnxruntime"), (method, f"{prefix} openvino")] if settings.quantize else []
        assert stages == [("unpruned", "unpruned"), ("unpruned", "unpruned FP32 ONNX"),
                          ("unpruned", "unpruned OpenVINO f32"), ("unpruned", "unpruned OpenVINO bf16 (CPU default)"),
                          (method, "pruned"), *control_rows, (method, "pruned + kd"), *quantized]
        by_stage = {stage: row for (_, stage), row in zip(stages, rows, strict=True)}
        full, pruned = by_stage["unpruned"]["result"], by_stage["pruned"]["result"]
        # the pruned model keeps about --ratio of the FLOPs (slim: at most; its widths round up to 8 channels)
        assert 0.3 < pruned["gflops"] / full["gflops"] <= 0.5 + settings.delta
        assert by_stage["pruned + kd"]["result"]["params"] == pruned["params"]
        # INT8 files are a fraction of the FP32 ONNX (detector ~0.3; the classifier ~0.6: its heads' 1280-channel
        # tail convs stay FP32, as the Detect output convs do); every artifact was scored by val.py
        fp32 = by_stage["unpruned FP32 ONNX"]["result"]["bytes"]
        if settings.quantize:
            assert by_stage[f"{prefix} onnxruntime"]["result"]["bytes"] < 0.7 * fp32
        if settings.control:  # pruned INT8 is smaller than unpruned INT8
            int8 = {name: by_stage[f"{name} onnxruntime"]["result"]["bytes"] for name in (prefix, control)}
            assert int8[prefix] < int8[control]
        columns = compress.metric_columns([row["result"] for row in rows])
        assert all(0 <= float(row[name]) <= 1 for row in rows for name, _ in columns)
        if "mAP50" in rows[0]["result"]["metrics"]:  # every artifact scored on the whole val split
            assert {row["result"]["metrics"]["n_images"] for row in rows} == {12}
        assert all(float(row[f"latency b1 {settings.imgsz} (ms)"]) > 0 for row in rows)
        assert "--teacher" in by_stage["pruned + kd"]["command"]
        assert not settings.quantize or "--qat" in (settings.work / "stages" / f"{method}-qat.json").read_text()
        written = list(csv.reader((settings.work / "table.csv").open()))
        assert len(written) == 1 + len(rows) and written[0][-1] == "command"
        assert (settings.work / "table.md").read_text().count("\n| ") == len(rows)  # the header opens the file
    assert "mAP@.5:.95" in tables[0][0] and "defect top-1" in tables[1][0] and "extent top-1" in tables[1][0]

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


def _resume_only(run_stage):
    def wrapped(s, name, artifact, script, argv, call):
        return run_stage(s, name, artifact, script, argv, lambda _argv: pytest.fail(f"stage {name} ran again"))
    return wrapped


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    settings = compress.ChainSettings(data=str(compress.SAMPLE), work=tmp_path / "run")
    for change, message in ((dict(ratio=1.5), "--ratio 1.5"), (dict(methods=("magic",)), "--methods magic"),
                            (dict(epochs=0), "--epochs 0"), (dict(data=str(tmp_path / "no.yaml")), "no.yaml")):
        with pytest.raises(compress.FlagError, match=message.replace(".", r"\.")):
            compress.run_chain(dataclasses.replace(settings, **change))
    assert not (tmp_path / "run").exists()


def test_compress_script_refuses_a_bad_flag_in_one_line(tmp_path, capsys):
    from utils.common.cli import run_cli

    code = run_cli(compress.main, ["--data", str(compress.SAMPLE), "--ratio", "0", "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --ratio 0.0") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()
