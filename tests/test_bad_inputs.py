"""Every command-line script over a table of bad inputs (files, YAML, flags, checkpoints).

Each case must end with exit status 2 and exactly one stderr line ``error: ...`` that names the culprit (flag,
file, key or layer), never a traceback; the data set must be byte-identical afterwards and no run folder may be
left behind. Most cases run in-process through ``run_cli`` (fast); a few run as real processes to prove the
exit path end to end, among them the folders and files the user may not write or read: those run with the
permission really denied (as root, in a process that lost root's power to ignore permission bits).
``YOLOKIT_TRACEBACK=1`` turns the line back into the traceback.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import detect
import export
import prune_eagleeye
import prune_slim
import train
import val
from models import yolo as model_cli
from utils.common.cli import TRACEBACK_ENV, run_cli
from utils.common.errors import UserError
from utils.data import converters
from utils.data import preview as data_preview
from utils.data import report as data_report
from utils.train import autoanchor

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample"
NAMES = "[crazing, inclusion, patches, pitted_surface, rolled-in_scale, scratches]"

SCRIPTS = {"train": train.main, "val": val.main, "detect": detect.main, "export": export.main,
           "model": model_cli.main, "autoanchor": autoanchor.main, "report": data_report.main,
           "preview": data_preview.main, "convert": converters.main, "slim": prune_slim.main,
           "eagleeye": prune_eagleeye.main}
WRITES_RUNS = {"train", "val", "detect"}  # scripts that take --project


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> md5 of every file below ``folder`` (plus empty folders), to prove nothing changed."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        digest[key] = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return digest


def _model_yaml(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> SimpleNamespace:
    """A copy of the embedded sample plus every broken file the table refers to."""
    from models.yolo import DetectionModel
    from utils.weights.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bad")
    data = root / "neu-det-sample"
    shutil.copytree(SAMPLE, data, ignore=shutil.ignore_patterns("*.cache", "*.npy"))
    head = f"path: {data}\ntrain: images/train\nval: images/val\n"
    yamls = {
        "data_ok.yaml": head + f"names: {NAMES}\n",
        "nc0.yaml": head + "nc: 0\n",
        "ncsix.yaml": head + "nc: six\n",
        "nc_mismatch.yaml": head + f"nc: 3\nnames: {NAMES}\n",
        "names_empty.yaml": head + "names: []\n",
        "three.yaml": head + "names: [a, b, c]\n",
        "syntax.yaml": f"path: {data}\ntrain: [images/train\nval: images/val\n",
        "listing.yaml": "- images/train\n- images/val\n",
        "nosplit.yaml": f"path: {data}\ntrain: images/nope\nval: images/val\nnc: 6\n",
        "nonames.yaml": head,
        "noimages.yaml": f"path: {root}\ntrain: empty\nval: empty\nnc: 6\n",
        "junk.yaml": f"path: {root / 'junk'}\ntrain: images\nval: images\nnc: 6\n",
        "hyp_badkey.yaml": "learning_rate: 0.1\n",
        "hyp_list.yaml": "- 0.1\n",
        "bad.json": "{not json",
    }
    for name, text in yamls.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "empty").mkdir()
    junk = root / "junk" / "images"  # files with image names that are no images: the scan skips all of them
    junk.mkdir(parents=True)
    for k in range(3):
        (junk / f"page{k}.jpg").write_text("<html>not an image</html>\n")
    _label_less_sets(root, data)
    _annotation_files(root)
    model = (ROOT / "models" / "yolov5n.yaml").read_text(encoding="utf-8")
    models = {
        "depth0.yaml": _model_yaml(model, "depth_multiple: 0.33", "depth_multiple: 0"),
        "width_neg.yaml": _model_yaml(model, "width_multiple: 0.25", "width_multiple: -0.25"),
        "repeat_neg.yaml": _model_yaml(model, "[-1, 3, C3, [128]]", "[-1, -2, C3, [128]]"),
        "nc0_model.yaml": _model_yaml(model, "nc: 80", "nc: 0"),
        "nohead.yaml": model.split("\nhead:")[0] + "\n",
        "syntax_model.yaml": _model_yaml(model, "backbone:", "backbone: [[-1, 1"),
        "repeat_huge.yaml": _model_yaml(model, "[-1, 3, C3, [128]]", "[-1, 3000000, C3, [128]]"),
    }
    for name, text in models.items():
        (root / name).write_text(text, encoding="utf-8")
    detector = DetectionModel("yolov5n.yaml", nc=6)
    detector.names = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    save_checkpoint(detector, root / "det6.pt")
    from models.yolo import ClassificationModel

    save_checkpoint(ClassificationModel("yolov5n-cls.yaml", nc=6), root / "cls.pt")
    raw = (root / "det6.pt").read_bytes()
    (root / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (root / "zero.pt").write_bytes(b"")
    (root / "text.pt").write_text("these are my notes, not weights\n")
    (root / "random.pt").write_bytes(bytes(range(256)) * 64)  # bytes that are no pickle and no zip archive
    shutil.copy(ROOT / "tests" / "fixtures" / "compat" / "qat.pt", root / "qat.pt")
    (root / "folder.pt").mkdir()
    import torch

    torch.save(torch.zeros(3), root / "tensor.pt")
    (root / "list.txt").write_text("images/nope.jpg\n")
    (root / "model.xyz").write_text("?")
    held = root / "held"  # an earlier run's folder holding files a new --exist-ok run there would read
    held.mkdir()
    shutil.copy(data / "images" / "val" / "crazing_100.jpg", held)
    shutil.copy(root / "det6.pt", held)
    return SimpleNamespace(root=root, data=data)


def _label_less_sets(root: Path, data: Path) -> None:
    """Four training images each with no labels folder, only empty label files, or only rows the scan drops
    (class ids >= nc 6, one out of range); their val split is the sample's, with labels."""
    images = sorted((data / "images" / "train").glob("*.jpg"))[:4]
    rows = {"nolabels": None, "emptylabels": [""] * 4,
            "dropped": ["6 0.5 0.5 0.2 0.2\n", "9 0.5 0.5 0.2 0.2\n7 0.1 0.1 0.1 0.1\n", "0 1.5 0.5 0.2 0.2\n",
                        "6 0.5 0.5 0.2 0.2\n"]}
    for name, texts in rows.items():
        (root / name / "images" / "train").mkdir(parents=True)
        for k, image in enumerate(images):
            shutil.copyfile(image, root / name / "images" / "train" / image.name)
            if texts is not None:
                (root / name / "labels" / "train").mkdir(parents=True, exist_ok=True)
                (root / name / "labels" / "train" / f"{image.stem}.txt").write_text(texts[k])
        yaml_text = f"path: {root / name}\ntrain: images/train\nval: {data / 'images' / 'val'}\nnames: {NAMES}\n"
        (root / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")


def _annotation_files(root: Path) -> None:
    """VOC and COCO annotations with one problem each, for the converters' --strict."""
    (root / "voc").mkdir()
    (root / "voc" / "a.xml").write_text(
        "<annotation><size><width>200</width><height>100</height></size><object><name>dog</name><bndbox>"
        "<xmin>51</xmin><ymin>21</ymin><xmax>11</xmax><ymax>81</ymax></bndbox></object></annotation>")
    images = [{"id": 1, "file_name": "a/x.jpg", "width": 10, "height": 10}]
    category = [{"id": 1, "name": "dog"}]
    coco = {"coco_unknown.json": {"images": images, "categories": category,
                                  "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [1, 1, 2, 2]}]},
            "coco_dup.json": {"images": [*images, {"id": 2, "file_name": "b/x.jpg", "width": 10, "height": 10}],
                              "categories": category, "annotations": []}}
    for name, content in coco.items():
        (root / name).write_text(json.dumps(content))


# (script, arguments, text the error line must contain); {r} is the folder of broken files, {d} the data copy
CASES = [
    # train.py: numeric flags out of their domain
    ("train", "--epochs 0", "--epochs 0"),
    ("train", "--epochs -1", "--epochs -1"),
    ("train", "--batch-size 0", "--batch-size 0"),
    ("train", "--batch-size -2", "--batch-size -2"),
    ("train", "--imgsz 0", "--imgsz 0"),
    ("train", "--imgsz -64", "--imgsz -64"),
    ("train", "--workers -1", "--workers -1"),
    ("train", "--label-smoothing 1", "--label-smoothing 1"),
    ("train", "--label-smoothing -0.1", "--label-smoothing -0.1"),
    ("train", "--patience -1", "--patience -1"),
    ("train", "--nc 0", "--nc 0"),
    ("train", "--depth-multiple 0", "--depth-multiple 0"),
    ("train", "--width-multiple -1", "--width-multiple -1"),
    ("train", "--seed -1", "--seed -1"),
    ("train", "--evolve 0", "--evolve 0"),
    ("train", "--extend 5", "--extend 5"),
    ("train", "--max-batches -1", "--max-batches -1"),
    ("train", "--head-weights -1 1", "--head-weights -1"),
    ("train", "--cache floppy", "--cache floppy"),
    ("train", "--freeze abc", "--freeze abc"),
    ("train", "--freeze -3", "--freeze -3"),
    ("train", "--freeze-schedule alternate:1", "--freeze-schedule"),
    ("train", "--freeze 99", "--freeze 99 freezes all 25 layers"),
    ("train", "--freeze 3 40", "--freeze 3 40: the model has layers 0-24, not [40]"),
    ("train", "--optimizer Lion", "--optimizer"),
    ("train", "--epochs ten", "--epochs"),
    ("train", "--no-such-flag", "--no-such-flag"),
    ("train", "--device 99", "--device 99"),
    ("train", "--device gpu", "--device gpu"),
    ("train", "--sparse -1", "--sparse -1"),
    ("train", "--distill-weight 0", "--distill-weight 0"),
    ("train", "--teacher {r}/missing.pt", "--teacher"),
    ("train", "--fp32 --bf16", "--bf16 and --fp32/--no-amp ask for different training precisions"),
    ("train", "--hyp-override lr0=fast", "'lr0'"),
    ("train", "--hyp-override lr0", "--hyp-override 'lr0'"),
    ("train", "--hyp-override learning_rate=0.1", "learning_rate"),
    # train.py: files
    ("train", "--weights {r}/missing.pt", "missing.pt"),
    ("train", "--weights {r}/zero.pt", "zero.pt: the file is empty"),
    ("train", "--weights {r}/text.pt", "text.pt: not a readable PyTorch checkpoint"),
    ("train", "--weights {r}/trunc.pt", "trunc.pt: not a readable PyTorch checkpoint"),
    ("train", "--weights {r}/tensor.pt", "tensor.pt: neither a yolo-kit checkpoint"),
    ("train", "--weights {r}/folder.pt", "folder.pt: is a folder"),
    ("train", "--cfg {r}/missing.yaml", "missing.yaml"),
    ("train", "--cfg {r}/depth0.yaml", "depth0.yaml: depth_multiple must be a number greater than 0"),
    ("train", "--cfg {r}/width_neg.yaml", "width_neg.yaml: width_multiple"),
    ("train", "--cfg {r}/repeat_neg.yaml", "repeat_neg.yaml: layer 2 (C3): repeat count"),
    ("train", "--cfg {r}/nohead.yaml", "nohead.yaml: missing 'head'"),
    ("train", "--cfg {r}/syntax_model.yaml", "syntax_model.yaml' is not valid YAML"),
    ("train", "--cfg {r}/repeat_huge.yaml", "repeat_huge.yaml: layer 2 (C3): repeat count n 3000000"),
    ("train", "--imgsz 20000", "--imgsz 20000: at most 8192 pixels"),
    ("train", "--weights {r}/random.pt", "random.pt: not a readable PyTorch checkpoint"),
    ("train", "--data {r}/missing.yaml", "missing.yaml"),
    ("train", "--data {r}/nc0.yaml", "nc0.yaml: 'nc' is 0"),
    ("train", "--data {r}/ncsix.yaml", "ncsix.yaml: 'nc' must be the number of classes"),
    ("train", "--data {r}/nc_mismatch.yaml", "nc_mismatch.yaml: nc is 3 but 6 names"),
    ("train", "--data {r}/names_empty.yaml", "names_empty.yaml: 'names' is empty"),
    ("train", "--data {r}/syntax.yaml", "syntax.yaml' is not valid YAML"),
    ("train", "--data {r}/listing.yaml", "listing.yaml: expected a mapping"),
    ("train", "--data {r}/nosplit.yaml", "images/nope"),
    ("train", "--data {r}/nonames.yaml", "nonames.yaml: needs 'names'"),
    ("train", "--data {r}/noimages.yaml", "no images"),
    ("train", "--data {r}", "is a folder"),
    ("train", "--hyp {r}/missing.yaml", "missing.yaml"),
    ("train", "--hyp {r}/hyp_badkey.yaml", "hyp_badkey.yaml: unknown hyperparameter 'learning_rate'"),
    ("train", "--hyp {r}/hyp_list.yaml", "hyp_list.yaml: expected a mapping"),
    ("train", "--resume {r}/missing.pt", "missing.pt"),
    ("train", "--resume {r}/det6.pt", "det6.pt holds no training state"),
    ("train", "--resume {r}/zero.pt", "zero.pt: the file is empty"),
    # train.py: a problem found only while loading (after the run folder was made): it is removed again
    ("train", "--data {r}/junk.yaml", "no usable images"),
    # train.py: a training split without a single box (before any epoch, like v7.0's "No labels found")
    ("train", "--data {r}/nolabels.yaml", "nolabels/labels/train for the 4 images, nothing to train on: no label "
                                          "file found: each image's labels are the .txt file"),
    ("train", "--data {r}/emptylabels.yaml", "emptylabels/labels/train for the 4 images, nothing to train on: its 4 "
                                             "label files are empty: add a row"),
    ("train", "--data {r}/dropped.yaml", "dropped/labels/train for the 4 images, nothing to train on: every row of "
                                         "its 4 label files was dropped (class_ge_nc 4, out_of_range 1;"),
    # val.py
    ("val", "--weights {r}/det6.pt --conf-thres 2", "--conf-thres 2"),
    ("val", "--weights {r}/det6.pt --iou-thres -0.1", "--iou-thres -0.1"),
    ("val", "--weights {r}/det6.pt --max-det 0", "--max-det 0"),
    ("val", "--weights {r}/det6.pt --batch-size 0", "--batch-size 0"),
    ("val", "--weights {r}/det6.pt --imgsz 0", "--imgsz 0"),
    ("val", "--weights {r}/det6.pt --workers -2", "--workers -2"),
    ("val", "--weights {r}/det6.pt --task testing", "--task"),
    ("val", "--weights {r}/missing.pt", "missing.pt"),
    ("val", "--weights {r}/zero.pt", "zero.pt: the file is empty"),
    ("val", "--weights {r}/text.pt", "text.pt: not a readable PyTorch checkpoint"),
    ("val", "--weights {r}/model.xyz", "model.xyz: unknown artifact type"),
    ("val", "--weights {r}/det6.pt --data {r}/missing.yaml", "missing.yaml"),
    ("val", "--weights {r}/det6.pt --data {r}/nc0.yaml", "nc0.yaml: 'nc' is 0"),
    ("val", "--weights {r}/det6.pt --data {r}/three.yaml", "det6.pt predicts 6 classes but"),
    ("val", "--weights {r}/det6.pt --data {r}/data_ok.yaml --task test", "has no 'test' split"),
    ("val", "--weights {r}/det6.pt --device cuda:x", "--device cuda:x"),
    # detect.py
    ("detect", "--weights {r}/det6.pt --source {r}/missing.jpg", "--source"),
    ("detect", "--weights {r}/det6.pt --source https://example.com/a.jpg", "URLs are not downloaded"),
    ("detect", "--weights {r}/det6.pt --source 0", "webcams and streams are not supported"),
    ("detect", "--weights {r}/det6.pt --source {r}/list.txt", "list.txt:1"),
    ("detect", "--weights {r}/det6.pt --source {r}/empty", "no images or videos found"),
    ("detect", "--weights {r}/det6.pt --conf-thres 1.5", "--conf-thres 1.5"),
    ("detect", "--weights {r}/det6.pt --max-det 0", "--max-det 0"),
    ("detect", "--weights {r}/det6.pt --vid-stride 0", "--vid-stride 0"),
    ("detect", "--weights {r}/det6.pt --line-thickness 0", "--line-thickness 0"),
    ("detect", "--weights {r}/det6.pt --classes -1", "--classes -1"),
    ("detect", "--weights {r}/det6.pt --imgsz -1", "--imgsz -1"),
    ("detect", "--weights {r}/det6.pt --imgsz 20000", "--imgsz 20000: at most 8192 pixels"),
    ("detect", "--weights {r}/random.pt", "random.pt: not a readable PyTorch checkpoint"),
    ("detect", "--weights {r}/det6.pt --data {r}/missing.yaml", "missing.yaml"),
    ("detect", "--weights {r}/det6.pt --visualize --augment", "--visualize"),
    ("detect", "--weights {r}/text.pt", "text.pt: not a readable PyTorch checkpoint"),
    ("detect", "--weights {r}/folder.pt", "folder.pt: is a folder"),
    # an output folder that is a file (permission cases: PROCESS_CASES); --exist-ok on a folder holding an input
    ("train", "--project {r}/list.txt", "--project {r}/list.txt: {r}/list.txt is a file, not a folder"),
    ("val", "--weights {r}/det6.pt --project {r}/list.txt/runs", "{r}/list.txt is a file, not a folder"),
    ("detect", "--weights {r}/det6.pt --project {r}/list.txt", "--project {r}/list.txt: {r}/list.txt is a file"),
    ("export", "--weights {r}/det6.pt --output-dir {r}/list.txt", "--output-dir {r}/list.txt: {r}/list.txt is a"),
    ("slim", "--weights {r}/det6.pt --data {r}/data_ok.yaml --path {r}/list.txt/p.yaml --global-percent 0.3",
     "--path {r}/list.txt/p.yaml: {r}/list.txt is a file, not a folder"),
    ("eagleeye", "--weights {r}/det6.pt --data {r}/data_ok.yaml --path {r}/list.txt/p.yaml --remain-ratio 0.5",
     "{r}/list.txt is a file, not a folder"),
    ("train", "--weights {r}/held/det6.pt --project {r} --name held --exist-ok",
     "--weights {r}/held/det6.pt lies in the run folder {r}/held"),
    ("val", "--weights {r}/held/det6.pt --project {r} --name held --exist-ok", "--weights {r}/held/det6.pt lies in"),
    ("detect", "--weights {r}/det6.pt --source {r}/held/crazing_100.jpg --project {r} --name held --exist-ok",
     "--source {r}/held/crazing_100.jpg lies in the run folder"),
    # export.py
    ("export", "--weights {r}/zero.pt", "zero.pt: the file is empty"),
    ("export", "--weights {r}/missing.pt", "--weights"),
    ("export", "--weights {r}/det6.pt --imgsz 0", "--imgsz 0"),
    ("export", "--weights {r}/det6.pt --imgsz 64 64 64", "--imgsz 64 64 64"),
    ("export", "--weights {r}/det6.pt --batch-size 0", "--batch-size 0"),
    ("export", "--weights {r}/det6.pt --opset 3", "--opset 3"),
    ("export", "--weights {r}/det6.pt --include onnx --opset 7", "--opset 7"),
    ("export", "--weights {r}/det6.pt --include onnx --opset 99", "--opset 99"),
    ("export", "--weights {r}/det6.pt --imgsz 20000", "--imgsz 20000: at most 8192 pixels"),
    ("export", "--weights {r}/random.pt --no-compare", "random.pt: not a readable PyTorch checkpoint"),
    ("export", "--weights {r}/det6.pt --calib-images 0", "--calib-images 0"),
    ("export", "--weights {r}/det6.pt --conf-thres 3", "--conf-thres 3"),
    ("export", "--weights {r}/det6.pt --max-det 0", "--max-det 0"),
    ("export", "--weights {r}/det6.pt --include pdf", "--include ['pdf']"),
    ("export", "--weights {r}/det6.pt --include onnx --int8", "--int8 needs --data"),
    ("export", "--weights {r}/det6.pt --min-shape 1x3", "--min-shape"),
    ("export", "--weights {r}/det6.pt --data {r}/missing.yaml", "--data"),
    ("export", "--weights {r}/text.pt --no-compare", "text.pt: not a readable PyTorch checkpoint"),
    ("export", "--weights {r}/cls.pt --include onnx --nms --imgsz 64", "--nms: "),
    # python models/yolo.py
    ("model", "--cfg {r}/missing.yaml", "missing.yaml"),
    ("model", "--cfg {r}/depth0.yaml", "depth0.yaml: depth_multiple"),
    ("model", "--cfg {r}/repeat_neg.yaml", "layer 2"),
    ("model", "--cfg {r}/nc0_model.yaml", "nc0_model.yaml: nc (number of classes)"),
    ("model", "--cfg {r}/repeat_huge.yaml", "exceeds 100"),
    ("model", "--cfg yolov5n.yaml --nc 0", "--nc 0"),
    ("model", "--cfg yolov5n.yaml --imgsz 0", "--imgsz 0"),
    ("model", "--cfg yolov5n.yaml --peak-gflops -5", "--peak-gflops -5"),
    # prune_slim.py / prune_eagleeye.py: the checkpoint checked against the data as val.py checks it, QAT refused
    ("slim", "--weights {r}/det6.pt --data {r}/three.yaml --path {r}/pruned.yaml --global-percent 0.3",
     "det6.pt predicts 6 classes but"),
    ("eagleeye", "--weights {r}/det6.pt --data {r}/three.yaml --path {r}/pruned.yaml --remain-ratio 0.5",
     "det6.pt predicts 6 classes but"),
    ("slim", "--weights {r}/qat.pt --data {r}/data_ok.yaml --path {r}/pruned.yaml --global-percent 0.3",
     "qat.pt is a quantization-aware-trained checkpoint"),
    ("eagleeye", "--weights {r}/qat.pt --data {r}/data_ok.yaml --path {r}/pruned.yaml --remain-ratio 0.5",
     "qat.pt is a quantization-aware-trained checkpoint"),
    ("slim", "--weights {r}/det6.pt --data {r}/data_ok.yaml --path {r}/pruned.yaml --global-percent 0.3 "
     "--imgsz 20000", "--imgsz 20000"),
    # python -m utils.train.autoanchor / utils.data.*
    ("autoanchor", "--data {r}/nc0.yaml", "nc0.yaml"),
    ("autoanchor", "--data {r}/data_ok.yaml --n 0", "--n 0"),
    ("autoanchor", "--data {r}/nolabels.yaml", "nolabels/labels/train for the 4 images"),
    ("report", "--data {r}/missing.yaml", "missing.yaml"),
    ("report", "--data {r}/data_ok.yaml --imgsz 0", "--imgsz 0"),
    ("preview", "--data {r}/data_ok.yaml --split test", "--split test"),
    ("preview", "--data {r}/data_ok.yaml --n 0", "--n 0"),
    ("convert", "coco2yolo --json {r}/bad.json --out {r}/out", "bad.json: not a COCO detection JSON"),
    ("convert", "coco2yolo --json {r}/missing.json --out {r}/out", "missing.json"),
    ("convert", "split --images {d}/images/train --out {r}/out --fractions 0.5 0.7", "--fractions"),
    ("convert", "voc2yolo --xml {r}/voc --out {r}/out --strict", "a.xml object 1: xmin 51 ymin 21 xmax 11 ymax 81: "
                                                                 "xmin > xmax, swapped; nothing was written to"),
    ("convert", "coco2yolo --json {r}/coco_unknown.json --out {r}/out --strict",
     "coco_unknown.json annotations[0] (id 5): category_id 2 is not in categories, dropped"),
    ("convert", "coco2yolo --json {r}/coco_dup.json --out {r}/out", "images 'a/x.jpg' and 'b/x.jpg' would both be "
                                                                     "labelled by x.txt"),
    ("convert", "voc2yolo --xml {r}/voc --out {r}/list.txt", "--out"),
    ("convert", "voc2yolo --xml {r}/empty --out {r}/out", "--xml"),
    ("convert", "subset --data {r}/data_ok.yaml --out {r}/out --n 0", "--n 0"),
    # latency budgets: --weights is text.pt (no checkpoint), so an error after loading would name it instead
    ("slim", "--latency-ms 10", "--latency-ms 10 needs --runtime (onnxruntime|openvino|openvino-bf16|openvino-int8"),
    ("eagleeye", "--speedup 1.5", "--speedup 1.5 needs --runtime"),
    ("slim", "--speedup 1.5 --runtime tensorrt", "--runtime tensorrt: unknown runtime; choose from"),
    ("slim", "--speedup 1 --runtime onnxruntime", "--speedup 1.0: expected a speed-up above 1"),
    ("eagleeye", "--latency-ms 0 --runtime openvino", "--latency-ms 0.0: expected milliseconds"),
    ("slim", "--speedup 2 --runtime onnxruntime --threads 0", "--threads 0: expected 1"),
    ("slim", "--speedup 2 --remain-ratio 0.5 --runtime onnxruntime", "not allowed with"),
    ("eagleeye", "--latency-ms 5 --speedup 2 --runtime openvino", "not allowed with"),
    ("eagleeye", "--runtime openvino", "one of the arguments --remain-ratio --latency-ms --speedup"),
]


def _argv(script: str, template: str, bad: SimpleNamespace, project: Path) -> list[str]:
    argv = template.format(r=bad.root, d=bad.data).split()
    if script in WRITES_RUNS:
        argv += ([] if "--project" in argv else ["--project", str(project)])
        argv += [] if "--device" in argv else ["--device", "cpu"]
    if script == "train" and "--cfg" not in argv and "--weights" not in argv and "--resume" not in argv:
        argv += ["--cfg", "yolov5n.yaml"]
    if script == "train" and "--data" not in argv:
        argv += ["--data", str(bad.root / "data_ok.yaml")]
    if script == "val" and "--data" not in argv:
        argv += ["--data", str(bad.root / "data_ok.yaml")]
    if script in ("slim", "eagleeye") and "--weights" not in argv:
        argv += ["--weights", str(bad.root / "text.pt"), "--data", str(bad.root / "data_ok.yaml"),
                 "--path", str(project / "pruned.yaml")]
    return argv


def _check_one_error_line(rc: int, out: str, err: str, culprit: str) -> None:
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert culprit in lines[0], (culprit, lines[0])
    assert "weights_only=False" not in lines[0], "never advise loading an untrusted file unsafely"


@pytest.mark.parametrize(("script", "template", "culprit"), CASES, ids=[f"{s}: {t}" for s, t, _ in CASES])
def test_bad_input_is_one_error_line(script, template, culprit, bad, tmp_path, capsys):
    before, held = tree_digest(bad.data), tree_digest(bad.root / "held")
    project = tmp_path / "runs"
    rc = run_cli(SCRIPTS[script], _argv(script, template, bad, project))
    out, err = capsys.readouterr()
    _check_one_error_line(rc, out, err, culprit.format(r=bad.root))
    assert tree_digest(bad.data) == before, "the data set was modified"
    assert tree_digest(bad.root / "held") == held, "an earlier run was moved or modified"
    assert not project.exists() or not any(project.iterdir()), f"run folder left behind: {list(project.iterdir())}"


def test_val_split_without_labels_warns_once_and_trains(bad, tmp_path, caplog):
    """Only the training split must have labels: a val split without any is v7.0's one-line warning, and
    training runs (its P, R and mAP are 0)."""
    root = tmp_path / "set"
    for split in ("train", "val"):
        shutil.copytree(bad.data / "images" / split, root / "images" / split)
    shutil.copytree(bad.data / "labels" / "train", root / "labels" / "train")
    (tmp_path / "set.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {NAMES}\n")
    argv = ["--data", str(tmp_path / "set.yaml"), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--epochs", "1",
            "--max-batches", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots",
            "--project", str(tmp_path / "runs")]
    with caplog.at_level(logging.INFO):
        assert run_cli(train.main, argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "no labels" in r.getMessage()]
    assert warnings == [f"val: WARNING no labels in {root / 'labels' / 'val'} for the 12 images (no label file "
                        "found): they count as images without objects, so P, R and mAP are 0"]
    assert (tmp_path / "runs" / "exp" / "weights" / "last.pt").is_file()


def test_data_without_a_val_split_says_so_once_and_trains(bad, tmp_path, caplog):
    (tmp_path / "noval.yaml").write_text(f"path: {bad.data}\ntrain: images/train\nnames: {NAMES}\n")
    argv = ["--data", str(tmp_path / "noval.yaml"), "--cfg", "yolov5n.yaml", "--imgsz", "64", "--epochs", "1",
            "--max-batches", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots",
            "--project", str(tmp_path / "runs")]
    with caplog.at_level(logging.INFO):
        assert run_cli(train.main, argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "validation split" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path / 'noval.yaml'} has no validation split"), warnings
    assert (tmp_path / "runs" / "exp" / "weights" / "best.pt").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: engines can be built here")
def test_engine_export_without_a_gpu_is_one_error_line(bad, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = run_cli(export.main, ["--weights", str(bad.root / "det6.pt"), "--include", "onnx", "engine",
                               "--imgsz", "64", "--output-dir", str(out_dir)])
    out, err = capsys.readouterr()
    _check_one_error_line(rc, out, err, "--include engine: TensorRT needs an NVIDIA GPU")
    assert not out_dir.exists(), "checked before anything was written"


def test_failed_int8_export_leaves_nothing_behind(bad, tmp_path, capsys):
    """An empty calibration split is refused before the float ONNX is written, so a rerun needs no --exist-ok."""
    out_dir = tmp_path / "out"
    rc = run_cli(export.main, ["--weights", str(bad.root / "det6.pt"), "--include", "onnx", "--int8", "--imgsz", "64",
                               "--data", str(bad.root / "noimages.yaml"), "--output-dir", str(out_dir)])
    out, err = capsys.readouterr()
    _check_one_error_line(rc, out, err, "noimages.yaml")
    assert not out_dir.exists(), list(out_dir.rglob("*"))


def test_traceback_env_shows_the_traceback(bad, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(UserError, match="--epochs 0"):
        run_cli(train.main, ["--epochs", "0"])


def test_internal_errors_keep_their_traceback():
    def broken(argv):
        raise ZeroDivisionError("a bug of ours")

    with pytest.raises(ZeroDivisionError):
        run_cli(broken, [])


# end to end: real processes, exit status and stderr as a shell sees them. {r}: the folder of broken files, {d}: the
# data copy, {ro}: a folder the process may read but not write (holding a readable det6.pt), {secret}: a data YAML
# it may not read; rows naming {ro} or {secret} run with the permission really denied.
PROCESS_CASES = [
    (["train.py", "--epochs", "0"], "--epochs 0"),
    (["val.py", "--weights", "{r}/zero.pt"], "zero.pt: the file is empty"),
    (["detect.py", "--weights", "{r}/det6.pt", "--source", "{r}/missing.jpg"], "missing.jpg"),
    (["export.py", "--weights", "{r}/det6.pt", "--imgsz", "0"], "--imgsz 0"),
    (["models/yolo.py", "--cfg", "{r}/depth0.yaml"], "depth_multiple"),
    (["train.py", "--cfg", "yolov5n.yaml", "--data", "{r}/data_ok.yaml", "--project", "{ro}/runs"],
     "--project {ro}/runs: cannot write to the folder {ro}"),
    (["val.py", "--weights", "{r}/det6.pt", "--data", "{r}/data_ok.yaml", "--project", "{ro}"],
     "--project {ro}: cannot write to the folder {ro}"),
    (["detect.py", "--weights", "{r}/det6.pt", "--source", "{d}/images/val", "--project", "{ro}"],
     "--project {ro}: cannot write to the folder {ro}"),
    (["export.py", "--weights", "{r}/det6.pt", "--output-dir", "{ro}/out"], "--output-dir {ro}/out: cannot write"),
    (["export.py", "--weights", "{ro}/det6.pt"], "--weights {ro}/det6.pt: cannot write to the folder {ro}"),
    (["prune_slim.py", "--weights", "{r}/det6.pt", "--data", "{r}/data_ok.yaml", "--path", "{ro}/pruned.yaml",
      "--global-percent", "0.3"], "--path {ro}/pruned.yaml: cannot write to the folder {ro}"),
    (["prune_eagleeye.py", "--weights", "{r}/det6.pt", "--data", "{r}/data_ok.yaml", "--path", "{ro}/pruned.yaml",
      "--remain-ratio", "0.5"], "--path {ro}/pruned.yaml: cannot write to the folder {ro}"),
]
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def _without_root_override() -> None:
    """preexec for root: drop the capabilities that let root ignore permission bits from the bounding set, so the
    script (after exec) meets every permission a normal user meets. Why not another uid: the interpreter here may
    live in root's 0700 home, where another user cannot even start it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")


@pytest.fixture(scope="module")
def denied(bad) -> SimpleNamespace:
    """A read-only folder (with a readable weights file) and an unreadable data YAML, plus the subprocess keyword
    arguments under which their permissions hold; skips where this platform cannot deny root anything."""
    ro, secret = bad.root / "ro", bad.root / "secret.yaml"
    ro.mkdir()
    shutil.copy(bad.root / "det6.pt", ro)
    secret.write_text((bad.root / "data_ok.yaml").read_text())
    (ro / "det6.pt").chmod(0o444)
    ro.chmod(0o555)
    secret.chmod(0)
    kwargs = {"preexec_fn": _without_root_override} if os.geteuid() == 0 else {}
    probe = "import os, sys; sys.exit(os.access(sys.argv[1], os.W_OK) or os.access(sys.argv[2], os.R_OK))"
    try:
        allowed = subprocess.run([sys.executable, "-c", probe, str(ro), str(secret)], timeout=60, **kwargs).returncode
        reason = "this platform ignores permission bits (a probe could still write and read)" if allowed else None
    except subprocess.SubprocessError as exc:  # prctl refused: no CAP_SETPCAP (e.g. an unprivileged container)
        reason = f"running as root and root's override of permission bits cannot be dropped here: {exc}"
    yield SimpleNamespace(ro=ro, secret=secret, kwargs=kwargs, reason=reason)
    ro.chmod(0o755)
    secret.chmod(0o644)


def _run_script(argv: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, **kwargs)


@pytest.mark.parametrize(("argv", "culprit"), PROCESS_CASES,
                         ids=[" ".join(a[:1] + [x for x in a if "{ro}" in x]) for a, _ in PROCESS_CASES])
def test_bad_input_in_a_real_process(argv, culprit, bad, tmp_path, request):
    kwargs = {}
    if any("{ro}" in a or "{secret}" in a for a in argv):
        denied = request.getfixturevalue("denied")
        if denied.reason:
            pytest.skip(denied.reason)
        kwargs = denied.kwargs
        names = {"ro": denied.ro, "secret": denied.secret}
    else:
        names = {}
    args = [a.format(r=bad.root, d=bad.data, **names) for a in argv]
    if args[0] in ("train.py", "val.py", "detect.py") and "--project" not in args:
        args += ["--project", str(tmp_path / "runs")]
    proc = _run_script(args, tmp_path, **kwargs)
    _check_one_error_line(proc.returncode, proc.stdout, proc.stderr, culprit.format(r=bad.root, **names))
    assert not (tmp_path / "runs").exists()
    if names:
        assert sorted(p.name for p in names["ro"].iterdir()) == ["det6.pt"], "something was written in {ro}"


def test_unreadable_file_is_one_error_line(bad, denied, tmp_path):
    if denied.reason:
        pytest.skip(denied.reason)
    proc = _run_script(["train.py", "--data", str(denied.secret), "--cfg", "yolov5n.yaml", "--project",
                        str(tmp_path / "r")], tmp_path, **denied.kwargs)
    _check_one_error_line(proc.returncode, proc.stdout, proc.stderr, "secret.yaml' is not readable (permission denied)")
    assert not (tmp_path / "r").exists()
