"""Quantization-aware training (train.py --qat), its checkpoint, its QDQ ONNX export, the measured INT8 layer
sensitivity, and the GPU check's failure path without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.common.errors import UserError
from utils.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_YAML = ROOT / "data" / "neu-det-sample.yaml"
SAMPLE_VAL = ROOT / "data" / "neu-det-sample" / "images" / "val"

pytest.importorskip("torchao", reason="train.py --qat needs torchao (requirements.txt)")


def _qat_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(cfg="yolov5n.yaml", data=str(SAMPLE_YAML), imgsz=128, batch_size=8, epochs=1, max_batches=2,
                  device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(tmp_path), name="qat",
                  exist_ok=True, qat=True, hyp_override=["lr0=0.001", "warmup_epochs=0"])
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> dict:
    """One QAT epoch (2 batches) on the embedded sample, from scratch: a real checkpoint in seconds."""
    from utils.runners.train import run_train

    folder = tmp_path_factory.mktemp("qat")
    metrics = run_train(_qat_config(folder))
    return {"weights": folder / "qat" / "weights" / "best.pt", "metrics": metrics, "folder": folder}


def _val_images(n: int = 4) -> torch.Tensor:
    from utils.export.common import sample_images

    return sample_images(SAMPLE_VAL, (128, 128), n)


def test_qat_checkpoint_is_plain_data_and_rebuilds_the_trained_model(qat_run):
    """best.pt loads with weights_only=True; rebuilt from YAML + recipe + tensors, it scores what the EMA scored
    at the end of the epoch (final validation reloads best.pt; results.csv holds the epoch's own numbers)."""
    from utils.compress.quant.qat import QATDetector
    from utils.weights.checkpoint import load_checkpoint

    raw = torch.load(qat_run["weights"], map_location="cpu", weights_only=True)
    assert raw["quantization"]["library"] == "torchao" and raw["quantization"]["method"] == "qat"
    assert any(".scale" in k for k in raw["state_dict"])  # fake-quantizer state travels with the weights
    model = load_checkpoint(qat_run["weights"]).model
    assert isinstance(model, QATDetector) and not model.training
    rows = (qat_run["folder"] / "qat" / "results.csv").read_text().splitlines()
    epoch = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert float(epoch["metrics/mAP50-95"]) == pytest.approx(qat_run["metrics"]["mAP50-95"], abs=1e-6)
    assert float(epoch["metrics/mAP50"]) == pytest.approx(qat_run["metrics"]["mAP50"], abs=1e-6)


def test_qat_export_is_qdq_int8_and_onnxruntime_matches_fake_quant(qat_run, tmp_path):
    """export.py --include onnx --int8 on the QAT checkpoint: QuantizeLinear/DequantizeLinear with INT8 and zero
    points of 0 (what TensorRT needs), and ONNX Runtime's outputs close to the fake-quant PyTorch model.

    Tolerance: scores (objectness x class) within 0.05 at every anchor, and within 1e-3 on average. Not exact:
    the INT8 graph has BN-free convolutions summed in another order than the fake-quant graph, and a value that
    lands on a rounding boundary of an 8-bit activation moves by one step (1/127 of the range), which later
    layers carry on; measured on the v7.0 fixture after calibration: max 0.024, mean 9e-5."""
    import onnx
    from onnx import numpy_helper

    from utils.export import ExportOptions, export_model, prepare_for_export
    from utils.export.onnx import ONNXRuntimeBackend
    from utils.export.registry import load_backend
    from utils.weights.checkpoint import load_checkpoint

    artifacts = export_model(ExportOptions(weights=qat_run["weights"], include=("onnx",), imgsz=(128, 128), int8=True,
                                         output_dir=tmp_path))
    graph = onnx.load(str(artifacts["onnx_int8"])).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("Conv") == 60 and ops.count("QuantizeLinear") > 40 and ops.count("DequantizeLinear") >= 60
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero_point = initializers.get(node.input[2])
            assert zero_point is not None and zero_point.dtype == np.int8 and not zero_point.any()
    images = _val_images()
    with torch.no_grad():
        expected = prepare_for_export(load_checkpoint(qat_run["weights"]).model)(images)
    output = ONNXRuntimeBackend(artifacts["onnx_int8"])(images)
    scores = output[..., 4:5] * output[..., 5:]
    expected_scores = expected[..., 4:5] * expected[..., 5:]
    assert output.shape == expected.shape
    assert (scores - expected_scores).abs().max() <= 0.05
    assert (scores - expected_scores).abs().mean() <= 1e-3
    # the sidecar says which CPU runtime was measured fastest, and load_backend follows it
    backend = load_backend(artifacts["onnx_int8"])
    assert backend.format == {"openvino": "openvino", "onnxruntime": "onnx"}[backend.metadata["cpu_runtime"]]
    assert backend.metadata["precision"] == "int8" and backend.metadata["quantization"]["method"] == "qat"


def test_float_model_with_qat_weights_is_the_qat_model_without_rounding(qat_run, tmp_path):
    """The plain model carrying the QAT weights (BN as identity) computes what the QAT graph computes with fake
    quantization switched off, and saves as an ordinary float checkpoint that export.py --int8 (PTQ) takes."""
    from torchao.quantization.pt2e import disable_fake_quant

    from models.yolo import DetectionModel
    from utils.compress.quant.qat import float_model_with_qat_weights
    from utils.weights.checkpoint import load_checkpoint, save_checkpoint

    qat = load_checkpoint(qat_run["weights"]).model
    plain = float_model_with_qat_weights(qat)
    assert type(plain) is DetectionModel and plain.names == qat.names
    images = _val_images(2)
    qat.body.apply(disable_fake_quant)
    with torch.no_grad():
        expected, got = qat(images)[0], plain(images)[0]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    reloaded = load_checkpoint(save_checkpoint(plain, tmp_path / "plain.pt")).model
    with torch.no_grad():
        assert torch.allclose(reloaded(images)[0], got, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["yolov5s-mobilenetv3s", "yolov5s-shufflenetv2"])
def test_qat_folds_every_batchnorm_of_zoo_detectors(name):
    """Zoo backbones keep BatchNorms outside Conv blocks (ShuffleNetV2's branch Sequentials and stem): QAT folds
    them all, so neither a BatchNorm module nor a batch_norm op is left in the prepared graph. After calibration
    (two batches, as training does before its first epoch) the graph with fake quantization off computes the
    float model and so does the plain model carrying its weights (1e-4 of the output's magnitude, the bound of
    the test above), and with it on the scores stay within the bounds of the QDQ test (0.05 at every anchor,
    1e-3 on average; measured max 3e-3)."""
    from conftest import spread_weights
    from torchao.quantization.pt2e import disable_fake_quant

    from models.yolo import DetectionModel
    from utils.compress.quant.qat import calibrate, float_model_with_qat_weights, prepare_qat
    from utils.export.common import sample_images

    model = spread_weights(DetectionModel(ROOT / "models" / "zoo" / f"{name}.yaml", width_multiple=0.25, nc=2))
    images = sample_images(SAMPLE_VAL, (64, 64), 4)
    with torch.no_grad():
        expected = model.eval()(images)[0]
    qat = prepare_qat(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in qat.modules())
    assert not [node for node in qat.body.graph.nodes if "batch_norm" in str(node.target)]
    calibrate(qat, (images[:2], images[2:]))
    with torch.no_grad():
        quantized = qat.eval()(images)[0]
        qat.body.apply(disable_fake_quant)
        unrounded = qat(images)[0]
        plain = float_model_with_qat_weights(qat)(images)[0]
    bound = 1e-4 * expected.abs().max()
    assert (unrounded - expected).abs().max() <= bound and (plain - expected).abs().max() <= bound
    scores, expected_scores = quantized[..., 4:5] * quantized[..., 5:], expected[..., 4:5] * expected[..., 5:]
    assert (scores - expected_scores).abs().max() <= 0.05 and (scores - expected_scores).abs().mean() <= 1e-3
    assert not torch.equal(quantized, unrounded)  # fake quantization was on


def test_qat_export_for_cpu_runtimes_requantizes_the_trained_weights(qat_run, tmp_path):
    """export.py --qat-placement cpu: x.onnx is the float model with the QAT weights (ONNX Runtime equals
    PyTorch on it), x_int8.onnx is ONNX Runtime's static QDQ of that graph (INT8 per-channel weights, uint8
    activations, head output convs FP32 as in PTQ) and the IR is NNCF's INT8 of it; both stay close to the float
    model. Without --data, or with an engine, it is refused before anything is written.

    Tolerance: scores within 0.05 at every anchor (the bound of the trained-graph test above): activation ranges
    are re-calibrated on 8 sample images here, so the rounding differs from what QAT saw."""
    import onnx
    from onnx import numpy_helper

    from utils.compress.quant.qat import float_model_with_qat_weights
    from utils.export import ExportOptions, export_model, prepare_for_export
    from utils.export.onnx import ONNXRuntimeBackend
    from utils.export.openvino import OpenVINOBackend
    from utils.weights.checkpoint import load_checkpoint

    options = dict(weights=qat_run["weights"], include=("onnx", "openvino"), imgsz=(128, 128), int8=True,
                   qat_placement="cpu", output_dir=tmp_path)
    with pytest.raises(UserError, match="pass --data"):
        export_model(ExportOptions(**options))
    with pytest.raises(UserError, match="build the engine with the default --qat-placement tensorrt"):
        export_model(ExportOptions(**{**options, "include": ("onnx", "engine")}, data=SAMPLE_YAML))
    assert not any(tmp_path.iterdir())
    artifacts = export_model(ExportOptions(**options, data=SAMPLE_YAML, calib_images=8))
    images = _val_images()
    with torch.no_grad():
        expected = prepare_for_export(float_model_with_qat_weights(load_checkpoint(qat_run["weights"]).model))(images)
    assert (ONNXRuntimeBackend(artifacts["onnx"])(images) - expected).abs().max() <= 1e-3 * expected.abs().max()
    graph = onnx.load(str(artifacts["onnx_int8"])).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    int8_weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers
                    and initializers[n.input[0]].dtype == np.int8 and initializers[n.input[0]].ndim == 4]
    assert len(int8_weights) == 57  # 60 convolutions, the Detect head's 3 output convs stay FP32
    expected_scores = expected[..., 4:5] * expected[..., 5:]
    for backend in (ONNXRuntimeBackend(artifacts["onnx_int8"]), OpenVINOBackend(artifacts["openvino"])):
        assert backend.metadata["precision"] == "int8"
        output = backend(images)
        assert (output[..., 4:5] * output[..., 5:] - expected_scores).abs().max() <= 0.05, backend.format
    assert OpenVINOBackend(artifacts["openvino"]).metadata["quantizer"].startswith("nncf")


