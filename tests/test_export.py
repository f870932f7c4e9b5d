"""Export and deployment: every artifact must reproduce PyTorch on real images.

Tolerances (max absolute difference of the decoded (bs, N, 5+nc) output; xywh in pixels, scores in [0, 1]):
ONNX Runtime, OpenVINO (FP32 inference precision) and NCNN <= 2e-3 against the fused PyTorch model
(measured ~3e-4: reassociated float sums); TorchScript <= 1e-5; the fused model itself is checked against
the v7.0 reference output at <= 2e-3. End-to-end NMS must give the same boxes (<= 1e-3 px), scores and
classes as ``utils.common.boxes.non_max_suppression`` at conf 0.25 / IoU 0.45.
Exports happen once per module into tmp folders (module-scoped fixtures) to keep the file fast.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.export import ExportOptions, NMSSettings, export_model
from utils.export.common import (
    ExportMetadata,
    MetadataError,
    focus_to_conv,
    metadata_path,
    prepare_for_export,
    read_metadata,
    sample_images,
    write_metadata,
)
from utils.export.ncnn import NCNNBackend
from utils.export.onnx import ONNXRuntimeBackend
from utils.export.openvino import OpenVINOBackend
from utils.export.pytorch import PyTorchBackend
from utils.export.registry import backend_class, load_backend
from utils.export.tensorrt import check_engine_compatibility
from utils.export.torchscript import TorchScriptBackend

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "yolov5n-neu-det-v7.pt"
FIXTURE_EXPECTED = SHARED / "fixtures" / "yolov5n-neu-det-v7.expected.pt"
V3_YAML = ROOT / "models" / "hub" / "yolov5-v3-style.yaml"
SAMPLE_VAL = ROOT / "data" / "neu-det-sample" / "images" / "val"
SAMPLE_YAML = ROOT / "data" / "neu-det-sample.yaml"


def sample_train_files() -> list[Path]:
    """The embedded sample's training images, as the detection task lists them for INT8 calibration."""
    from utils.tasks import TaskOptions, build_task

    return build_task("detect", SAMPLE_YAML, TaskOptions()).calibration_files("train")
BACKEND_ATOL = 2e-3
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"{FIXTURE} absent (../shared fixtures not present)")


def _tensorrt_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def fixture_data() -> dict:
    if not FIXTURE_EXPECTED.is_file():
        pytest.skip(f"{FIXTURE_EXPECTED} absent (../shared fixtures not present)")
    return torch.load(FIXTURE_EXPECTED, weights_only=True)


@pytest.fixture(scope="module")
def fixture_images(fixture_data) -> torch.Tensor:
    return fixture_data["images"].float() / 255


@pytest.fixture(scope="module")
def fixture_reference(fixture_images) -> torch.Tensor:
    from utils.weights.checkpoint import load_checkpoint

    model = prepare_for_export(load_checkpoint(FIXTURE).model)
    with torch.no_grad():
        return model(fixture_images)


@pytest.fixture(scope="module")
def fixture_artifacts(tmp_path_factory) -> dict[str, Path]:
    """TorchScript, dynamic-batch ONNX (simplified), OpenVINO and NCNN of the v7.0 yolov5n, batch 2, 256
    (``--dynamic-batch``: height and width stay fixed, which test_static_backend_rejects_wrong_size needs)."""
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} absent (../shared fixtures not present)")
    out = tmp_path_factory.mktemp("fixture-export")
    options = ExportOptions(weights=FIXTURE, include=("torchscript", "onnx", "openvino", "ncnn"), imgsz=(256, 256),
                            batch_size=2, dynamic_batch=True, simplify=True, output_dir=out)
    return export_model(options)


@pytest.fixture(scope="module")
def nms_artifact(tmp_path_factory) -> Path:
    """End-to-end ONNX (static batch 2, so batches of other sizes exercise chunking)."""
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} absent (../shared fixtures not present)")
    out = tmp_path_factory.mktemp("nms-export")
    options = ExportOptions(weights=FIXTURE, include=("onnx",), imgsz=(256, 256), batch_size=2, nms=True,
                            nms_settings=NMSSettings(0.25, 0.45, 300), output_dir=out)
    return export_model(options)["onnx"]


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory) -> Path:
    """A Focus-stem detector from models/hub/yolov5-v3-style.yaml with random BatchNorm statistics."""
    from models.yolo import DetectionModel
    from utils.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = _randomise_batchnorm(DetectionModel(V3_YAML))
    model.names = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("v3") / "v3-style.pt")


