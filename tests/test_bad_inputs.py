"""Every command-line script over a table of bad inputs (files, YAML, flags, checkpoints).

Each case must end with exit status 2 and exactly one stderr line ``error: ...`` that names the culprit (flag,
file, key or layer), never a traceback; the data set must be byte-identical afterwards and no run folder may be
left behind. Most cases run in-process through ``run_cli`` (fast); a few run as real processes to prove the
exit path end to end. ``YOLOKIT_TRACEBACK=1`` turns the line back into the traceback.
"""

from __future__ import annotations

import hashlib
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
           "preview": data_preview.main, "convert": converters.main, "prune_slim": prune_slim.main,
           "prune_eagleeye": prune_eagleeye.main}
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
    model = (ROOT / "models" / "yolov5n.yaml").read_text(encoding="utf-8")
    models = {
        "depth0.yaml": _model_yaml(model, "depth_multiple: 0.33", "depth_multiple: 0"),
        "width_neg.yaml": _model_yaml(model, "width_multiple: 0.25", "width_multiple: -0.25"),
        "repeat_neg.yaml": _model_yaml(model, "[-1, 3, C3, [128]]", "[-1, -2, C3, [128]]"),
        "nc0_model.yaml": _model_yaml(model, "nc: 80", "nc: 0"),
        "nohead.yaml": model.split("\nhead:")[0] + "\n",
        "syntax_model.yaml": _model_yaml(model, "backbone:", "backbone: [[-1, 1"),
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
    (root / "folder.pt").mkdir()
    import torch

    torch.save(torch.zeros(3), root / "tensor.pt")
    (root / "list.txt").write_text("images/nope.jpg\n")
    (root / "model.xyz").write_text("?")
    return SimpleNamespace(root=root, data=data)


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
    ("detect", "--weights {r}/det6.pt --data {r}/missing.yaml", "missing.yaml"),
    ("detect", "--weights {r}/det6.pt --visualize --augment", "--visualize"),
    ("detect", "--weights {r}/text.pt", "text.pt: not a readable PyTorch checkpoint"),
    ("detect", "--weights {r}/folder.pt", "folder.pt: is a folder"),
    # export.py
    ("export", "--weights {r}/zero.pt", "zero.pt: the file is empty"),
    ("export", "--weights {r}/missing.pt", "--weights"),
    ("export", "--weights {r}/det6.pt --imgsz 0", "--imgsz 0"),
    ("export", "--weights {r}/det6.pt --imgsz 64 64 64", "--imgsz 64 64 64"),
    ("export", "--weights {r}/det6.pt --batch-size 0", "--batch-size 0"),
    ("export", "--weights {r}/det6.pt --opset 3", "--opset 3"),
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
    ("model", "--cfg yolov5n.yaml --nc 0", "--nc 0"),
    ("model", "--cfg yolov5n.yaml --imgsz 0", "--imgsz 0"),
    ("model", "--cfg yolov5n.yaml --peak-gflops -5", "--peak-gflops -5"),
    # python -m utils.train.autoanchor / utils.data.*
    ("autoanchor", "--data {r}/nc0.yaml", "nc0.yaml"),
    ("autoanchor", "--data {r}/data_ok.yaml --n 0", "--n 0"),
    ("report", "--data {r}/missing.yaml", "missing.yaml"),
    ("report", "--data {r}/data_ok.yaml --imgsz 0", "--imgsz 0"),
    ("preview", "--data {r}/data_ok.yaml --split test", "--split test"),
    ("preview", "--data {r}/data_ok.yaml --n 0", "--n 0"),
    ("convert", "coco2yolo --json {r}/bad.json --out {r}/out", "bad.json: not a COCO detection JSON"),
    ("convert", "coco2yolo --json {r}/missing.json --out {r}/out", "missing.json"),
    ("convert", "split --images {d}/images/train --out {r}/out --fractions 0.5 0.7", "--fractions"),
    ("convert", "subset --data {r}/data_ok.yaml --out {r}/out --n 0", "--n 0"),
    # latency budgets: --weights is text.pt (no checkpoint), so an error after loading would name it instead
    ("prune_slim", "--latency-ms 10", "--latency-ms 10 needs --runtime (onnxruntime|openvino|openvino-int8"),
    ("prune_eagleeye", "--speedup 1.5", "--speedup 1.5 needs --runtime"),
    ("prune_slim", "--speedup 1.5 --runtime tensorrt", "--runtime tensorrt: unknown runtime; choose from"),
    ("prune_slim", "--speedup 1 --runtime onnxruntime", "--speedup 1.0: expected a speed-up above 1"),
    ("prune_eagleeye", "--latency-ms 0 --runtime openvino", "--latency-ms 0.0: expected milliseconds"),
    ("prune_slim", "--speedup 2 --runtime onnxruntime --threads 0", "--threads 0: expected 1"),
    ("prune_slim", "--speedup 2 --remain-ratio 0.5 --runtime onnxruntime", "not allowed with"),
    ("prune_eagleeye", "--latency-ms 5 --speedup 2 --runtime openvino", "not allowed with"),
    ("prune_eagleeye", "--runtime openvino", "one of the arguments --remain-ratio --latency-ms --speedup"),
]