def test_qat_refuses_what_it_does_not_support(tmp_path):
    from utils.compress.quant.qat import check_qat_flags, check_qat_supported

    headless = torch.nn.Module()
    headless.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(UserError, match="ends in Conv2d, neither a Detect head nor a classification head"):
        check_qat_supported(headless, "custom.yaml")
    with pytest.raises(UserError, match="--compile, --freeze"):
        check_qat_flags(_qat_config(tmp_path, compile=True, freeze=["10"]))
    with pytest.raises(UserError, match="--heads-mode sequential"):
        check_qat_flags(_qat_config(tmp_path, heads_mode="sequential"))


def test_qat_checkpoint_with_an_unfolded_batchnorm_is_refused_saying_why():
    """A QAT checkpoint of a zoo model written while only Conv blocks were folded keeps BatchNorm tensors the
    graph prepared now does not have: the message says so instead of blaming the torch version."""
    from utils.compress.quant.qat import check_same_graph
    from utils.weights.checkpoint import CheckpointError

    own = {"body.model.0.conv.weight": 0, "body.model.0.conv.bias": 0}
    earlier = {"body.model.0.conv.weight": 0, **{f"body.model.0.bn.{k}": 0 for k in ("weight", "bias", "running_mean",
                                                                                      "running_var")}}
    with pytest.raises(CheckpointError, match=r"old.pt: the checkpoint's QAT graph keeps BatchNorm model\.0\.bn, which "
                                              "QAT now folds"):
        check_same_graph(own, earlier, {"torch": "2.14"}, "old.pt")
    with pytest.raises(CheckpointError, match=r"saved with torch 2\.14"):
        check_same_graph(own, {"body.model.0.conv.weight": 0}, {"torch": "2.14"}, "old.pt")