@pytest.fixture(scope="module")
def v3_artifacts(v3_checkpoint) -> dict[str, Path]:
    options = ExportOptions(weights=v3_checkpoint, include=("onnx", "openvino", "ncnn"), imgsz=(128, 128))
    return export_model(options)


def _randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms (a fresh model's are 0/1), so fusing is really exercised."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model


def _sample_batch(size: tuple[int, int], n: int) -> torch.Tensor:
    images = sample_images(SAMPLE_VAL, size, limit=n)
    assert images is not None and len(images) == n, f"need {n} images in {SAMPLE_VAL}"
    return images


# ----------------------------------------------------------------------------- Focus -> strided conv
def test_focus_to_conv_is_exact():
    from models.common import Conv, Focus

    torch.manual_seed(0)
    for k, s in ((3, 1), (1, 1), (3, 2)):
        focus = Focus(3, 16, k, s).eval()
        focus.conv.bn.running_mean.uniform_(-1, 1)
        focus.conv.bn.running_var.uniform_(0.5, 2)
        holder = torch.nn.Sequential(focus)
        x = torch.rand(2, 3, 64, 96)
        with torch.no_grad():
            expected = holder(x)
            focus_to_conv(holder)
            got = holder(x)
        assert isinstance(holder[0], Conv) and holder[0].conv.kernel_size == (2 * k, 2 * k)
        assert holder[0].conv.stride == (2 * s, 2 * s)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_focus_to_conv_whole_v3_model(v3_checkpoint):
    from models.common import Focus
    from utils.weights.checkpoint import load_checkpoint

    model = load_checkpoint(v3_checkpoint).model
    assert any(isinstance(m, Focus) for m in model.modules())
    x = _sample_batch((128, 128), 2)
    with torch.no_grad():
        expected = model(x)[0]
        converted = focus_to_conv(prepare_for_export(model, fuse=False))
        got = converted(x)
    assert not any(isinstance(m, Focus) for m in converted.modules())
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- fixture yolov5n
@needs_fixture
def test_prepared_model_matches_v7_reference(fixture_reference, fixture_data):
    assert (fixture_reference - fixture_data["pred"]).abs().max() <= BACKEND_ATOL


@needs_fixture
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "openvino", "ncnn"])
def test_fixture_backends_match_pytorch(fixture_artifacts, fixture_images, fixture_reference, fmt):
    backend = load_backend(fixture_artifacts[fmt])
    output = backend(fixture_images)
    assert output.shape == fixture_reference.shape == (4, 4032, 11)
    tolerance = 1e-5 if fmt == "torchscript" else BACKEND_ATOL
    assert (output - fixture_reference).abs().max().item() <= tolerance, fmt


@needs_fixture
@pytest.mark.parametrize("batch", [1, 8])
def test_dynamic_batch_onnx(fixture_artifacts, fixture_images, fixture_reference, batch):
    backend = load_backend(fixture_artifacts["onnx"])
    assert backend.dynamic_batch
    images = torch.cat((fixture_images, _sample_batch((256, 256), 4)))[:batch]
    session_output = backend.session.run(None, {"images": images.numpy()})[0]  # no chunking: one real batch
    assert session_output.shape == (batch, 4032, 11)
    reference = fixture_reference[:batch]
    assert (torch.from_numpy(session_output[: len(reference)]) - reference).abs().max() <= BACKEND_ATOL


@needs_fixture
def test_ncnn_backend_takes_channels_last_images(fixture_artifacts, fixture_images, fixture_reference):
    """A channels-last batch gives non-contiguous per-image arrays; their contiguous copies must outlive the
    ncnn.Mat that wraps them (once they did not, and NCNN read freed memory)."""
    backend = load_backend(fixture_artifacts["ncnn"])
    for _ in range(3):
        output = backend(fixture_images.contiguous(memory_format=torch.channels_last))
        assert (output - fixture_reference).abs().max().item() <= BACKEND_ATOL


