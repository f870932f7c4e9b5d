"""Tests of the detection data pipeline (utils/data): scan, config, augmentations, loader, caches, converters."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from utils.data import CacheSizeError, create_dataloader, load_data_config, load_hyp, scan_dataset
from utils.data.augment import (
    augment_hsv,
    copy_paste,
    flip_lr,
    flip_ud,
    letterbox,
    mosaic4,
    mosaic_placements,
    paste_tiles,
    random_perspective,
    warp_tiles,
)
from utils.data.converters import coco_to_yolo, make_subset, split_dataset, voc_to_yolo
from utils.data.report import dataset_report
from utils.data.scan import is_grey_image, list_image_files
from utils.data.workers import init_worker

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample"
SHARED_DATASETS = (Path(__file__).parents[1] / "../shared/datasets").resolve()


def shared_yaml(name: str) -> Path:
    path = SHARED_DATASETS / name / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/datasets/{name} is not checked out next to the repo)")
    return path


def unique_rows(label_dir: Path) -> int:
    """Boxes a correct scan must keep: distinct rows per file, counted independently of the scanner."""
    return sum(len({tuple(map(float, line.split())) for line in f.read_text().splitlines() if line.strip()})
               for f in label_dir.glob("*.txt"))


# --------------------------------------------------------------------------- scan counts
def test_sample_scan_counts(tmp_path):
    data = load_data_config(ROOT / "data" / "neu-det-sample.yaml")
    assert data["nc"] == 6 and data["names"][0] == "crazing"
    for split, n in (("train", 36), ("val", 12)):
        result = scan_dataset(list_image_files(data[split]), nc=6, cache_dir=tmp_path)
        assert result.report.images == result.report.found == n
        assert result.report.corrupt == result.report.missing == 0
        assert result.report.instances == unique_rows(SAMPLE / "labels" / split)
        assert result.shapes.tolist() == [[200, 200]] * n


def test_neu_det_scan_counts(tmp_path):
    data = load_data_config(shared_yaml("neu-det"))
    train = scan_dataset(list_image_files(data["train"]), nc=6, cache_dir=tmp_path).report
    val = scan_dataset(list_image_files(data["val"]), nc=6, cache_dir=tmp_path).report
    assert (train.images, val.images) == (1440, 360)
    assert val.instances == 828  # 829 rows, one exact duplicate in patches_198
    assert val.rows_dropped["duplicate"] == 1
    assert [i.kind for i in val.issues_for("patches_198.txt")] == ["duplicate"]
    cached = scan_dataset(list_image_files(data["val"]), nc=6, cache_dir=tmp_path)
    assert cached.report.instances == 828 and cached.cache_file.exists()


def test_coco128_scan_counts(tmp_path):
    data = load_data_config(shared_yaml("coco128"))
    report = scan_dataset(list_image_files(data["train"]), nc=80, cache_dir=tmp_path).report
    assert (report.images, report.found, report.backgrounds, report.instances) == (128, 126, 2, 929)


# --------------------------------------------------------------------------- corrupt data
def make_corrupt_set(root: Path) -> Path:
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    sources = sorted((SAMPLE / "images" / "train").glob("*.jpg"))[:6]
    for name, src in zip(("good", "trunc", "rows", "dups", "empty", "nolabel"), sources):
        shutil.copyfile(src, images / f"{name}.jpg")
    raw = (images / "trunc.jpg").read_bytes()
    (images / "trunc.jpg").write_bytes(raw[: int(len(raw) * 0.7)])
    (images / "text.jpg").write_text("this is not an image\n")
    (labels / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (labels / "trunc.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (labels / "text.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (labels / "rows.txt").write_text("0 0.5 0.5 0.2\n1 nan 0.5 0.2 0.2\n99 0.5 0.5 0.2 0.2\n2 1.7 0.5 0.2 0.2\n"
                                     "3 0.5 0.5 0.0 0.2\n4 0.5 0.5 0.2 0.2\n5 1.0004 0.5 0.2 0.2\nx 0.1 0.1 0.1 0.1\n")
    (labels / "dups.txt").write_text("2 0.3 0.3 0.1 0.1\n2 0.3 0.3 0.1 0.1\n1 0.6 0.6 0.2 0.2\n")
    (labels / "empty.txt").write_text("")
    return images


def test_corrupt_files_reported_and_skipped(tmp_path, caplog):
    images = make_corrupt_set(tmp_path / "set")
    truncated = (images / "trunc.jpg").read_bytes()
    with caplog.at_level(logging.WARNING, logger="utils.data.scan"):
        result = scan_dataset(list_image_files(images), nc=6, cache_dir=tmp_path / "cache")
    report = result.report
    names = [Path(f).name for f in result.im_files]
    assert "text.jpg" not in names and report.corrupt == 1
    assert report.issues_for("text.jpg")[0].kind == "corrupt_image"
    assert "trunc.jpg" in names and report.repaired == 1
    assert "repaired" in report.issues_for("trunc.jpg")[0].detail
    repaired = Path(result.im_files[names.index("trunc.jpg")])
    assert (tmp_path / "cache" / "repaired") in repaired.parents  # the copy lives in the cache folder ...
    assert cv2.imread(str(repaired)) is not None and repaired.read_bytes()[-2:] == b"\xff\xd9"
    assert (images / "trunc.jpg").read_bytes() == truncated  # ... and the user's file is left as it was
    expected = {"columns": 1, "non_numeric": 2, "class_ge_nc": 1, "out_of_range": 1, "zero_size": 1,
                "duplicate": 1, "class_id": 0}
    assert {k: report.rows_dropped[k] for k in expected} == expected
    assert {i.kind for i in report.issues_for("rows.txt")} == {"columns", "non_numeric", "out_of_range",
                                                                "zero_size", "class_ge_nc"}
    assert report.rows_clipped == 1  # x = 1.0004 is inside the 1e-3 tolerance: clipped to 1, kept
    rows = result.labels[names.index("rows.jpg")]
    assert rows[:, 0].tolist() == [4, 5] and rows[:, 1].max() == 1.0
    assert len(result.labels[names.index("dups.jpg")]) == 2
    assert (report.found, report.empty, report.missing) == (4, 1, 1)  # text.txt belongs to a skipped image
    assert report.instances == 1 + 1 + 2 + 2
    assert "rows.txt" in caplog.text and "text.jpg" in caplog.text


def test_exif_orientation_sets_shape(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(images / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(images / "plain.png")
    result = scan_dataset(list_image_files(images), cache_dir=tmp_path)
    assert result.shapes.tolist() == [[40, 20], [20, 40]]  # (w, h) of plain.png, rotated.jpg
    assert cv2.imread(str(images / "rotated.jpg")).shape[:2] == (40, 20)  # the loader sees it upright too


def test_scan_cache_invalidated_by_change(tmp_path):
    images = make_corrupt_set(tmp_path / "set")
    first = scan_dataset(list_image_files(images), nc=6, cache_dir=tmp_path / "cache")
    (images.parent.parent / "labels" / "train" / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.4 0.4 0.1 0.1\n")
    second = scan_dataset(list_image_files(images), nc=6, cache_dir=tmp_path / "cache")
    assert second.report.instances == first.report.instances + 1


# --------------------------------------------------------------------------- config
def test_data_config_paths_and_names(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(SAMPLE, root)
    (root / "train.txt").write_text("./images/train/crazing_1.jpg\nimages/train/crazing_10.jpg\n")
    cfg = tmp_path / "cfg" / "d.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({"path": "../ds", "train": "train.txt", "val": ["images/val"],
                                   "names": {0: "a", 1: "b", 2: "c", 3: "d", 4: "e", 5: "f"}, "heads": {"x": 1}}))
    data = load_data_config(cfg)
    assert data["path"] == str(root.resolve()) and data["names"] == list("abcdef") and data["nc"] == 6
    assert data["heads"] == {"x": 1} and data["val"] == [str((root / "images" / "val").resolve())]
    assert [Path(f).name for f in list_image_files(data["train"])] == ["crazing_1.jpg", "crazing_10.jpg"]
    cfg.write_text(yaml.safe_dump({"path": str(root), "train": "images/nope", "nc": 1, "names": ["a"]}))
    with pytest.raises(FileNotFoundError, match="images/nope") as missing:
        load_data_config(cfg)
    assert "download" not in str(missing.value)
    cfg.write_text(yaml.safe_dump({"path": str(root), "train": "images/nope", "nc": 1, "names": ["a"],
                                   "download": "https://example.com/d.zip"}))  # v7.0 would fetch it
    with pytest.raises(FileNotFoundError, match=r"images/nope.*'download' is not run \(no network"):
        load_data_config(cfg)
    cfg.write_text(yaml.safe_dump({"train": str(root / "images" / "train"), "nc": 3, "names": ["a"]}))
    with pytest.raises(ValueError, match=r"d\.yaml.*nc is 3"):
        load_data_config(cfg)


# --------------------------------------------------------------------------- augmentations
def boxes_image(shape=(120, 160)) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((*shape, 3), np.uint8)
    img[20:50, 30:70] = 255  # box 0: x 30-70, y 20-50
    labels = np.array([[0, 50 / 160, 35 / 120, 40 / 160, 30 / 120]], np.float32)
    return img, labels


def white_box(img: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(img[..., 0])
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_flips_map_boxes_exactly():
    img, labels = boxes_image()
    for flip in (flip_lr, flip_ud):
        out, lab = flip(img, labels)
        cx, cy, w, h = lab[0, 1:] * [160, 120, 160, 120]
        assert np.allclose(white_box(out), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        assert np.allclose(flip(out, lab)[1], labels)


def test_identity_affine_keeps_image_and_boxes():
    img, _ = boxes_image()
    labels = np.array([[0, 30, 20, 70, 50], [1, 5, 5, 100, 90]], np.float32)
    out, lab = random_perspective(img, labels.copy(), degrees=0, translate=0, scale=0, shear=0, perspective=0)
    assert np.array_equal(out, img) and np.allclose(lab, labels)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Blurred colour gradient + noise: interpolation differences stay far below one grey level."""
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 60, (h, w, 3))
    img = np.stack([xx * 200 // w, yy * 200 // h, (xx + yy) * 100 // (w + h)], -1) + noise
    return cv2.GaussianBlur(img.astype(np.uint8), (0, 0), 3)


def test_direct_mosaic_warp_matches_canvas_warp():
    """warp_tiles = v7.0's 2s canvas + warpAffine on real NEU-DET tiles: at most 1 grey level apart (fixed-point
    rounding) and exact grey outside the tiles, except in a band of a few pixels along the seams."""
    s = 128
    images = [cv2.resize(cv2.imread(str(f)), (s, s)) for f in sorted((SAMPLE / "images" / "train").glob("*"))[:4]]
    images[1] = images[1][:90]  # one short tile, so the canvas has grey gaps
    grey_seen = 0
    for xc, yc, a, tx, ty in ((90, 150, 0.55, 5.3, -20.2), (140, 120, 1.4, -110.7, -90.1), (70, 190, 1.0, -60, -70)):
        placements = mosaic_placements(xc, yc, s, [im.shape[:2] for im in images])
        matrix = np.array([[a, 0, tx], [0, a, ty], [0, 0, 1.0]])
        reference = cv2.warpAffine(paste_tiles(images, placements, s), matrix[:2], (s, s),
                                   borderValue=(114, 114, 114))
        direct = warp_tiles(images, placements, matrix, s)
        tile_id = np.full((2 * s, 2 * s), 9, np.uint8)
        for k, (dst, _) in enumerate(placements):
            tile_id[dst[1]:dst[3], dst[0]:dst[2]] = k
        out_id = cv2.warpAffine(tile_id, matrix[:2], (s, s), flags=cv2.INTER_NEAREST, borderValue=9)
        kernel = np.ones((5, 5), np.uint8)
        away_from_seams = cv2.erode(out_id, kernel) == cv2.dilate(out_id, kernel)
        diff = np.abs(direct.astype(int) - reference)[away_from_seams]
        assert away_from_seams.mean() > 0.7 and diff.max() <= 1 and diff.mean() < 0.2
        assert (direct[(out_id == 9) & away_from_seams] == 114).all()
        grey_seen += int((out_id == 9).sum())
        assert np.abs(np.roll(direct, 1, 1).astype(int) - reference)[away_from_seams].mean() > 2  # test has teeth
    assert grey_seen > 100


def test_grey_images_take_the_one_channel_path_exactly():
    """NEU-DET images are grey (B == G == R): decoded in one channel, warped and HSV-augmented there, they give
    bit-identical training samples to the 3-channel computation on the same images."""
    _, dataset = create_dataloader(str(SAMPLE / "images" / "train"), 128, 4, 32, hyp=load_hyp(), augment=True,
                                   seed=2)
    assert dataset.grey.all()
    samples = []
    for grey in (True, False):
        dataset.grey[:] = grey
        dataset.reseed(7)
        samples.append([dataset[i] for i in range(8)])
    for (img, lab, *_), (img3, lab3, *_) in zip(*samples):
        assert torch.equal(lab, lab3) and torch.equal(img, img3)
    one = cv2.imread(dataset.im_files[0], cv2.IMREAD_GRAYSCALE)
    three = np.repeat(one[..., None], 3, 2)
    augment_hsv(one, rng=np.random.default_rng(1))
    augment_hsv(three, rng=np.random.default_rng(1))
    assert (three == one[..., None]).all()


def test_hsv_matches_v7_per_channel_tables():
    """augment_hsv (one 3-channel table) = v7.0's BGR->HSV, one table per channel, HSV->BGR, same gains."""
    img = smooth_image(48, 64, 4)
    for seed in range(3):
        gains = np.random.default_rng(seed).uniform(-1, 1, 3) * [0.015, 0.7, 0.4] + 1
        x = np.arange(256)
        hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
        tables = ((x * gains[0]) % 180, np.clip(x * gains[1], 0, 255), np.clip(x * gains[2], 0, 255))
        merged = cv2.merge([table.astype(np.uint8)[ch] for table, ch in zip(tables, (hue, sat, val))])
        expected = cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)
        out = img.copy()
        augment_hsv(out, 0.015, 0.7, 0.4, rng=np.random.default_rng(seed))
        assert np.array_equal(out, expected) and not np.array_equal(out, img)


def test_grey_detection(tmp_path):
    grey = smooth_image(64, 64, 0)[..., :1].repeat(3, 2)
    almost = grey.copy()
    almost[40, 40] = (10, 200, 10)  # one coloured pixel: the 1/8 decode may miss it, the full decode must not
    for name, img, expected in (("grey.png", grey, True), ("almost.png", almost, False),
                                ("colour.jpg", smooth_image(64, 64, 1), False)):
        cv2.imwrite(str(tmp_path / name), img)
        assert is_grey_image(str(tmp_path / name)) is expected, name


def test_letterbox_v7_rounding():
    img = np.zeros((100, 201, 3), np.uint8)
    out, ratio, (dw, dh) = letterbox(img, (160, 160), auto=False)
    assert out.shape == (160, 160, 3) and ratio[0] == pytest.approx(160 / 201)
    assert (dw, dh) == (0.0, 40.0)
    out, _, (dw, dh) = letterbox(np.zeros((99, 200, 3), np.uint8), 200, auto=False)
    assert dh == 50.5 and (out[:50] == 114).all() and (out[:51] != 114).any() and (out[-51:] == 114).all()
    assert letterbox(img, 640, auto=True)[0].shape == (320, 640, 3)  # 318 rows + 2 px to the next x32


def test_mosaic_boxes_inside_and_nonzero():
    rng = np.random.default_rng(0)
    hyp = {**load_hyp(), "scale": 0.9, "degrees": 10, "shear": 5}
    images = [np.full((64, 64 + 16 * i, 3), 40 * i, np.uint8) for i in range(4)]
    labels = [np.array([[i, 0.5, 0.5, 0.6, 0.4], [i, 0.1, 0.9, 0.3, 0.3]], np.float32) for i in range(4)]
    for _ in range(40):
        img, lab = mosaic4(images, labels, 64, hyp, rng=rng)
        assert img.shape == (64, 64, 3)
        assert (lab[:, 1:] >= 0).all() and (lab[:, [1, 3]] <= 64).all() and (lab[:, [2, 4]] <= 64).all()
        assert ((lab[:, 3] - lab[:, 1]) > 2).all() and ((lab[:, 4] - lab[:, 2]) > 2).all()


def test_mosaic_of_grey_and_colour_tiles_is_colour():
    """A data set with a few grey images (COCO has some) mixes 2-D and 3-channel tiles in one mosaic."""
    grey, colour = np.full((64, 64), 50, np.uint8), np.full((64, 64, 3), (10, 20, 30), np.uint8)
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.5]], np.float32)] * 4
    for direct in (True, False):
        img, _ = mosaic4([grey, colour, grey, colour], labels, 64, load_hyp(), np.random.default_rng(0), direct)
        assert img.shape == (64, 64, 3)
        pixels = {tuple(int(v) for v in p) for p in img.reshape(-1, 3)}
        assert {(50, 50, 50), (10, 20, 30)} <= pixels