def _argv(script: str, template: str, bad: SimpleNamespace, project: Path) -> list[str]:
    argv = template.format(r=bad.root, d=bad.data).split()
    if script in WRITES_RUNS:
        argv += ["--project", str(project)] + ([] if "--device" in argv else ["--device", "cpu"])
    if script == "train" and "--cfg" not in argv and "--weights" not in argv and "--resume" not in argv:
        argv += ["--cfg", "yolov5n.yaml"]
    if script == "train" and "--data" not in argv:
        argv += ["--data", str(bad.root / "data_ok.yaml")]
    if script == "val" and "--data" not in argv:
        argv += ["--data", str(bad.root / "data_ok.yaml")]
    if script.startswith("prune_"):
        argv += ["--weights", str(bad.root / "text.pt"), "--data", str(bad.root / "data_ok.yaml"),
                 "--path", str(project / "pruned.yaml")]
    return argv


def _check_one_error_line(rc: int, out: str, err: str, culprit: str) -> None:
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert culprit in lines[0], (culprit, lines[0])


@pytest.mark.parametrize(("script", "template", "culprit"), CASES, ids=[f"{s}: {t}" for s, t, _ in CASES])
def test_bad_input_is_one_error_line(script, template, culprit, bad, tmp_path, capsys):
    before = tree_digest(bad.data)
    project = tmp_path / "runs"
    rc = run_cli(SCRIPTS[script], _argv(script, template, bad, project))
    out, err = capsys.readouterr()
    _check_one_error_line(rc, out, err, culprit)
    assert tree_digest(bad.data) == before, "the data set was modified"
    assert not project.exists() or not any(project.iterdir()), f"run folder left behind: {list(project.iterdir())}"


def test_unreadable_file_is_one_error_line(bad, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from reading a file")
    secret = tmp_path / "secret.yaml"
    secret.write_text((bad.root / "data_ok.yaml").read_text())
    secret.chmod(0)
    rc = run_cli(train.main, ["--data", str(secret), "--cfg", "yolov5n.yaml", "--project", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    _check_one_error_line(rc, out, err, "secret.yaml' is not readable (permission denied)")


def test_traceback_env_shows_the_traceback(bad, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(UserError, match="--epochs 0"):
        run_cli(train.main, ["--epochs", "0"])


def test_internal_errors_keep_their_traceback():
    def broken(argv):
        raise ZeroDivisionError("a bug of ours")

    with pytest.raises(ZeroDivisionError):
        run_cli(broken, [])


# end to end: real processes, exit status and stderr as a shell sees them
PROCESS_CASES = [
    (["train.py", "--epochs", "0"], "--epochs 0"),
    (["val.py", "--weights", "{r}/zero.pt"], "zero.pt: the file is empty"),
    (["detect.py", "--weights", "{r}/det6.pt", "--source", "{r}/missing.jpg"], "missing.jpg"),
    (["export.py", "--weights", "{r}/det6.pt", "--imgsz", "0"], "--imgsz 0"),
    (["models/yolo.py", "--cfg", "{r}/depth0.yaml"], "depth_multiple"),
]


@pytest.mark.parametrize(("argv", "culprit"), PROCESS_CASES, ids=[a[0] for a, _ in PROCESS_CASES])
def test_bad_input_in_a_real_process(argv, culprit, bad, tmp_path):
    args = [a.format(r=bad.root) for a in argv]
    if args[0] in ("train.py", "val.py", "detect.py"):
        args += ["--project", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    proc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    _check_one_error_line(proc.returncode, proc.stdout, proc.stderr, culprit)
    assert not (tmp_path / "runs").exists()