@needs_fixture
def test_backend_factory_and_metadata(fixture_artifacts):
    expected = {"torchscript": TorchScriptBackend, "onnx": ONNXRuntimeBackend, "openvino": OpenVINOBackend,
                "ncnn": NCNNBackend}
    names = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    for fmt, cls in expected.items():
        assert backend_class(fixture_artifacts[fmt]) is cls
        backend = load_backend(fixture_artifacts[fmt])
        assert isinstance(backend, cls)
        assert (backend.names, backend.stride, backend.imgsz, backend.task) == (names, 32, (256, 256), "detect")
        assert backend.dynamic_batch == (fmt != "ncnn")
        backend.warmup()
    assert isinstance(load_backend(FIXTURE), PyTorchBackend)
    assert backend_class(Path("model.engine")).__name__ == "TensorRTBackend"
    with pytest.raises(ValueError, match="unknown artifact"):
        backend_class(Path("model.tflite"))


@needs_fixture
def test_static_backend_rejects_wrong_size(fixture_artifacts):
    backend = load_backend(fixture_artifacts["onnx"])
    with pytest.raises(ValueError, match="exported for 256x256"):
        backend(torch.zeros(1, 3, 320, 320))


# ----------------------------------------------------------------------------- end-to-end NMS
@needs_fixture
def test_nms_onnx_matches_pytorch_nms(nms_artifact, fixture_images, fixture_reference):
    from utils.common.boxes import non_max_suppression
    from utils.weights.checkpoint import load_checkpoint

    backend = load_backend(nms_artifact)
    assert backend.end2end and not backend.dynamic_batch and backend.batch == 2
    model = prepare_for_export(load_checkpoint(FIXTURE).model)
    images = torch.cat((fixture_images, _sample_batch((256, 256), 12)))[:15]  # 15: the last chunk is padded
    with torch.no_grad():
        expected = non_max_suppression(model(images), conf_thres=0.25, iou_thres=0.45, max_det=300)
    detections, num_dets = backend(images)
    assert detections.shape == (15, 300, 6) and num_dets.shape == (15,)
    assert sum(len(e) for e in expected) >= 5, "too few detections to make the comparison meaningful"
    for table, count, reference in zip(detections, num_dets, expected):
        assert int(count) == len(reference)
        got = table[: int(count)]
        torch.testing.assert_close(got[:, :5], reference[:, :5], atol=1e-3, rtol=1e-5)
        assert torch.equal(got[:, 5], reference[:, 5])
        assert not table[int(count):].any()


# ----------------------------------------------------------------------------- Focus-stem (v3) model
@pytest.mark.parametrize("fmt", ["onnx", "openvino", "ncnn"])
def test_v3_style_backends_match_pytorch(v3_checkpoint, v3_artifacts, fmt):
    from utils.weights.checkpoint import load_checkpoint

    images = _sample_batch((128, 128), 3)
    with torch.no_grad():
        reference = load_checkpoint(v3_checkpoint).model(images)[0]  # unfused, Focus kept: the true reference
    output = load_backend(v3_artifacts[fmt])(images)  # static batch 1 -> chunks
    assert output.shape == reference.shape
    torch.testing.assert_close(output, reference, atol=BACKEND_ATOL, rtol=1e-4)


# ----------------------------------------------------------------------------- a zoo detector, a multi-head classifier
ZOO_PARITY_YAML = ROOT / "models" / "zoo" / "yolov5s-mobilenetv3s.yaml"  # depthwise, SE, h-swish: the zoo's operators
CLASSIFIER_HEADS = [{"name": "colour", "names": ["black", "blue", "red"]}, {"name": "type", "nc": 2}]