def test_copy_paste_pastes_mirrored_box():
    img = np.zeros((100, 200, 3), np.uint8)
    img[10:40, 20:60] = 200
    labels = np.array([[3, 20, 10, 60, 40]], np.float32)
    out, lab = copy_paste(img.copy(), labels, p=1.0, rng=np.random.default_rng(0))
    assert lab.tolist() == [[3, 20, 10, 60, 40], [3, 140, 10, 180, 40]]
    assert (out[10:40, 140:180] == 200).all() and (out[10:40, 20:60] == 200).all()
    centred = np.array([[1, 80, 10, 120, 40]], np.float32)  # its mirror is itself: ioa 1 -> not pasted
    assert len(copy_paste(img.copy(), centred, p=1.0)[1]) == 1


# --------------------------------------------------------------------------- loader
def test_rect_val_batches_neu_det(tmp_path):
    data = load_data_config(shared_yaml("neu-det"))
    loader, dataset = create_dataloader(data["val"], 256, 32, 32, rect=True, pad=0.5, cache_dir=tmp_path)
    assert dataset.batch_shapes.tolist() == [[288, 288]] * 12
    imgs, labels, _, shapes = next(iter(loader))
    assert imgs.shape == (32, 3, 288, 288) and imgs.dtype == torch.uint8
    assert (imgs[:, :, :16] == 114).all() and (imgs[:, :, -16:] == 114).all()
    assert (imgs[:, :, :, :16] == 114).all() and (imgs[:, :, :, -16:] == 114).all()
    assert shapes[0][0] == (200, 200) and shapes[0][1][0] == (1.28, 1.28) and tuple(shapes[0][1][1]) == (16, 16)
    assert labels[:, 0].max() == 31 and ((labels[:, 2:] > 0) & (labels[:, 2:] <= 1)).all()
    assert sum(len(lb) for lb in dataset.labels) == 828