FASHION = ROOT.parent / "shared" / "datasets" / "fashion-color-type"


def _fashion_subset(folder: Path, train: int = 48, val: int = 16) -> Path:
    """A data YAML over the first images of the two-head fashion set (links, nothing copied or changed)."""
    import yaml

    if not FASHION.exists():
        pytest.skip(f"{FASHION} not present (the ../shared folder with data sets and fixtures is absent)")
    for split, n in (("train", train), ("val", val)):
        for image in sorted((FASHION / "images" / split).glob("*.jpg"))[:n]:
            link = folder / "fashion" / split / image.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image)
    spec = yaml.safe_load((FASHION / "fashion-color-type.yaml").read_text())
    spec.update(path=str(folder / "fashion"), train="train", val="val")
    data = folder / "fashion.yaml"
    data.write_text(yaml.safe_dump(spec))
    return data


def test_multihead_classifier_qat_checkpoint_exports_to_qdq_and_matches(tmp_path):
    """--qat on a two-head classifier: the checkpoint (weights_only) rebuilds a QATClassifier with the learned
    head balance; its QDQ ONNX quantizes every convolution and both linear layers, and ONNX Runtime's softmax
    outputs per head stay within 0.02 of the fake-quant model's (one 8-bit step of an activation moves a logit
    by ~1/127 of its range; the measured max is ~3e-3 on these images)."""
    import onnx

    from utils.compress.quant.qat import QATClassifier
    from utils.export import ExportOptions, export_model, prepare_for_export
    from utils.export.common import sample_images
    from utils.export.onnx import ONNXRuntimeBackend
    from utils.runners.train import run_train
    from utils.weights.checkpoint import load_checkpoint

    data = _fashion_subset(tmp_path)
    run_train(TrainConfig(cfg="yolov5n-mcls-s.yaml", data=str(data), imgsz=64, batch_size=16, epochs=1,
                             workers=0, device="cpu", project=str(tmp_path), name="cls", exist_ok=True, noplots=True,
                             qat=True, head_balance="uncertainty",
                             hyp_override=["lr0=0.001", "warmup_epochs=0", "nbs=16"]))
    weights = tmp_path / "cls" / "weights" / "best.pt"
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    assert raw["quantization"]["method"] == "qat" and raw["task"] == "classify"
    assert "head_balance.log_vars" in raw["state_dict"]
    model = load_checkpoint(weights).model
    assert isinstance(model, QATClassifier) and [h["name"] for h in model.heads] == ["color", "type"]
    assert not torch.equal(model.head_balance.log_vars, torch.zeros(2))  # trained with the rest

    artifacts = export_model(ExportOptions(weights=weights, include=("onnx",), imgsz=(64, 64), int8=True,
                                         output_dir=tmp_path / "export"))
    from models.yolo import ClassificationModel

    graph = onnx.load(str(artifacts["onnx_int8"])).graph
    ops = [node.op_type for node in graph.node]
    stored = {i.name: i.data_type for i in graph.initializer}
    int8_weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and stored.get(n.input[0]) == 3]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ClassificationModel(raw["yaml"]).modules())
    assert convs == 33 and ops.count("Conv") == convs and ops.count("Gemm") + ops.count("MatMul") == 2
    assert len(int8_weights) == convs + 2  # every convolution's and both linear layers' weights stored as INT8
    assert ops.count("QuantizeLinear") >= 25  # activations: one per distinct input tensor of those layers

    images = sample_images(SAMPLE_VAL, (64, 64), 4)
    with torch.no_grad():
        expected = prepare_for_export(model)(images)
    output = ONNXRuntimeBackend(artifacts["onnx_int8"])(images)
    assert set(output) == set(expected) == {"color", "type"}
    for head in expected:
        assert output[head].shape == expected[head].shape
        assert (output[head].softmax(1) - expected[head].softmax(1)).abs().max() <= 0.02, head