@pytest.fixture(scope="module")
def zoo_artifacts(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    from models.yolo import DetectionModel
    from utils.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = _randomise_batchnorm(DetectionModel(ZOO_PARITY_YAML, nc=6))
    model.names = [f"class{i}" for i in range(6)]
    out = tmp_path_factory.mktemp("zoo-export")
    checkpoint = save_checkpoint(model.eval(), out / "mobilenetv3s.pt")
    options = ExportOptions(weights=checkpoint, include=("onnx", "openvino", "ncnn"), imgsz=(128, 128),
                            output_dir=out)
    return checkpoint, export_model(options)


@pytest.fixture(scope="module")
def classifier_artifacts(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """yolov5n-mcls-s with two heads. A fresh model's activations fade towards zero with depth in eval mode
    (unit BN statistics), so the statistics are measured on real images and the last layers scaled up: the
    logits then span several units and depend on the image."""
    from models.yolo import ClassificationModel
    from utils.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = ClassificationModel("yolov5n-mcls-s.yaml", heads=CLASSIFIER_HEADS)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
            module.reset_running_stats()
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=16 / module.in_features**0.5)
    with torch.no_grad():
        model.train()(_sample_batch((128, 128), 8))
    out = tmp_path_factory.mktemp("classifier-export")
    checkpoint = save_checkpoint(model.eval(), out / "mcls.pt", None, task="classify")
    options = ExportOptions(weights=checkpoint, include=("onnx", "openvino", "ncnn"), imgsz=(128, 128),
                            dynamic=True, output_dir=out)
    return checkpoint, export_model(options)


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "ncnn"])
def test_zoo_detector_backends_match_pytorch(zoo_artifacts, fmt):
    from utils.weights.checkpoint import load_checkpoint

    checkpoint, artifacts = zoo_artifacts
    images = _sample_batch((128, 128), 2)
    with torch.no_grad():
        reference = load_checkpoint(checkpoint).model.eval()(images)[0]  # unfused: the true reference
    output = load_backend(artifacts[fmt])(images)
    assert output.shape == reference.shape == (2, 1008, 11)
    torch.testing.assert_close(output, reference, atol=BACKEND_ATOL, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "ncnn"])
def test_multihead_classifier_backends_match_pytorch(classifier_artifacts, fmt):
    from utils.weights.checkpoint import load_checkpoint

    checkpoint, artifacts = classifier_artifacts
    images = _sample_batch((128, 128), 3)
    with torch.no_grad():
        reference = load_checkpoint(checkpoint).model.eval()(images)
    backend = load_backend(artifacts[fmt])
    assert backend.task == "classify" and [h["name"] for h in backend.heads] == ["colour", "type"]
    output = backend(images)
    assert list(output) == ["colour", "type"]
    for name, shape in (("colour", (3, 3)), ("type", (3, 2))):
        assert output[name].shape == reference[name].shape == shape
        assert reference[name].abs().max() > 1 and reference[name].std(0).max() > 0.1, "logits too uniform to test"
        torch.testing.assert_close(output[name], reference[name], atol=1e-4, rtol=1e-4)