def test_sample_val_labels_match_files(tmp_path):
    """Val sample: boxes in the returned 288 image are the file boxes scaled by 256/288 and shifted by 16 px."""
    _, dataset = create_dataloader(str(SAMPLE / "images" / "val"), 256, 4, 32, rect=True, pad=0.5)
    labels = dataset[0][1]
    expected = dataset.labels[0]
    assert np.allclose(labels[:, 2:4].numpy(), (expected[:, 1:3] * 256 + 16) / 288, atol=1e-5)
    assert np.allclose(labels[:, 4:].numpy(), expected[:, 3:] * 256 / 288, atol=1e-5)


def train_batch(seed: int, workers: int = 0, cache=None, **kwargs):
    loader, _ = create_dataloader(str(SAMPLE / "images" / "train"), 128, 8, 32, hyp=load_hyp(), augment=True,
                                  shuffle=True, seed=seed, workers=workers, cache=cache, **kwargs)
    return next(iter(loader))


def test_determinism_same_seed_same_batch():
    a, b, c = train_batch(3), train_batch(3), train_batch(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    a2, b2 = train_batch(3, workers=2), train_batch(3, workers=2)
    assert torch.equal(a2[0], b2[0]) and torch.equal(a2[1], b2[1])


def test_fast_ops_match_v7_operations():
    """Speed-ups (one-channel grey, mosaic warped straight from the tiles, cv2 flips): same labels, pixels within
    fixed-point rounding except along the tile seams (mean |diff| < 0.3 grey levels)."""
    samples = []
    for fast in (True, False):
        _, dataset = create_dataloader(str(SAMPLE / "images" / "train"), 128, 4, 32, hyp=load_hyp(), augment=True,
                                       seed=5)
        dataset.fast_ops = fast
        samples.append([dataset[i] for i in range(6)])
    for (img, lab, *_), (img0, lab0, *_) in zip(*samples):
        assert torch.equal(lab, lab0) and (img.float() - img0.float()).abs().mean() < 0.3


def test_mosaic_training_labels_valid():
    imgs, labels, _, shapes = train_batch(0)
    assert imgs.shape == (8, 3, 128, 128) and all(s is None for s in shapes)
    xyxy = torch.cat((labels[:, 2:4] - labels[:, 4:] / 2, labels[:, 2:4] + labels[:, 4:] / 2), 1)
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all() and (labels[:, 4:] > 0).all()


def val_samples(cache, tmp_path, imgsz=256):
    _, dataset = create_dataloader(str(SAMPLE / "images" / "val"), imgsz, 4, 32, rect=True, pad=0.5, cache=cache,
                                   cache_dir=tmp_path)
    return [dataset[i] for i in range(len(dataset))]


def test_caches_match_uncached(tmp_path):
    """ram and disk: identical samples. ram-jpeg keeps a JPEG the resize would not shrink as the file's own
    bytes (200 px NEU images at 256: identical) and re-encodes shrunk ones (at 128: JPEG error only)."""
    for imgsz, cache, tolerance in ((256, "ram", 0), (256, "disk", 0), (256, "ram-jpeg", 0), (128, "ram-jpeg", 3.0)):
        plain = val_samples(None, tmp_path, imgsz)
        for (img, lab, path, shape), (img0, lab0, path0, shape0) in zip(val_samples(cache, tmp_path, imgsz), plain):
            assert path == path0 and torch.equal(lab, lab0) and shape == shape0
            difference = (img.float() - img0.float()).abs().mean()
            assert difference <= tolerance, cache
            assert difference > 0 or tolerance == 0, "the re-encoded branch was not exercised"
    assert len(list(tmp_path.rglob("*.npy"))) == 12


def test_cache_refused_when_ram_too_small(monkeypatch):
    class Tiny:
        available = 1000

    monkeypatch.setattr("utils.data.detect.psutil.virtual_memory", lambda: Tiny())
    with pytest.raises(CacheSizeError, match="ram-jpeg"):
        create_dataloader(str(SAMPLE / "images" / "val"), 256, 4, 32, cache="ram")


def test_single_cls_and_image_weights():
    _, dataset = create_dataloader(str(SAMPLE / "images" / "train"), 128, 4, 32, single_cls=True,
                                   image_weights=True)
    assert all((lb[:, 0] == 0).all() for lb in dataset.labels)
    assert len(dataset.indices) == dataset.n


# --------------------------------------------------------------------------- converters and report
def test_voc_round_trip(tmp_path):
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "a.xml").write_text(
        "<annotation><size><width>200</width><height>100</height><depth>3</depth></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>51</xmax>"
        "<ymax>81</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
        "<ymax>9</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>101</xmin><ymin>1</ymin><xmax>201</xmax><ymax>51</ymax></bndbox>"
        "</object></annotation>")
    names = voc_to_yolo(xml, tmp_path / "labels")
    assert names == ["cat", "dog"]
    rows = np.loadtxt(tmp_path / "labels" / "a.txt")
    assert np.allclose(rows, [[1, 30 / 200, 50 / 100, 40 / 200, 60 / 100], [0, 150 / 200, 25 / 100, 0.5, 0.5]],
                       atol=1e-6)


