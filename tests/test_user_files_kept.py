"""Nothing of the user's is changed or lost (issue 25, section 3), and no two files share a cache entry.

A scan that repairs a truncated JPEG leaves the data set byte-identical (the repaired copy lives in the cache
folder), a new run of train.py, val.py or detect.py started with ``--exist-ok`` in an earlier run's folder sets
everything of that run aside (``previous``, ``previous2``...) instead of mixing with or overwriting it, and temp
files of an interrupted checkpoint save are cleaned up by the next run in that folder.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from utils.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample"
SAMPLE_YAML = ROOT / "data" / "neu-det-sample.yaml"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncated_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the sample's val split whose first image lost the last 30 % of its bytes (and its end marker)."""
    data = tmp_path / "set"
    shutil.copytree(SAMPLE / "images" / "val", data / "images" / "val")
    shutil.copytree(SAMPLE / "labels" / "val", data / "labels" / "val", ignore=shutil.ignore_patterns("*.cache"))
    victim = sorted((data / "images" / "val").glob("*.jpg"))[0]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: int(len(raw) * 0.7)])
    return data, victim


# ------------------------------------------------------------------------------------ repaired JPEGs
def test_repair_leaves_the_data_set_byte_identical(tmp_path):
    from utils.data import list_image_files, scan_dataset

    data, victim = _truncated_copy(tmp_path)
    before = tree_digest(data)
    result = scan_dataset(list_image_files(data / "images" / "val"), nc=6, cache_dir=tmp_path / "cache")
    assert result.report.repaired == 1
    assert tree_digest(data) == before
    used = Path(next(f for f in result.im_files if Path(f).name == victim.name))
    assert used != victim and (tmp_path / "cache" / "repaired") in used.parents
    assert cv2.imread(str(used)).shape == (200, 200, 3)
    again = scan_dataset(list_image_files(data / "images" / "val"), nc=6, cache_dir=tmp_path / "cache")
    assert again.im_files == result.im_files  # the cached scan points at the same repaired copy


def test_repair_with_the_default_cache_folders(tmp_path, monkeypatch):
    """Without a cache folder: the repaired copy goes to the user cache; the data set only gains v7.0's scan
    cache file beside the labels, every file it had is byte-identical."""
    from utils.data import list_image_files, scan_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data, victim = _truncated_copy(tmp_path)
    before = tree_digest(data)
    result = scan_dataset(list_image_files(data / "images" / "val"), nc=6)
    after = tree_digest(data)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["labels/val.cache"]
    used = Path(next(f for f in result.im_files if Path(f).name == victim.name))
    assert (tmp_path / "xdg" / "yolo-data" / "repaired") in used.parents


# ------------------------------------------------------------------------------------ cache keys
def test_two_images_with_one_stem_never_share_a_disk_cache_entry(tmp_path):
    """x.jpg and x.png (different pictures) once both mapped to x.npy: the second overwrote the first."""
    from utils.data import create_dataloader

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    sources = sorted((SAMPLE / "images" / "val").glob("*.jpg"))
    shutil.copyfile(sources[0], images / "x.jpg")
    cv2.imwrite(str(images / "x.png"), cv2.imread(str(sources[5])))
    (labels / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    for cache_dir in (None, tmp_path / "cache"):  # beside the images (v7.0) and in a cache folder
        _, dataset = create_dataloader(str(images), 200, 2, 32, cache="disk", cache_dir=cache_dir)
        for i, path in enumerate(dataset.im_files):
            cached, _, _ = dataset.load_image(i)
            assert np.array_equal(cached, cv2.imread(path, cv2.IMREAD_GRAYSCALE if dataset.grey[i] else
                                                     cv2.IMREAD_COLOR)), path
    assert len(list(images.glob("*.npy"))) == 2


def test_a_replaced_image_gets_a_new_disk_cache_entry(tmp_path):
    """An image replaced by another one with an older mtime (cp -p) once kept serving the old pixels."""
    from utils.data import create_dataloader

    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((SAMPLE / "images" / "val").glob("*.jpg"))
    shutil.copyfile(sources[0], images / "a.jpg")
    _, dataset = create_dataloader(str(images), 200, 1, 32, cache="disk")
    first = dataset.load_image(0)[0]
    shutil.copyfile(sources[3], images / "a.jpg")
    os.utime(images / "a.jpg", ns=(1, 1))  # an mtime far older than the cached .npy's
    _, dataset = create_dataloader(str(images), 200, 1, 32, cache="disk")
    second = dataset.load_image(0)[0]
    assert not np.array_equal(first, second)
    assert np.array_equal(second, cv2.imread(str(images / "a.jpg"), cv2.IMREAD_GRAYSCALE))
    assert len(list(images.glob("*.npy"))) == 1  # the outdated entry was removed


def test_a_label_edit_that_keeps_size_and_mtime_is_rescanned(tmp_path):
    """Class 0 -> 1 keeps the file size, and the restored mtime made the old scan cache look current."""
    from utils.data import list_image_files, scan_dataset

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copyfile(sorted((SAMPLE / "images" / "val").glob("*.jpg"))[0], images / "a.jpg")
    label = labels / "a.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n")
    stat = label.stat()
    assert scan_dataset(list_image_files(images)).labels[0][:, 0].tolist() == [0]
    label.write_text("1 0.5 0.5 0.2 0.2\n")
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert label.stat().st_size == stat.st_size and label.stat().st_mtime_ns == stat.st_mtime_ns
    assert scan_dataset(list_image_files(images)).labels[0][:, 0].tolist() == [1]


