"""detect.py end to end with the v7.0 reference checkpoint: same detections as the reference NMS output,
annotated images and label files written, video and .txt-list sources."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from detect import main as detect_main
from utils.common.errors import FlagError
from utils.runners.detect import DetectOptions, run_detect


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return torch.load(fixtures_dir / "yolov5n-neu-det-v7.expected.pt")


def test_detections_equal_reference(fixtures_dir, neu_det_yaml, reference, tmp_path):
    val_dir = neu_det_yaml.parent / "images" / "val"
    list_file = tmp_path / "sources.txt"
    list_file.write_text("\n".join(str(val_dir / name) for name in reference["files"]))
    results = run_detect(DetectOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(list_file), imgsz=256,
                                       device="cpu", project=str(tmp_path), name="run", exist_ok=True, save_txt=True))
    assert [r["path"].split("/")[-1] for r in results] == reference["files"]
    for ours, ref in zip(results, reference["nms_conf0.25_iou0.45"]):
        expected = ref.clone()
        expected[:, :4] = (expected[:, :4] * 200 / 256).clamp(0, 200)  # 256 letterbox frame -> clipped original
        assert ours["detections"].shape == expected.shape
        assert torch.allclose(ours["detections"], expected, atol=1e-2)
    run = tmp_path / "run"
    assert (run / "crazing_100.jpg").exists()
    label = (run / "labels" / "crazing_100.txt").read_text().split()
    assert len(label) == 5 and int(label[0]) == int(reference["nms_conf0.25_iou0.45"][0][0, 5])


def _val_images_as_video(neu_det_yaml, path, frames: int, fps: float):
    """The first ``frames`` NEU-DET val images (200 x 200) as an MJPG video."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (200, 200))
    for image in sorted((neu_det_yaml.parent / "images" / "val").glob("*.jpg"))[:frames]:
        writer.write(cv2.imread(str(image)))
    writer.release()
    return path