def test_cli_exports_and_compares_a_classifier(classifier_artifacts, tmp_path, capsys):
    """export.py's after-export check handles a dict of heads (it once assumed one detection tensor)."""
    import export

    checkpoint, _ = classifier_artifacts
    assert export.main(["--weights", str(checkpoint), "--include", "onnx", "--imgsz", "128",
                        "--output-dir", str(tmp_path)]) == 0
    differences = [float(line.split("= ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
                   if "max |output - PyTorch|" in line]
    assert len(differences) == 1 and differences[0] < 1e-3  # logits of several units: float rounding only


def test_ncnn_export_refuses_operators_ncnn_lacks(tmp_path):
    """Swin blocks (C3STR) reshape to 6-D for window attention; pnnx keeps those as ``Tensor.reshape``, which
    NCNN cannot load, so the export must fail there, saying which operators, instead of leaving a dead artifact."""
    from models.yolo import DetectionModel
    from utils.export.ncnn import export_ncnn

    torch.manual_seed(0)
    model = prepare_for_export(DetectionModel(ROOT / "models" / "zoo" / "yolov5s-c3str.yaml", nc=6))
    meta = ExportMetadata(format="ncnn", task="detect", stride=32, imgsz=[128, 128], batch=1,
                          names=[str(i) for i in range(6)])
    with pytest.raises(RuntimeError, match=r"no NCNN layer for Tensor\.reshape x\d+"):
        export_ncnn(model, torch.rand(1, 3, 128, 128), tmp_path / "c3str_ncnn_model", meta)


def test_skattention_runs_in_ncnn(tmp_path):
    """SKAttention once stacked its branches into a 5-D tensor, and NCNN (4 axes at most) died of SIGFPE on the
    converted graph. NCNN runs in a child process here, so a crash fails this test instead of the suite."""
    import numpy as np

    from models.attention import SKAttention
    from models.common import Conv
    from utils.export.ncnn import export_ncnn

    torch.manual_seed(0)
    model = _randomise_batchnorm(torch.nn.Sequential(Conv(3, 32, 3, 2), SKAttention(32))).eval()
    image = _sample_batch((64, 64), 1)
    meta = ExportMetadata(format="ncnn", task="classify", stride=2, imgsz=[64, 64], batch=1, names=["block"])
    folder = export_ncnn(model, image, tmp_path / "sk_ncnn_model", meta)
    np.save(tmp_path / "input.npy", image[0].numpy())
    script = (
        "import sys, ncnn, numpy as np\n"
        "folder = sys.argv[1]\n"
        "net = ncnn.Net(); net.opt.use_vulkan_compute = False\n"
        "assert not net.load_param(folder + '/model.ncnn.param') and not net.load_model(folder + '/model.ncnn.bin')\n"
        "extractor = net.create_extractor()\n"
        "pixels = np.load(sys.argv[2])  # named: ncnn.Mat does not keep a temporary array alive\n"
        "extractor.input(net.input_names()[0], ncnn.Mat(pixels).clone())\n"
        "status, out = extractor.extract(net.output_names()[0])\n"
        "assert status == 0\n"
        "np.save(sys.argv[3], np.array(out))\n")
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "input.npy"),
                             str(tmp_path / "output.npy")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"NCNN failed (exit {result.returncode}): {result.stderr[-1000:]}"
    with torch.no_grad():
        reference = model(image)[0]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "output.npy")), reference, atol=1e-4, rtol=1e-4)


def test_unconverted_operators_are_listed(tmp_path):
    from utils.export.ncnn import unconverted_operators

    param = tmp_path / "model.ncnn.param"
    param.write_text("7767517\n5 5\nInput in0 0 1 in0\nConvolution conv_0 1 1 in0 1 0=16\n"
                     "Tensor.reshape Tensor.reshape_1 1 1 1 2 shape=(1,2,3,4,5,6)\nSwish silu_0 1 1 2 3\n"
                     "Tensor.reshape Tensor.reshape_2 1 1 3 out0\n")
    assert unconverted_operators(param) == {"Tensor.reshape": 2}


# ----------------------------------------------------------------------------- sidecar
def test_sidecar_round_trip(tmp_path):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"")
    metadata = ExportMetadata(format="onnx", task="detect", stride=32, imgsz=[256, 320], batch=4,
                              names=["a", "b"], dynamic=["batch"], opset=17)
    path = write_metadata(artifact, metadata)
    assert path == tmp_path / "model.onnx.json" == metadata_path(artifact)
    assert read_metadata(artifact) == metadata.to_dict()
    folder = tmp_path / "model_openvino_model"
    folder.mkdir()
    assert write_metadata(folder, metadata) == folder / "metadata.json"
    assert read_metadata(folder)["imgsz"] == [256, 320]


def test_sidecar_checker_rejects_bad_metadata(tmp_path):
    with pytest.raises(MetadataError, match="no metadata sidecar"):
        read_metadata(tmp_path / "missing.onnx")
    bad = ExportMetadata(format="onnx", task="detect", stride=32, imgsz=[256, 256], batch=1).to_dict()
    with pytest.raises(MetadataError, match="needs 'names'"):
        write_metadata(tmp_path / "x.onnx", bad)
    (tmp_path / "y.onnx.json").write_text('{"task": "detect"}')
    with pytest.raises(MetadataError, match="missing 'stride'"):
        read_metadata(tmp_path / "y.onnx")