# ------------------------------------------------------------------------------------ runs
def _tiny_run(tmp_path: Path, **overrides) -> TrainConfig:
    base = dict(cfg="yolov5n.yaml", data=str(SAMPLE_YAML), imgsz=64, batch_size=8, epochs=1, workers=0,
                device="cpu", project=str(tmp_path / "runs"), name="exp", exist_ok=True, noautoanchor=True,
                noplots=True, max_batches=1)
    base.update(overrides)
    return TrainConfig(**base)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_exist_ok_sets_the_earlier_run_aside(tmp_path, caplog):
    from utils.runners.train import run_train

    run = tmp_path / "runs" / "exp"
    run_train(_tiny_run(tmp_path, epochs=2))
    earlier = {name: (run / name).read_bytes() for name in ("results.csv", "weights/last.pt", "weights/best.pt")}
    events = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    stale = run / "weights" / ".last.pt.k3j2h1.tmp"  # what a kill during save_atomic leaves behind
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO):
        run_train(_tiny_run(tmp_path, seed=1))
    rows = _rows(run / "results.csv")
    assert [row["epoch"] for row in rows] == ["0"]  # this run's row only, not the earlier run's two
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    previous = run / "previous"
    assert {name: (previous / name).read_bytes() for name in earlier} == earlier
    assert sorted(p.name for p in previous.glob("events.out.tfevents.*")) == events
    assert [row["epoch"] for row in _rows(previous / "results.csv")] == ["0", "1"]
    assert "were moved to" in caplog.text and str(previous) in caplog.text
    assert not stale.exists() and ".last.pt.k3j2h1.tmp" in caplog.text
    run_train(_tiny_run(tmp_path, seed=2))  # a third run: the second one goes to previous2
    assert [row["epoch"] for row in _rows(run / "previous2" / "results.csv")] == ["0"]
    assert (run / "previous" / "weights" / "last.pt").read_bytes() == earlier["weights/last.pt"]
    seeds = {folder: yaml.safe_load((run / folder / "opt.yaml").read_text())["seed"]
             for folder in ("previous", "previous2", ".")}
    assert seeds == {"previous": 0, "previous2": 1, ".": 2}  # each run's YAMLs kept with its results
    assert all((run / folder / "hyp.yaml").is_file() for folder in seeds)


def test_a_bad_model_yaml_found_while_loading_leaves_no_run_folder(tmp_path):
    from models.yaml_config import ModelConfigError
    from utils.runners.train import run_train

    text = (ROOT / "models" / "yolov5n.yaml").read_text().replace("depth_multiple: 0.33", "depth_multiple: 0")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ModelConfigError, match="depth_multiple"):
        run_train(_tiny_run(tmp_path, cfg=str(tmp_path / "bad.yaml"), exist_ok=False))
    assert not (tmp_path / "runs" / "exp").exists()