def test_qat_without_torchao_is_a_clear_error(tmp_path, monkeypatch):
    """Before anything loads: the message names the package and how to install it."""
    from utils.runners.train import run_train

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(UserError, match="pip install 'torchao"):
        run_train(_qat_config(tmp_path))
    assert not (tmp_path / "qat").exists()  # refused before the run folder was made


def test_qat_weights_cannot_seed_another_run(qat_run, tmp_path):
    from utils.runners.train import run_train

    with pytest.raises(UserError, match="quantization-aware-trained checkpoint"):
        run_train(_qat_config(tmp_path, cfg="", weights=str(qat_run["weights"]), qat=False))


def test_sensitivity_ignores_activations_shared_across_layers():
    """v7.0 pickles share one SiLU instance between all Conv blocks; hooking it would quantize every layer at once.
    Measured on a model with that sharing, each layer's sensitivity equals the one of the same model with its own
    activation per block."""
    from models.yolo import DetectionModel
    from utils.compress.quant.sensitivity import measure_layer_sensitivity
    from utils.export.common import prepare_for_export

    torch.manual_seed(0)
    own = prepare_for_export(DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=6))
    shared = prepare_for_export(own)
    one_silu = torch.nn.SiLU()
    for module in shared.modules():
        if isinstance(getattr(module, "act", None), torch.nn.SiLU):
            module.act = one_silu
    images = _val_images(1)
    by_layer_own = {s.layer: s.error for s in measure_layer_sensitivity(own, images)}
    by_layer_shared = {s.layer: s.error for s in measure_layer_sensitivity(shared, images)}
    assert sorted(by_layer_own) == list(range(24))
    for layer, error in by_layer_own.items():
        assert by_layer_shared[layer] == pytest.approx(error, rel=1e-4, abs=1e-12), layer
    assert max(by_layer_own.values()) > 0


@pytest.mark.skipif(bool(shutil.which("nvidia-smi", path="/usr/bin:/bin")), reason="an NVIDIA driver is installed")
def test_gpu_check_fails_fast_without_a_gpu(tmp_path):
    """No nvidia-smi on PATH: exit status 3 within seconds, one line saying what is missing."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    start = time.perf_counter()
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "gpu")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 3
    assert "no NVIDIA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "gpu").exists()  # nothing was started


def test_gpu_check_with_cuda_hidden_fails_fast_in_one_line(tmp_path):
    """A driver answers but torch sees no CUDA device (CUDA_VISIBLE_DEVICES hidden): exit status 3, one line naming
    what is missing, before any input (here a --stacked run folder that does not exist) is looked at."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: stand-in (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "gpu"),
                             "--stacked", str(tmp_path / "no-run")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == ("gpu_check.sh: torch sees no CUDA device (a CPU-only torch build?); install a "
                                     "CUDA build of torch")
    assert not (tmp_path / "gpu").exists()