def test_coco_round_trip(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "x/img7.jpg", "width": 100, "height": 50},
                       {"id": 8, "file_name": "img8.jpg", "width": 10, "height": 10}],
            "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
            "annotations": [{"image_id": 7, "category_id": 90, "bbox": [10, 5, 20, 10], "iscrowd": 0},
                            {"image_id": 7, "category_id": 1, "bbox": [0, 0, 100, 50], "iscrowd": 1},
                            {"image_id": 7, "category_id": 1, "bbox": [50, 25, 50, 25], "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    assert coco_to_yolo(tmp_path / "ann.json", tmp_path / "labels") == ["person", "toothbrush"]
    rows = np.loadtxt(tmp_path / "labels" / "img7.txt")
    assert np.allclose(rows, [[1, 0.2, 0.2, 0.2, 0.2], [0, 0.75, 0.75, 0.5, 0.5]])
    assert (tmp_path / "labels" / "img8.txt").read_text() == ""


def _voc_object(name: str | None, box: tuple | None, difficult: int = 0) -> str:
    name_tag = "" if name is None else f"<name>{name}</name>"
    box_tag = "" if box is None else "<bndbox>" + "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
    return f"<object>{name_tag}<difficult>{difficult}</difficult>{box_tag}</object>"


def _voc_file(folder: Path, stem: str, size: tuple[int, int] | None, objects: list[str]) -> None:
    size_tag = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
    (folder / f"{stem}.xml").write_text(f"<annotation>{size_tag}{''.join(objects)}</annotation>")


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_voc_reports_every_dropped_and_repaired_object(tmp_path, capsys):
    """Swapped corners and boxes beyond the image are repaired, the rest dropped; every one is counted and the
    first of each reason named by file and object; --strict refuses them and writes nothing."""
    from utils.common.cli import run_cli
    from utils.data.converters import main, read_voc

    xml = tmp_path / "xml"
    xml.mkdir()
    _voc_file(xml, "a", (200, 100), [
        _voc_object("dog", (11, 21, 51, 81)),
        _voc_object("dog", (51, 21, 11, 81)),  # xmin > xmax: swapped (v7.0-style code wrote a zero-width row)
        _voc_object("cat", (101, 1, 260, 51)),  # 59 px beyond the right edge: clipped
        _voc_object("cat", (5, 5, 5, 40)),  # zero width
        _voc_object("cat", (300, 1, 400, 50)),  # right of the image
        _voc_object("cat", ("abc", 1, 20, 20)),
        _voc_object(None, (1, 1, 20, 20)),
        _voc_object("cat", (1, 1, 20, 20), difficult=1),
        _voc_object("cat", (0, 0, 20, 20)),  # 1 px beyond (a 0-based tool): clipped without a report
    ])
    _voc_file(xml, "b", None, [_voc_object("dog", (1, 1, 10, 10))])  # no size: no b.txt
    _voc_file(xml, "c", None, [])
    before = tree_digest(xml)
    report = read_voc(xml).report
    assert report.dropped == {"zero_size": 1, "outside_image": 1, "bad_box": 1, "no_name": 1, "no_image_size": 1}
    assert report.repaired == {"swapped_corners": 1, "clipped": 1} and report.skipped == {"difficult": 1}
    assert report.examples["swapped_corners"] == [f"{xml / 'a.xml'} object 2: xmin 51 ymin 21 xmax 11 ymax 81: "
                                                  "xmin > xmax, swapped"]
    assert report.examples["clipped"] == [f"{xml / 'a.xml'} object 3: xmin 101 ymin 1 xmax 260 ymax 51: 59 px "
                                          "beyond the 200x100 image, clipped"]
    assert report.examples["no_image_size"] == [f"{xml / 'b.xml'} object 1: no positive <width> and <height> in "
                                                "<size>, dropped"]
    assert report.first == report.examples["swapped_corners"][0]
    assert read_voc(xml, names=["cat", "dgo"]).report.dropped["class_not_in_names"] == 3
    lines = read_voc(xml, names=["dog"]).report.lines()
    assert lines[0] == ("7 annotations dropped (class_not_in_names 5, no_image_size 1, no_name 1), 1 repaired "
                        "(swapped_corners 1)")
    assert lines[1:5] == [f"class_not_in_names: {xml / 'a.xml'} object {k}: class 'cat' is not in --names, dropped"
                          for k in (3, 4, 5)] + ["class_not_in_names: ... and 2 more"]

    assert run_cli(main, ["voc2yolo", "--xml", str(xml), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: voc2yolo --strict: {xml}: 5 annotations dropped (bad_box 1, no_image_size 1, no_name 1, "
                   "outside_image 1, zero_size 1), 2 repaired (clipped 1, swapped_corners 1); first: "
                   f"{report.first}; nothing was written to {tmp_path / 'strict'} (without --strict the labels are "
                   "written with these drops and repairs)\n")
    assert not (tmp_path / "strict").exists()

    assert run_cli(main, ["voc2yolo", "--xml", str(xml), "--out", str(tmp_path / "labels")]) == 0
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["a.txt", "c.txt"]
    rows = np.loadtxt(tmp_path / "labels" / "a.txt")
    assert np.allclose(rows, [[1, 30 / 200, 50 / 100, 40 / 200, 60 / 100], [1, 30 / 200, 50 / 100, 40 / 200, 60 / 100],
                              [0, 150 / 200, 25 / 100, 0.5, 0.5], [0, 9.5 / 200, 9.5 / 100, 19 / 200, 19 / 100]],
                       atol=1e-6)
    assert (tmp_path / "labels" / "c.txt").read_text() == ""
    assert tree_digest(xml) == before


def test_coco_reports_every_dropped_and_repaired_annotation(tmp_path, capsys):
    """Unknown category or image ids, negative, zero or malformed boxes are dropped, boxes beyond the image
    clipped; every one is counted and named by its index and id; --strict refuses them and writes nothing."""
    from utils.common.cli import run_cli
    from utils.data.converters import main, read_coco

    anns = [(7, 90, [10, 5, 20, 10]), (7, 1, [50, 25, 50, 25]), (7, 3, [1, 1, 5, 5]), (7, 1, [10, 10, -5, 5]),
            (99, 1, [1, 1, 5, 5]), (7, 1, [80, 40, 40, 20]), (8, 1, [0, 0, 0, 5]), (9, 1, [1, 1, 2, 2]),
            (8, 1, "abc")]
    coco = {"images": [{"id": 7, "file_name": "x/img7.jpg", "width": 100, "height": 50},
                       {"id": 8, "file_name": "img8.jpg", "width": 10, "height": 10},
                       {"id": 9, "file_name": "img9.jpg"}],
            "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
            "annotations": [{"id": 100 + i, "image_id": im, "category_id": cat, "bbox": box, "iscrowd": 0}
                            for i, (im, cat, box) in enumerate(anns)]
            + [{"id": 200, "image_id": 7, "category_id": 1, "bbox": [0, 0, 100, 50], "iscrowd": 1}]}
    source = tmp_path / "ann.json"
    source.write_text(json.dumps(coco))
    before = source.read_bytes()
    report = read_coco(source).report
    assert report.dropped == {"unknown_category": 1, "negative_size": 1, "unknown_image": 1, "zero_size": 1,
                              "no_image_size": 1, "bad_box": 1}
    assert report.repaired == {"clipped": 1} and report.skipped == {"iscrowd": 1}
    assert report.first == f"{source} annotations[2] (id 102): category_id 3 is not in categories, dropped"
    assert report.examples["negative_size"] == [f"{source} annotations[3] (id 103): bbox [10, 10, -5, 5]: negative "
                                                "width or height, dropped"]
    assert report.examples["clipped"] == [f"{source} annotations[5] (id 105): bbox [80, 40, 40, 20]: 20 px beyond "
                                          "the 100x50 image, clipped"]

    assert run_cli(main, ["coco2yolo", "--json", str(source), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: coco2yolo --strict: {source}: 6 annotations dropped (bad_box 1, negative_size 1, "
                   "no_image_size 1, unknown_category 1, unknown_image 1, zero_size 1), 1 repaired (clipped 1); "
                   f"first: {report.first}; nothing was written to {tmp_path / 'strict'} (without --strict the "
                   "labels are written with these drops and repairs)\n")
    assert not (tmp_path / "strict").exists()

    assert run_cli(main, ["coco2yolo", "--json", str(source), "--out", str(tmp_path / "labels")]) == 0
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["img7.txt", "img8.txt"]  # img9: no size
    rows = np.loadtxt(tmp_path / "labels" / "img7.txt")
    assert np.allclose(rows, [[1, 0.2, 0.2, 0.2, 0.2], [0, 0.75, 0.75, 0.5, 0.5], [0, 0.9, 0.9, 0.2, 0.2]])
    assert (tmp_path / "labels" / "img8.txt").read_text() == ""
    assert source.read_bytes() == before


def test_split_and_subset(tmp_path):
    images = SAMPLE / "images" / "train"
    first = split_dataset(images, tmp_path / "s1", (0.5, 0.5, 0.0), seed=1)
    again = split_dataset(images, tmp_path / "s2", (0.5, 0.5, 0.0), seed=1)
    assert first == again and len(first["train"]) + len(first["val"]) == 36 and not first["test"]
    assert (tmp_path / "s1" / "val.txt").read_text().count("\n") == len(first["val"])
    written = make_subset(images, tmp_path / "sub", 4, class_id=2, seed=0)
    assert len(written) == 4
    for path in written:
        rows = np.loadtxt(tmp_path / "sub" / "labels" / "train" / f"{path.stem}.txt", ndmin=2)
        assert len(rows) and (rows[:, 0] == 0).all()


def test_report_finds_duplicates(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(SAMPLE, root)
    shutil.copyfile(root / "images" / "train" / "crazing_1.jpg", root / "images" / "val" / "copy.jpg")
    (root / "d.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                 "names": ["a", "b", "c", "d", "e", "f"]}))
    report = dataset_report(root / "d.yaml", imgsz=256)
    assert report["splits"]["train"]["images"] == 36 and report["splits"]["val"]["backgrounds"] == 1
    leaks = report["duplicates"]["across"]["train/val"]
    assert [[Path(p).name for p in group] for group in leaks] == [["crazing_1.jpg", "copy.jpg"]]
    sizes = report["splits"]["train"]["box_sizes"]
    assert sizes["small"] + sizes["medium"] + sizes["large"] == report["splits"]["train"]["instances"]


class _WorkerState(torch.utils.data.Dataset):
    """Each item reports the niceness and OpenCV thread count of the process that produced it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int]:
        return os.nice(0), cv2.getNumThreads()


@pytest.mark.skipif(not hasattr(os, "nice"), reason="process niceness is a Unix feature")
def test_loader_workers_yield_the_cpu_to_the_trainer():
    own = os.nice(0)
    if own >= 19:
        pytest.skip("this process already runs at the lowest priority")
    loader = torch.utils.data.DataLoader(_WorkerState(), batch_size=1, num_workers=1, worker_init_fn=init_worker)
    assert [(int(n), int(t)) for n, t in loader] == [(19, 1)] * 2  # lowest priority, one OpenCV thread
    assert os.nice(0) == own  # the trainer's own priority is untouched
