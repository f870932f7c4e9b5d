"""export.py flags as a YOLOv5 v7.0 user expects them: ``--dynamic`` frees batch, height and width (ONNX, OpenVINO;
TensorRT gets v7.0's batch profile, also from to_trt.sh), ``--dynamic-batch`` frees the batch alone, and an
artifact that already exists is left byte-identical unless ``--exist-ok``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
from utils.common.errors import UserError
from utils.export import ExportOptions, artifact_paths, export_model, planned_outputs
from utils.export.common import ExportMetadata, read_metadata, sample_images, write_metadata
from utils.export.pytorch import PyTorchBackend
from utils.export.registry import load_backend
from utils.export.tensorrt import ShapeProfile, default_profile

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "yolov5n-neu-det-v7.pt"
SAMPLE_VAL = ROOT / "data" / "neu-det-sample" / "images" / "val"
ALL_AXES = ["batch", "height", "width"]
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"{FIXTURE} absent (../shared fixtures not present)")


def _onnx_input_dims(file: Path) -> list[int | str]:
    import onnx

    dims = onnx.load(str(file)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


# ----------------------------------------------------------------------------- --dynamic / --dynamic-batch
@pytest.fixture(scope="module")
def dynamic_artifacts(tmp_path_factory) -> dict[str, Path]:
    """`export.py --include torchscript onnx openvino --imgsz 256 --dynamic` on the v7.0 fixture."""
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} absent (../shared fixtures not present)")
    out = tmp_path_factory.mktemp("dynamic")
    assert export.main(["--weights", str(FIXTURE), "--include", "torchscript", "onnx", "openvino", "--imgsz", "256",
                        "--dynamic", "--no-compare", "--output-dir", str(out)]) == 0
    return artifact_paths(FIXTURE, out)


@needs_fixture
def test_dynamic_frees_batch_height_and_width_like_v7(dynamic_artifacts):
    assert _onnx_input_dims(dynamic_artifacts["onnx"]) == ["batch", 3, "height", "width"]
    for fmt in ("onnx", "openvino"):
        assert read_metadata(dynamic_artifacts[fmt])["dynamic"] == ALL_AXES, fmt
    assert read_metadata(dynamic_artifacts["torchscript"])["dynamic"] == ["batch"]  # traced at one size


@needs_fixture
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_dynamic_artifacts_run_rectangular_batches_like_pytorch(dynamic_artifacts, fmt):
    """val.py's rect batches (here 3 x 288 x 320) go through as they are, with PyTorch's outputs."""
    images = sample_images(SAMPLE_VAL, (288, 320), limit=3)
    reference = PyTorchBackend(FIXTURE)(images)
    output = load_backend(dynamic_artifacts[fmt])(images)
    assert output.shape == reference.shape == (3, 5670, 11)
    assert (output - reference).abs().max() <= 2e-3


@needs_fixture
def test_torchscript_keeps_its_traced_size(dynamic_artifacts):
    with pytest.raises(ValueError, match="exported for 256x256"):
        load_backend(dynamic_artifacts["torchscript"])(torch.zeros(1, 3, 288, 320))


@needs_fixture
def test_dynamic_batch_keeps_height_and_width(tmp_path):
    assert export.main(["--weights", str(FIXTURE), "--include", "onnx", "--imgsz", "256", "--batch-size", "2",
                        "--dynamic-batch", "--no-compare", "--output-dir", str(tmp_path)]) == 0
    onnx_file = artifact_paths(FIXTURE, tmp_path)["onnx"]
    assert _onnx_input_dims(onnx_file) == ["batch", 3, 256, 256]
    assert read_metadata(onnx_file)["dynamic"] == ["batch"]


@needs_fixture
def test_dynamic_hw_is_a_deprecated_alias_of_dynamic(tmp_path):
    with pytest.warns(FutureWarning, match="--dynamic-hw is deprecated"):
        args = export.parse_args(["--weights", str(FIXTURE), "--dynamic-hw"])
    assert export.options_from_args(args).dynamic_axes() == tuple(ALL_AXES)


def test_dynamic_and_dynamic_batch_exclude_each_other(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"never loaded")
    with pytest.raises(UserError, match=r"--dynamic .* and --dynamic-batch .* exclude each other"):
        export.main(["--weights", str(weights), "--include", "onnx", "--dynamic", "--dynamic-batch"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


# ----------------------------------------------------------------------------- TensorRT profiles
def test_tensorrt_default_profile_is_v7s(caplog):
    """v7.0 builds a --dynamic engine for batch 1 .. --batch-size, optimised at half of it, at the export size."""
    profile = default_profile((256, 320), 8)
    assert profile == ShapeProfile((1, 3, 256, 320), (4, 3, 256, 320), (8, 3, 256, 320))
    assert profile.dynamic_axes() == ["batch"]  # what the engine's sidecar then says, not the ONNX's three axes
    with caplog.at_level("WARNING"):
        assert default_profile((640, 640), 1).dynamic_axes() == []
    assert "pass --batch-size N" in caplog.text
    assert ShapeProfile((1, 3, 256, 256), (1, 3, 320, 320), (1, 3, 640, 640)).dynamic_axes() == ["height", "width"]


def _fake_tensorrt_tools(folder: Path) -> Path:
    """A trtexec that records its arguments and writes a dummy engine, and an nvidia-smi that names a GPU."""
    folder.mkdir()
    trtexec = folder / "trtexec"
    trtexec.write_text('#!/bin/sh\n[ "$1" = "--version" ] && { echo "TensorRT v8.6.2"; exit 0; }\n'
                       'printf "%s\\n" "$@" > "$TRTEXEC_ARGS"\n'
                       'for a in "$@"; do case "$a" in\n'
                       '  --saveEngine=*) echo engine > "${a#--saveEngine=}";;\n'
                       'esac; done\n')
    smi = folder / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *compute_cap*) echo 8.7;; *) echo "Fake Orin";; esac\n')
    for tool in (trtexec, smi):
        tool.chmod(0o755)
    return trtexec


@pytest.mark.parametrize(("dynamic", "shapes", "expected_args", "engine_axes"), [
    (ALL_AXES, [], ["--minShapes=images:1x3x256x320", "--optShapes=images:4x3x256x320",
                    "--maxShapes=images:8x3x256x320"], ["batch"]),
    (["batch"], [], ["--minShapes=images:1x3x256x320", "--optShapes=images:4x3x256x320",
                     "--maxShapes=images:8x3x256x320"], ["batch"]),
    ([], [], [], []),
    (ALL_AXES, ["1x3x256x256", "2x3x320x320", "4x3x640x640"],
     ["--minShapes=images:1x3x256x256", "--optShapes=images:2x3x320x320", "--maxShapes=images:4x3x640x640"],
     ALL_AXES),
])
def test_to_trt_builds_v7s_profile_for_a_dynamic_onnx(tmp_path, dynamic, shapes, expected_args, engine_axes):
    """Without --shapes trtexec would build a dynamic ONNX for 1x3x1x1; to_trt.sh takes v7.0's profile from
    the sidecar instead, and the engine's sidecar lists the axes the profile really frees."""
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not parsed by the fake trtexec")
    write_metadata(onnx_file, ExportMetadata(format="onnx", task="detect", stride=32, imgsz=[256, 320], batch=8,
                                             names=["a"], dynamic=dynamic))
    trtexec = _fake_tensorrt_tools(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{trtexec.parent}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}", "TRTEXEC_ARGS": str(tmp_path / "args.txt")}
    command = ["bash", str(ROOT / "to_trt.sh"), "--onnx", str(onnx_file), "--output", str(tmp_path / "m.engine"),
               "--trtexec", str(trtexec)] + (["--shapes", *shapes] if shapes else [])
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    shape_args = [a for a in (tmp_path / "args.txt").read_text().split() if "Shapes=" in a]
    assert shape_args == expected_args
    engine_meta = json.loads((tmp_path / "m.engine.json").read_text())
    assert engine_meta["dynamic"] == engine_axes
    assert engine_meta["engine"] == {"tensorrt": "8.6.2", "gpu": "Fake Orin", "compute_capability": "8.7"}


