"""Export formats are registered: a format defined and registered here, in the test, exports through export.py,
opens through load_backend and validates through val.py's runner exactly like the checkpoint, with no project file
knowing about it; after unregistering it is unknown again. The INT8 ONNX runtime choice reads the registry too."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import export
from utils.common.errors import FlagError, UserError
from utils.export import ExportFormat, ExportJob, Requirement, registered_format
from utils.export.backend import Backend
from utils.export.common import prepare_for_export, read_metadata, write_metadata
from utils.export.onnx import ONNXRuntimeBackend
from utils.export.registry import REGISTRY, load_backend
from utils.runners.val import ValOptions, run_val

COMPAT = Path(__file__).resolve().parent / "fixtures" / "compat"


class StateDictBackend(Backend):
    """Rebuilds the exported model from its YAML and loads the fused weights saved beside it."""

    format = "statedict"

    def __init__(self, weights: Path, device: str = "cpu", fp16: bool = False, threads: int | None = None):
        from models.yolo import DetectionModel

        super().__init__(weights, read_metadata(weights), device, fp16)
        saved = torch.load(weights, weights_only=True)
        self.model = prepare_for_export(DetectionModel(saved["yaml"]))  # the exported (fused) architecture
        self.model.load_state_dict(saved["state_dict"])

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.model(images)]


def export_state_dict(job: ExportJob) -> dict[str, Path]:
    file = job.paths[STATE_DICT.name]
    torch.save({"yaml": job.model.yaml, "state_dict": job.model.state_dict()}, file)
    write_metadata(file, job.metadata(STATE_DICT, "fp32"))
    return {STATE_DICT.name: file}


STATE_DICT = ExportFormat(name="statedict", title="state dict + YAML", suffix=".sdict", backend=StateDictBackend,
                          export=export_state_dict)


def test_a_format_registered_in_a_test_exports_and_validates_like_the_checkpoint(fixtures_dir, sample_data_yaml,
                                                                                 tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the --include help on one line
    weights = fixtures_dir / "yolov5n-neu-det-v7.pt"
    out = tmp_path / "export"
    validate = {"data": str(sample_data_yaml), "imgsz": 256, "batch_size": 4, "workers": 0, "device": "cpu",
                "project": str(tmp_path / "val"), "noplots": True}
    with registered_format(STATE_DICT):
        with pytest.raises(SystemExit):
            export.parse_args(["--help"])
        assert "formats: torchscript, onnx, openvino, ncnn, engine, statedict" in capsys.readouterr().out
        assert export.main(["--weights", str(weights), "--include", "statedict", "--imgsz", "256", "--dynamic",
                            "--output-dir", str(out)]) == 0
        artifact = out / "yolov5n-neu-det-v7.sdict"
        assert sorted(p.name for p in out.iterdir()) == [artifact.name, f"{artifact.name}.json"]
        difference = re.search(r"statedict +max \|output - PyTorch\| = (\S+)", capsys.readouterr().out)
        assert difference is not None and float(difference.group(1)) == 0.0
        assert read_metadata(artifact)["dynamic"] == ["batch", "height", "width"]
        assert isinstance(load_backend(artifact), StateDictBackend)
        exported = run_val(ValOptions(str(artifact), name="statedict", **validate))
        with pytest.raises(UserError, match=r"--int8 applies to onnx, openvino and engine only"):
            export.main(["--weights", str(weights), "--include", "statedict", "--int8", "--data",
                         str(sample_data_yaml), "--output-dir", str(tmp_path / "int8")])
    original = run_val(ValOptions(str(weights), name="pt", **validate))
    assert exported["n_images"] == original["n_images"] == 12
    for key in ("P", "R", "mAP50", "mAP50-95"):  # same weights and graph; float sums may round apart in the 7th digit
        assert exported[key] == pytest.approx(original[key], rel=1e-6, abs=1e-7), key
    assert original["mAP50"] > 0.1  # the comparison means something
    assert "statedict" not in REGISTRY
    with pytest.raises(UserError, match=r"--include \['statedict'\]: unknown format; choose from torchscript, onnx, "
                                        r"openvino, ncnn, engine$"):
        export.main(["--weights", str(weights), "--include", "statedict", "--output-dir", str(tmp_path / "again")])
    with pytest.raises(FlagError, match=r"unknown artifact type; expected \.pt, \.torchscript, \.onnx, \.engine or"):
        load_backend(artifact)


class FakeRuntimeBackend(ONNXRuntimeBackend):
    format = "fake"


def test_the_measured_cpu_runtime_of_an_onnx_is_looked_up_in_the_registry(tmp_path):
    """An INT8 ONNX's sidecar names the runtime export measured fastest; load_backend opens the file with the
    registered backend of that name that runs .onnx files on the CPU, and with ONNX Runtime when there is none."""
    onnx_file = Path(shutil.copy(COMPAT / "detector.onnx", tmp_path / "m.onnx"))
    metadata = json.loads((COMPAT / "detector.onnx.json").read_text())
    write_metadata(onnx_file, {**metadata, "cpu_runtime": "fake"})
    fake = ExportFormat(name="fake", title="Fake", suffix="_fake_model", marker="*.fake", backend=FakeRuntimeBackend,
                        runtime="fake", also_runs=(".onnx",))
    assert type(load_backend(onnx_file)) is ONNXRuntimeBackend
    with registered_format(fake):
        assert type(load_backend(onnx_file)) is FakeRuntimeBackend
    assert type(load_backend(onnx_file)) is ONNXRuntimeBackend


def test_registering_refuses_a_taken_name_or_suffix_and_unknown_names_list_the_known():
    with pytest.raises(ValueError, match="'onnx' is registered already"):
        REGISTRY.register(REGISTRY.get("onnx"))
    clash = ExportFormat(name="onnx2", title="ONNX 2", suffix=".onnx", backend=ONNXRuntimeBackend)
    with pytest.raises(ValueError, match="would be taken for 'onnx' artifacts"):
        REGISTRY.register(clash)
    with pytest.raises(FlagError, match=r"unknown export format 'tflite'; known: pytorch, torchscript, onnx, openvino, "
                                        r"ncnn, engine$"):
        REGISTRY.get("tflite")
    assert REGISTRY.exportable_names() == ["torchscript", "onnx", "openvino", "ncnn", "engine"]


def test_a_format_whose_package_is_missing_is_refused_before_anything_is_written(fixtures_dir, tmp_path):
    missing = Requirement("no_such_package_yk", "pip install it")
    needy = ExportFormat(name="needy", title="Needy", suffix=".needy", backend=StateDictBackend,
                         export=export_state_dict, export_requires=(missing,))
    with registered_format(needy), pytest.raises(
            UserError, match=r"^--include needy needs the 'no_such_package_yk' package, which is not installed: pip "
                             r"install it$"):
        export.main(["--weights", str(fixtures_dir / "yolov5n-neu-det-v7.pt"), "--include", "needy",
                     "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