def test_engine_compatibility_check():
    built = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    check_engine_compatibility(built, dict(built))
    with pytest.raises(RuntimeError, match=r"rebuild it on this device with to_trt\.sh"):
        check_engine_compatibility(built, {**built, "tensorrt": "10.7.0"})


# ----------------------------------------------------------------------------- CLI
@needs_fixture
def test_cli_rejects_bad_include():
    import export

    with pytest.raises(ValueError, match="unknown format"):
        export.main(["--weights", str(FIXTURE), "--include", "tflite"])


def test_cli_missing_weights_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "export.py"), "--weights", str(tmp_path / "none.pt"),
                             "--include", "onnx"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode != 0
    assert "not found" in result.stderr


@needs_fixture
@pytest.mark.skipif(_tensorrt_available(), reason="TensorRT and a GPU are present: the refusal path does not apply")
def test_tensorrt_network_flags_follow_the_version():
    """TensorRT 8.x (JetPack 5 / 6.0) parses ONNX only into explicit-batch networks; 10.x needs no flag."""
    from types import SimpleNamespace

    from utils.export.tensorrt import network_flags

    flags = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    assert network_flags(SimpleNamespace(__version__="8.5.2.2", NetworkDefinitionCreationFlag=flags)) == 1
    assert network_flags(SimpleNamespace(__version__="8.6.1", NetworkDefinitionCreationFlag=flags)) == 1
    assert network_flags(SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=flags)) == 0


def test_engine_without_tensorrt_fails_clearly(tmp_path):
    import export

    with pytest.raises(RuntimeError, match=r"to_trt\.sh"):
        export.main(["--weights", str(FIXTURE), "--include", "engine", "--imgsz", "256", "--output-dir", str(tmp_path)])


@needs_fixture
def test_half_on_cpu_is_refused(tmp_path):
    import export

    with pytest.raises(ValueError, match="CUDA"):
        export.main(["--weights", str(FIXTURE), "--include", "onnx", "--half", "--output-dir", str(tmp_path)])