def test_stale_checkpoint_temp_files_are_removed(tmp_path):
    from utils.weights.checkpoint import remove_stale_temp_files, save_atomic

    save_atomic({"x": 1}, tmp_path / "last.pt")
    leftovers = [tmp_path / ".last.pt.abc.tmp", tmp_path / ".best.pt.9f_x.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    keep = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".hidden.txt"]
    for path in keep[1:]:
        path.write_text("user file")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(leftovers)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in leftovers)



def test_a_run_that_fails_while_loading_puts_the_earlier_run_back(tmp_path):
    """--exist-ok sets the earlier run aside before setup; a mistake found while loading moves it back."""
    from utils.common.errors import UserError
    from utils.runners.train import run_train

    run = tmp_path / "runs" / "exp"
    run_train(_tiny_run(tmp_path))
    before = tree_digest(run)
    junk = tmp_path / "junk" / "images"  # image names, no images: found only while the loaders are built
    junk.mkdir(parents=True)
    (junk / "page.jpg").write_text("<html>not an image</html>\n")
    (tmp_path / "junk.yaml").write_text(f"path: {junk.parent}\ntrain: images\nval: images\nnc: 6\n")
    with pytest.raises(UserError, match="no usable images"):
        run_train(_tiny_run(tmp_path, data=str(tmp_path / "junk.yaml")))
    assert tree_digest(run) == before
    assert not (run / "previous").exists()


def _this_run(run: Path) -> dict[str, str]:
    """The run folder's files but the earlier runs set aside in it."""
    return {k: v for k, v in tree_digest(run).items() if not k.split("/")[0].startswith("previous")}


def _val(weights: Path, project: Path, **flags) -> None:
    from utils.runners.val import ValOptions, run_val

    run_val(ValOptions(str(weights), str(SAMPLE_YAML), imgsz=128, batch_size=16, workers=0, device="cpu",
                       project=str(project), name="exp", exist_ok=True, noplots=True, **flags))


def _detect(weights: Path, project: Path, image: str, **flags) -> None:
    from utils.runners.detect import DetectOptions, run_detect

    run_detect(DetectOptions(str(weights), str(SAMPLE / "images" / "val" / image), imgsz=128, device="cpu",
                             project=str(project), name="exp", exist_ok=True, save_txt=True, **flags))


# three runs into one folder with --exist-ok, each writing other files than the one before
EXIST_OK_RUNS = {
    "val": [lambda w, p: _val(w, p, save_txt=True), lambda w, p: _val(w, p, save_json=True),
            lambda w, p: _val(w, p, save_txt=True, save_conf=True)],
    "detect": [lambda w, p: _detect(w, p, "crazing_100.jpg"), lambda w, p: _detect(w, p, "inclusion_105.jpg"),
               lambda w, p: _detect(w, p, "crazing_102.jpg", save_crop=True)],
}


@pytest.mark.parametrize("script", EXIST_OK_RUNS)
def test_exist_ok_sets_an_earlier_val_or_detect_run_aside_whole(script, fixtures_dir, tmp_path, caplog):
    """val.py and detect.py with --exist-ok: the earlier run's labels, images and JSON move aside whole, a later
    run's set-aside never overwrites an earlier one, and one log line says where they went."""
    weights, project = fixtures_dir / "yolov5n-neu-det-v7.pt", tmp_path / "runs"
    run = project / "exp"
    first, second, third = EXIST_OK_RUNS[script]
    first(weights, project)
    runs = [_this_run(run)]
    for later in (second, third):
        with caplog.at_level(logging.WARNING):
            later(weights, project)
        runs.append(_this_run(run))
    assert all(runs) and set(runs[0]) - set(runs[1]), "the first run's files were left mixed with the second's"
    assert _this_run(run / "previous") == runs[0]  # the first run, whole, and nothing of the second
    assert _this_run(run / "previous2") == runs[1]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("previous")) == ["previous", "previous2"]
    moves = [r.getMessage() for r in caplog.records if "were moved to" in r.getMessage()]
    assert len(moves) == 2 and str(run / "previous") in moves[0] and str(run / "previous2") in moves[1]