def test_video_source_and_cli(fixtures_dir, neu_det_yaml, tmp_path):
    video = _val_images_as_video(neu_det_yaml, tmp_path / "clip.avi", frames=3, fps=5)
    code = detect_main(["--weights", str(fixtures_dir / "yolov5n-neu-det-v7.pt"), "--source", str(video),
                        "--imgsz", "256", "--device", "cpu", "--project", str(tmp_path), "--name", "vid",
                        "--exist-ok"])
    assert code == 0
    capture = cv2.VideoCapture(str(tmp_path / "vid" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()


def test_vid_stride_keeps_every_nth_frame(fixtures_dir, neu_det_yaml, tmp_path):
    video = _val_images_as_video(neu_det_yaml, tmp_path / "clip.avi", frames=5, fps=10)
    weights = str(fixtures_dir / "yolov5n-neu-det-v7.pt")
    every = run_detect(DetectOptions(weights, str(video), imgsz=256, device="cpu", project=str(tmp_path), name="all",
                                     nosave=True))
    strided = run_detect(DetectOptions(weights, str(video), imgsz=256, device="cpu", project=str(tmp_path), name="vid",
                                       vid_stride=2))
    assert [r["frame"] for r in strided] == [0, 2, 4]
    for ours in strided:  # the same frames, decoded the same way
        assert torch.equal(ours["detections"], every[ours["frame"]]["detections"])
    capture = cv2.VideoCapture(str(tmp_path / "vid" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5)
    capture.release()
    with pytest.raises(ValueError, match="--vid-stride must be at least 1"):
        run_detect(DetectOptions(weights, str(video), device="cpu", project=str(tmp_path), name="bad", vid_stride=0))


def test_tta_runs_and_keeps_confident_boxes(fixtures_dir, neu_det_yaml, tmp_path):
    image = neu_det_yaml.parent / "images" / "val" / "crazing_100.jpg"
    plain = run_detect(DetectOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(image), imgsz=256, device="cpu",
                                     project=str(tmp_path), name="a", nosave=True))[0]["detections"]
    tta = run_detect(DetectOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(image), imgsz=256, device="cpu",
                                   project=str(tmp_path), name="b", nosave=True, augment=True))[0]["detections"]
    assert len(tta) >= 1 and np.isfinite(tta.numpy()).all()
    assert len(plain) == 1


def test_missing_source_is_clear(fixtures_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file, folder or glob"):
        run_detect(DetectOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(tmp_path / "nothing"), device="cpu",
                                 project=str(tmp_path)))


@pytest.mark.parametrize("source", ["0", "rtsp://camera.local/stream"])
def test_webcams_and_streams_are_refused_by_name(source, tmp_path, monkeypatch):
    from utils.inference.sources import expand_source

    monkeypatch.chdir(tmp_path)  # no file called "0" here
    with pytest.raises(ValueError, match="webcams and streams are not supported"):
        expand_source(source)


def test_urls_are_refused_with_what_to_do():
    from utils.inference.sources import expand_source

    with pytest.raises(ValueError, match=r"URLs are not downloaded .* pass its path"):
        expand_source("https://example.com/bus.jpg")


def test_txt_list_entries_resolve_beside_the_list_then_in_the_working_directory(tmp_path, monkeypatch):
    from utils.inference.sources import expand_source

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    listing = tmp_path / "lists" / "images.txt"
    listing.write_text("a.jpg\n\nb.png\n")
    monkeypatch.chdir(tmp_path)  # b.png is only found relative to the working directory, as in v7.0
    assert expand_source(listing) == [tmp_path / "lists" / "a.jpg", tmp_path / "b.png"]
    listing.write_text("a.jpg\nmissing.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"images\.txt:2: .*missing\.jpg"):
        expand_source(listing)


def test_v7_command_line_with_data_flag(fixtures_dir, neu_det_yaml, tmp_path):
    """v7.0's detect.py takes --data for class names; names in the weights win, the YAML's fill in when none."""
    from utils.runners.detect import _names_from_data

    image = neu_det_yaml.parent / "images" / "val" / "crazing_100.jpg"
    code = detect_main(["--weights", str(fixtures_dir / "yolov5n-neu-det-v7.pt"), "--source", str(image),
                        "--data", str(neu_det_yaml), "--img", "256", "--device", "cpu", "--save-crop",
                        "--project", str(tmp_path), "--name", "crops", "--exist-ok"])
    assert code == 0
    assert [p.name for p in (tmp_path / "crops" / "crops").iterdir()] == ["crazing"]
    assert _names_from_data(str(neu_det_yaml))[:2] == ["crazing", "inclusion"]
    assert _names_from_data(None) == []


def _every_layer_output(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output, computed by walking the layer graph by hand (no hooks)."""
    outputs: list[torch.Tensor] = []
    x = images
    for layer in model.model:
        if layer.f != -1:
            x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
        x = layer(x)
        outputs.append(x)
    return outputs


def test_visualize_saves_each_layers_feature_maps(fixtures_dir, neu_det_yaml, tmp_path):
    """--visualize writes, per image, one PNG and .npy per layer but the head: the first 32 channels it computed."""
    from utils.inference.predict import prepare_image
    from utils.weights.checkpoint import load_checkpoint

    image = neu_det_yaml.parent / "images" / "val" / "crazing_100.jpg"
    weights = fixtures_dir / "yolov5n-neu-det-v7.pt"
    code = detect_main(["--weights", str(weights), "--source", str(image), "--img", "256", "--device", "cpu",
                        "--visualize", "--project", str(tmp_path), "--name", "vis", "--exist-ok"])
    assert code == 0
    model = load_checkpoint(weights, fuse=True).model.eval()
    images, _ = prepare_image(cv2.imread(str(image)), 256, 32, auto=True)
    with torch.no_grad():
        outputs = _every_layer_output(model, images)
    folder = tmp_path / "vis" / "crazing_100"
    assert len(list(folder.glob("*.png"))) == len(model.model) - 1 == 24
    for i, layer in enumerate(list(model.model)[:-1]):
        stem = folder / f"stage{i}_{type(layer).__name__}_features"
        saved = np.load(f"{stem}.npy")
        np.testing.assert_allclose(saved, outputs[i][0, :32].numpy(), rtol=1e-4, atol=1e-5)
    grid = cv2.imread(str(folder / "stage0_Conv_features.png"))  # 16 channels of 128 x 128: 2 rows of 8
    assert grid.shape == (2 * 130 - 2, 8 * 130 - 2, 3)
    small = cv2.imread(str(folder / "stage9_SPPF_features.png"))  # 8 x 8 maps enlarged 8x to 64 px tiles
    assert small.shape == (4 * 66 - 2, 8 * 66 - 2, 3)


def test_visualize_refuses_tta(fixtures_dir, neu_det_yaml, tmp_path):
    image = neu_det_yaml.parent / "images" / "val" / "crazing_100.jpg"
    with pytest.raises(ValueError, match="--visualize draws one plain forward pass"):
        run_detect(DetectOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(image), imgsz=256, device="cpu",
                                 visualize=True, augment=True, project=str(tmp_path)))


def test_view_img_without_gui_opencv_says_what_to_install(tmp_path):
    """requirements.txt installs the headless OpenCV: --view-img fails at once, naming the package to swap."""
    if "NONE" not in cv2.getBuildInformation().split("GUI:")[1].split("\n")[0]:
        pytest.skip("this OpenCV has a GUI backend, so --view-img is allowed")
    weights = tmp_path / "never-loaded.pt"
    weights.write_text("not a checkpoint: loading it would fail with another error")
    with pytest.raises(FlagError, match="pip install opencv-python"):
        detect_main(["--weights", str(weights), "--view-img"])


def test_view_img_shows_each_annotated_frame(fixtures_dir, neu_det_yaml, tmp_path, monkeypatch):
    """With a GUI the annotated frame (boxes drawn) goes to one window per source, even with --nosave."""
    import utils.runners.detect

    shown = []
    monkeypatch.setattr(utils.runners.detect, "check_display", lambda: None)
    monkeypatch.setattr(cv2, "imshow", lambda window, image: shown.append((window, image.copy())))
    monkeypatch.setattr(cv2, "waitKey", lambda delay: -1)
    source = neu_det_yaml.parent / "images" / "val" / "crazing_10*.jpg"
    results = run_detect(DetectOptions(str(fixtures_dir / "yolov5n-neu-det-v7.pt"), str(source),
                                       imgsz=256, device="cpu", view_img=True, nosave=True, project=str(tmp_path)))
    assert [window for window, _ in shown] == [r["path"] for r in results] and len(shown) >= 2
    for (window, image), result in zip(shown, results):
        original = cv2.imread(window)
        assert image.shape == original.shape
        assert (image != original).any() == (len(result["detections"]) > 0)
    assert not list((tmp_path / "exp").glob("*.jpg"))