@needs_fixture
def test_cli_export_and_compare(tmp_path, capsys):
    import export

    assert export.main(["--weights", str(FIXTURE), "--include", "onnx", "--imgsz", "256",
                        "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "max |output - PyTorch|" in printed
    assert (tmp_path / "yolov5n-neu-det-v7.onnx.json").is_file()


@needs_fixture
def test_int8_quantized_onnx_runs(fixture_artifacts, fixture_images, fixture_reference, tmp_path):
    from utils.export.quantize import quantize_onnx_int8

    files = sample_train_files()[:12]
    out = quantize_onnx_int8(fixture_artifacts["onnx"], tmp_path / "int8.onnx", files)
    backend = load_backend(out)
    assert backend.metadata["precision"] == "int8"
    output = backend(fixture_images)
    assert output.shape == fixture_reference.shape
    scores = output[..., 4] * output[..., 5:].amax(-1)
    reference_scores = fixture_reference[..., 4] * fixture_reference[..., 5:].amax(-1)
    assert (scores - reference_scores).abs().max() < 0.15  # 8-bit activations: coarse but close


def _conv_precisions(folder: Path) -> dict[str, str]:
    """Friendly name -> precision OpenVINO's CPU plugin runs each convolution in (from the compiled model)."""
    from utils.export.openvino import openvino_core

    xml = str(next(folder.glob("*.xml")))
    with openvino_core() as core:
        compiled = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            precisions[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    return precisions


@needs_fixture
def test_openvino_int8_is_quantized_by_nncf_and_close(fixture_artifacts, fixture_images, fixture_reference,
                                                      tmp_path):
    """The IR quantized by OpenVINO's own quantizer runs every convolution in 8 bits and stays as close to
    PyTorch as ONNX Runtime's PTQ graph (same 0.15 score bound, test above)."""
    from utils.export.openvino import quantize_openvino_int8

    folder = shutil.copytree(fixture_artifacts["openvino"], tmp_path / "m_openvino_model")
    quantize_openvino_int8(folder, sample_train_files()[:12], (256, 256))
    precisions = _conv_precisions(folder)
    assert len(precisions) == 60 and set(precisions.values()) <= {"i8", "u8"}
    backend = load_backend(folder)
    assert backend.metadata["precision"] == "int8" and backend.metadata["calibration_images"] == 12
    output = backend(fixture_images)
    scores = output[..., 4] * output[..., 5:].amax(-1)
    reference_scores = fixture_reference[..., 4] * fixture_reference[..., 5:].amax(-1)
    assert (scores - reference_scores).abs().max() < 0.15


def test_openvino_int8_keep_leaves_the_chosen_layers_float(tmp_path):
    """--int8-keep in the IR: layers 8 and 9 (SPPF) run their convolutions in FP32, every other one in 8 bits."""
    from models.yolo import DetectionModel
    from utils.export.openvino import export_openvino, quantize_openvino_int8

    model = prepare_for_export(DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=6))
    meta = ExportMetadata(format="openvino", task="detect", stride=32, imgsz=[128, 128], batch=1, names=list("abcdef"))
    folder = export_openvino(model, torch.rand(1, 3, 128, 128), tmp_path / "n_openvino_model", meta)
    quantize_openvino_int8(folder, sample_train_files()[:8], (128, 128), keep_layers=[8, 9])
    precisions = _conv_precisions(folder)
    assert len(precisions) == 60
    for name, precision in precisions.items():
        kept = name.startswith(("/model.8/", "/model.9/"))
        assert (precision == "f32") == kept, (name, precision)
    assert read_metadata(folder)["fp32_layers"] == [8, 9]


# ----------------------------------------------------------------------------- GPU path
@pytest.mark.skipif(not _tensorrt_available(), reason="needs an NVIDIA GPU and the tensorrt package")
def test_tensorrt_engine_matches_pytorch(fixture_artifacts, fixture_images, fixture_reference, tmp_path):
    from utils.export.tensorrt import ShapeProfile, build_engine

    onnx_copy = tmp_path / "m.onnx"
    shutil.copy(fixture_artifacts["onnx"], onnx_copy)
    shutil.copy(metadata_path(fixture_artifacts["onnx"]), metadata_path(onnx_copy))
    profile = ShapeProfile((1, 3, 256, 256), (4, 3, 256, 256), (8, 3, 256, 256))
    engine = build_engine(onnx_copy, tmp_path / "m.engine", profile=profile)
    output = load_backend(engine, device="cuda:0")(fixture_images.cuda()).cpu()
    assert (output - fixture_reference).abs().max() <= 1e-2


def test_int8_keep_leaves_the_chosen_layers_fp32(tmp_path):
    """--int8-keep's layers (here 8 and 9) keep float weights on every Conv; all other backbone/neck convs read
    INT8 weights through DequantizeLinear."""
    import onnx

    from models.yolo import DetectionModel
    from utils.export.onnx import export_onnx
    from utils.export.quantize import quantize_onnx_int8

    model = prepare_for_export(DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=6))
    meta = ExportMetadata(format="onnx", task="detect", stride=32, imgsz=[128, 128], batch=1, names=list("abcdef"))
    file = export_onnx(model, torch.rand(1, 3, 128, 128), tmp_path / "n.onnx", meta)
    out = quantize_onnx_int8(file, tmp_path / "q.onnx", sample_train_files()[:8], keep_layers=[8, 9])
    graph = onnx.load(str(out)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    quantized_weight = {n.name.split("/")[1]: producers.get(n.input[1]) == "DequantizeLinear"
                        for n in graph.node if n.op_type == "Conv" and n.name.startswith("/model.")}
    layers = {int(key.split(".")[1]) for key in quantized_weight}
    assert {8, 9} < layers
    for layer in layers - {24}:  # 24: Detect's output convs stay FP32 in every INT8 graph
        expected = layer not in (8, 9)
        assert all(v == expected for k, v in quantized_weight.items() if int(k.split(".")[1]) == layer), layer
    assert read_metadata(out)["fp32_layers"] == [8, 9]