# ----------------------------------------------------------------------------- existing artifacts
def _existing(out: Path, relative: str) -> Path:
    """Put a stand-in for an earlier export at ``out/relative`` (a folder when it has no suffix)."""
    path = out / relative
    if path.suffix in {".onnx", ".torchscript", ".engine", ".json"}:
        path.write_bytes(b"an earlier export, not to be touched\n")
    else:
        path.mkdir()
        (path / "metadata.json").write_bytes(b"{}\n")
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("include", "relative"), [
    (["torchscript"], "w.torchscript"), (["torchscript"], "w.torchscript.json"), (["onnx"], "w.onnx"),
    (["onnx"], "w.onnx.json"), (["openvino"], "w_openvino_model"), (["ncnn"], "w_ncnn_model"),
    (["engine"], "w.engine"), (["engine"], "w.engine.json"), (["engine"], "w.onnx"),
    (["onnx", "--int8", "--data", "data/neu-det-sample.yaml"], "w_int8.onnx"),
])
def test_existing_artifact_is_refused_and_left_as_it_was(tmp_path, include, relative):
    """Refused before the checkpoint is even read (the weights here are not a checkpoint), for every format and
    for the sidecars too; the message names the file and the flag."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"never loaded")
    existing = _existing(tmp_path, relative)
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match=rf"{re.escape(str(existing))} already exists; pass --exist-ok to set it aside"):
        export.main(["--weights", str(weights), "--include", *include, "--imgsz", "64"])
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["w.pt", existing.name])


@needs_fixture
def test_planned_outputs_are_what_an_export_writes(dynamic_artifacts):
    """The overwrite check looks exactly where export_model writes: the TorchScript/ONNX/OpenVINO export above
    left nothing else in its folder (the INT8 copy: next test)."""
    out = dynamic_artifacts["onnx"].parent
    options = ExportOptions(weights=FIXTURE, include=("torchscript", "onnx", "openvino"), output_dir=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in planned_outputs(options))


def test_planned_outputs_of_an_int8_export(tmp_path, sample_data_yaml):
    from models.yolo import DetectionModel
    from utils.weights.checkpoint import save_checkpoint

    model = DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=6).eval()
    model.names = list("abcdef")
    weights = save_checkpoint(model, tmp_path / "w.pt")
    for include, expected in ((("onnx",), ["w.onnx", "w.onnx.json", "w_int8.onnx", "w_int8.onnx.json"]),
                              (("openvino",), ["w_openvino_model"])):
        out = tmp_path / include[0]
        options = ExportOptions(weights=weights, include=include, imgsz=(64, 64), int8=True, data=sample_data_yaml,
                                calib_images=2, output_dir=out)
        export_model(options)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in planned_outputs(options)) == expected


def test_qat_placement_on_a_plain_checkpoint_says_it_changes_nothing(tmp_path, caplog):
    from models.yolo import DetectionModel
    from utils.export import check_options
    from utils.weights.checkpoint import save_checkpoint

    model = DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=6).eval()
    model.names = list("abcdef")
    weights = save_checkpoint(model, tmp_path / "w.pt")
    with caplog.at_level("WARNING", logger="utils.export"):
        check_options(ExportOptions(weights=weights, include=("onnx",), qat_placement="cpu"), torch.device("cpu"))
    assert f"--qat-placement cpu applies to quantization-aware-trained checkpoints only; {weights} is not one" in (
        caplog.text)


@needs_fixture
def test_exist_ok_sets_the_earlier_export_aside_and_the_cli_refuses_in_one_line(tmp_path, caplog):
    stale = _existing(tmp_path, "yolov5n-neu-det-v7.onnx")
    command = [sys.executable, str(ROOT / "export.py"), "--weights", str(FIXTURE), "--include", "onnx", "--imgsz",
               "256", "--no-compare", "--output-dir", str(tmp_path)]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"error: {stale} already exists; pass --exist-ok to set it aside "
                                                   "(into previous/), or --output-dir DIR to export elsewhere"]
    with caplog.at_level("WARNING"):
        assert export.main([*command[2:], "--exist-ok"]) == 0
    assert load_backend(stale).dynamic_batch is False  # a real export now, with its sidecar
    kept = tmp_path / "previous" / stale.name  # the earlier file, whole, where the one log line says
    assert kept.read_bytes() == b"an earlier export, not to be touched\n"
    assert f"moved to {tmp_path / 'previous'}" in caplog.text
