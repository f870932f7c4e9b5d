"""Knowledge distillation (issue 23): the losses against independent computations, the teacher checks, a
fine-tune with --teacher (and --sparse) on the embedded sample that logs train/distill, leaves the teacher
untouched and resumes exactly, and a multi-head classifier distilled on the fashion subset."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import pytest
import torch
import yaml

import train
from models.yolo import ClassificationModel, DetectionModel
from utils.common.cli import run_cli
from utils.compress.distill import (
    Distillation,
    TeacherDistillation,
    TeacherError,
    bernoulli_kl_with_logits,
    check_teacher_matches,
    classification_distill_loss,
    detection_distill_loss,
    detection_distill_terms,
)
from utils.runners.train import make_task, run_train
from utils.train.callbacks import default_callbacks
from utils.train.config import TrainConfig
from utils.train.engine import fit
from utils.weights.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "neu-det-sample.yaml"
FASHION = ROOT.parent / "shared" / "datasets" / "fashion-color-type"


# ---------------------------------------------------------------------------------------------- losses
def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bernoulli_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _reference_detection_terms(student, teacher, balance, nc) -> tuple[float, float, float]:
    """The distillation terms cell by cell in float64 Python arithmetic, from the formulas in
    utils/compress/distill.py."""
    def decoded(v):
        xy = [2 * _sigmoid(v[0]) - 0.5, 2 * _sigmoid(v[1]) - 0.5]
        return [*xy, (2 * _sigmoid(v[2])) ** 2, (2 * _sigmoid(v[3])) ** 2]

    box = obj = cls = 0.0
    for s_map, t_map, weight in zip(student, teacher, balance):
        cells_s = s_map.double().reshape(-1, s_map.shape[-1]).tolist()
        cells_t = t_map.double().reshape(-1, t_map.shape[-1]).tolist()
        kl_obj, box_sum, cls_sum, total = [], 0.0, 0.0, 0.0
        for s, t in zip(cells_s, cells_t):
            p = _sigmoid(t[4])
            kl_obj.append(_bernoulli_kl(p, _sigmoid(s[4])))
            box_sum += p * sum((a - b) ** 2 for a, b in zip(decoded(s), decoded(t)))
            cls_sum += p * sum(_bernoulli_kl(_sigmoid(t[5 + c]), _sigmoid(s[5 + c])) for c in range(nc)) / nc
            total += p
        obj += weight * sum(kl_obj) / len(kl_obj)
        box += box_sum / total
        cls += cls_sum / total if nc > 1 else 0.0
    return box, obj, cls


def _maps(seed: int, nc: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 2, 2, 5 + nc, generator=generator) * 2,
            torch.randn(2, 2, 1, 1, 5 + nc, generator=generator)]


def test_bernoulli_kl_matches_closed_form():
    s, t = torch.tensor([-3.0, 0.0, 0.7, 4.0]), torch.tensor([1.5, -2.0, 0.7, 3.0])
    expected = [_bernoulli_kl(_sigmoid(b), _sigmoid(a)) for a, b in zip(s.tolist(), t.tolist())]
    torch.testing.assert_close(bernoulli_kl_with_logits(s, t), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert bernoulli_kl_with_logits(t, t).abs().max() == 0


def test_detection_distillation_equals_reference_and_vanishes_on_equal_outputs():
    teacher, student = _maps(0), _maps(1)
    balance = [4.0, 1.0]
    terms = detection_distill_terms(student, teacher, balance, nc=3)
    torch.testing.assert_close(terms.double(), torch.tensor(_reference_detection_terms(student, teacher, balance, 3),
                                                           dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert (terms > 0).all()
    gains = {"box": 0.05, "obj": 0.3, "cls": 0.2}
    loss = detection_distill_loss(student, teacher, gains, balance, nc=3)
    assert loss.item() == pytest.approx(float(terms[0] * 0.05 + terms[1] * 0.3 + terms[2] * 0.2), rel=1e-6)
    assert detection_distill_loss(teacher, teacher, gains, balance, nc=3).item() == 0.0

    single = detection_distill_terms(_maps(1, nc=1), _maps(0, nc=1), balance, nc=1)  # one class: no class term
    assert single[2] == 0 and single[0] > 0 and single[1] > 0

    # only the student is trained: the gradient reaches it, never the teacher
    student = [m.clone().requires_grad_() for m in student]
    teacher = [m.clone().requires_grad_() for m in teacher]
    detection_distill_loss(student, teacher, gains, balance, nc=3).backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student)
    assert all(m.grad is None for m in teacher)


def test_classification_distillation_equals_reference():
    generator = torch.Generator().manual_seed(0)
    student = {"color": torch.randn(3, 4, generator=generator), "type": torch.randn(3, 2, generator=generator)}
    teacher = [torch.randn(3, 4, generator=generator), torch.randn(3, 2, generator=generator)]
    temperature, weights = 2.0, [1.0, 0.5]

    def reference(s: torch.Tensor, t: torch.Tensor) -> float:
        total = 0.0
        for s_row, t_row in zip(s.double().tolist(), t.double().tolist()):
            zs = sum(math.exp(v / temperature) for v in s_row)
            zt = sum(math.exp(v / temperature) for v in t_row)
            ps = [math.exp(v / temperature) / zs for v in s_row]
            pt = [math.exp(v / temperature) / zt for v in t_row]
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        return total / len(s) * temperature**2

    expected = sum(w * reference(s, t) for w, s, t in zip(weights, student.values(), teacher))
    loss = classification_distill_loss(student, teacher, weights, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert classification_distill_loss(student, teacher, [0.0, 0.5], temperature).item() == pytest.approx(
        0.5 * reference(student["type"], teacher[1]), rel=1e-5)  # a head not trained now adds nothing
    assert classification_distill_loss(student, list(student.values()), weights, temperature).item() == 0.0


def test_distillation_adds_weighted_term_and_logs_it():
    teacher_net = torch.nn.Linear(3, 2)
    images = torch.randn(4, 3)

    def task_loss(preds, batch):
        return preds.sum() * 2, torch.tensor([1.0, 2.0])

    def criterion(preds, teacher_preds, batch):
        value = (preds - teacher_preds).pow(2).mean()
        return value * batch["n"], value

    distillation = Distillation(teacher_net.eval().requires_grad_(False), criterion, weight=0.5)
    preds = torch.randn(4, 2)
    loss, items = distillation.wrap(task_loss)(preds, {"images": images, "n": 4})
    term = (preds - teacher_net(images)).pow(2).mean()
    assert loss.item() == pytest.approx(float(preds.sum() * 2 + 0.5 * term * 4), rel=1e-6)
    torch.testing.assert_close(items, torch.tensor([1.0, 2.0, float(0.5 * term)]))


# ---------------------------------------------------------------------------------------------- teacher checks
def test_teacher_checks_name_the_mismatch():
    student = DetectionModel("yolov5n.yaml", nc=6)
    check_teacher_matches(DetectionModel("yolov5s.yaml", nc=6), student, "t.pt")  # wider teacher, same grids: fine
    with pytest.raises(TeacherError, match=r"--teacher t.pt predicts 5 classes but the student 6"):
        check_teacher_matches(DetectionModel("yolov5n.yaml", nc=5), student, "t.pt")
    with pytest.raises(TeacherError, match=r"strides \[8.0, 16.0, 32.0, 64.0\].*equal grids"):
        check_teacher_matches(DetectionModel("yolov5n6.yaml", nc=6), student, "t.pt")
    other_anchors = DetectionModel("yolov5n.yaml", nc=6)
    other_anchors.model[-1].anchors[0, 0] *= 1.5
    with pytest.raises(TeacherError, match=r"anchors .* differ from the student's"):
        check_teacher_matches(other_anchors, student, "t.pt")
    classifier = ClassificationModel("yolov5n-mcls-s.yaml")  # heads of 4, 3 and 2 classes
    with pytest.raises(TeacherError, match=r"is a classify model but the student is a detect model"):
        check_teacher_matches(classifier, student, "t.pt")
    with pytest.raises(TeacherError, match=r"is a detect model but the student is a classify model"):
        check_teacher_matches(student, classifier, "t.pt")
    fewer = ClassificationModel("yolov5n-mcls-s.yaml", heads=[{"name": "a", "names": ["x", "y"]},
                                                              {"name": "b", "names": ["u", "v", "w"]}])
    with pytest.raises(TeacherError, match=r"has heads \(name, classes\) \[\('a', 2\), \('b', 3\)\]"):
        check_teacher_matches(fewer, classifier, "t.pt")


def _cli(tmp_path: Path, *flags: str) -> list[str]:
    return ["--cfg", "yolov5n.yaml", "--data", str(SAMPLE), "--imgsz", "64", "--batch-size", "8", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--noautoanchor", "--noplots", "--project", str(tmp_path / "runs"),
            *flags]


def test_teacher_errors_are_one_line(tmp_path, capsys):
    assert run_cli(train.main, _cli(tmp_path, "--teacher", str(tmp_path / "missing.pt"))) == 2
    err = capsys.readouterr().err
    assert err == f"error: --teacher {tmp_path / 'missing.pt'}: file not found; give the trained (unpruned) " \
                  f"model's .pt, e.g. runs/train/exp/weights/best.pt\n"
    assert not (tmp_path / "runs").exists(), "flags are checked before anything is created"

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert run_cli(train.main, _cli(tmp_path, "--teacher", str(garbage))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --teacher {garbage}: cannot be loaded as a model checkpoint")
    assert err.count("\n") == 1

    five = save_checkpoint(DetectionModel("yolov5n.yaml", nc=5), tmp_path / "five.pt")
    assert run_cli(train.main, _cli(tmp_path, "--teacher", str(five))) == 2
    err = capsys.readouterr().err
    assert err == f"error: --teacher {five} predicts 5 classes but the student 6; the teacher must be trained on " \
                  f"the same classes (same data YAML, same --single-cls)\n"

    assert run_cli(train.main, _cli(tmp_path, "--teacher", str(five), "--distill-weight", "0")) == 2
    assert "--distill-weight 0.0: must be > 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- training runs
class TeacherWatch:
    """Copies the teacher's tensors when training starts; checks it stayed frozen at every batch."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.batches = 0

    def on_pretrain_routine_end(self, trainer) -> None:
        self.start = {k: v.clone() for k, v in teacher_of(trainer).state_dict().items()}

    def on_train_batch_end(self, trainer) -> None:
        teacher = teacher_of(trainer)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        self.batches += 1

    def on_train_end(self, trainer) -> None:
        self.end = {k: v.clone() for k, v in teacher_of(trainer).state_dict().items()}


def teacher_of(trainer) -> torch.nn.Module:
    """The teacher the run's --teacher plug-in loaded."""
    plugin = next(p for p in trainer.plugins if isinstance(p, TeacherDistillation))
    return plugin.distillation.teacher


class StopAfterFirstEpoch:
    def on_fit_epoch_end(self, trainer) -> None:
        raise KeyboardInterrupt("simulated kill after epoch 0 was saved")


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_distilled_sparse_finetune_logs_keeps_teacher_and_resumes_exactly(tmp_path):
    torch.manual_seed(1)
    teacher_path = save_checkpoint(DetectionModel("yolov5s.yaml", nc=6), tmp_path / "teacher.pt")
    teacher_bytes = hashlib.sha256(teacher_path.read_bytes()).hexdigest()

    def config(name: str) -> TrainConfig:
        return TrainConfig(cfg="yolov5n.yaml", data=str(SAMPLE), imgsz=64, batch_size=8, epochs=2, workers=0,
                           device="cpu", project=str(tmp_path), name=name, exist_ok=True, seed=0, noautoanchor=True,
                           noplots=True, noval=True, teacher=str(teacher_path), distill_weight=2.0, sparse=1e-3,
                           sparse_decay="linear", max_batches=3, hyp_override=["warmup_epochs=0", "nbs=8"])

    watch, callbacks = TeacherWatch(), default_callbacks()
    callbacks.add_logger(watch)
    cfg = config("full")
    fit(make_task(cfg), cfg, callbacks)
    full = _rows(tmp_path / "full")
    assert [float(r["train/distill"]) > 0 for r in full] == [True, True]
    assert {"train/box", "train/obj", "train/cls", "train/distill", "sparsity/gamma<0.01"} <= set(full[0])
    assert watch.batches == 6 and watch.start.keys() == watch.end.keys()
    assert all(torch.equal(watch.start[k], watch.end[k]) for k in watch.start), "the teacher changed"
    fused_teacher = load_checkpoint(teacher_path, fuse=True).model.state_dict()
    assert all(torch.equal(fused_teacher[k], watch.start[k]) for k in fused_teacher)
    assert hashlib.sha256(teacher_path.read_bytes()).hexdigest() == teacher_bytes

    # killed after epoch 0, resumed from last.pt: the saved config brings back --teacher and --sparse
    callbacks = default_callbacks()
    callbacks.add_logger(StopAfterFirstEpoch())
    cfg = config("killed")
    with pytest.raises(KeyboardInterrupt):
        fit(make_task(cfg), cfg, callbacks)
    last = tmp_path / "killed" / "weights" / "last.pt"
    saved_cfg = torch.load(last, weights_only=True)["train_state"]["cfg"]
    assert (saved_cfg["teacher"], saved_cfg["sparse"], saved_cfg["sparse_decay"]) == (str(teacher_path), 1e-3, "linear")
    run_train(TrainConfig(resume=str(last)))
    resumed = _rows(tmp_path / "killed")
    assert resumed == full, "the resumed run's results.csv differs from the uninterrupted run's"
    a = torch.load(tmp_path / "full" / "weights" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_multihead_classifier_distills_per_head(tmp_path):
    if not FASHION.exists():
        pytest.skip(f"{FASHION} not present (the ../shared folder with data sets and fixtures is absent)")
    for split, n in (("train", 32), ("val", 16)):
        for f in sorted((FASHION / "images" / split).glob("*.jpg"))[:n]:
            target = tmp_path / "fashion" / split / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    spec = yaml.safe_load((FASHION / "fashion-color-type.yaml").read_text())
    spec.update(path=str(tmp_path / "fashion"), train="train", val="val")
    data = tmp_path / "fashion.yaml"
    data.write_text(yaml.safe_dump(spec))

    cfg = TrainConfig(cfg="yolov5n-mcls-s.yaml", data=str(data), hyp="", epochs=1, batch_size=16, imgsz=32,
                      workers=0, device="cpu", project=str(tmp_path), name="cls", exist_ok=True, seed=0,
                      optimizer="Adam", noplots=True, hyp_override=["lr0=0.003", "warmup_epochs=0", "nbs=16"])
    task = make_task(cfg)
    torch.manual_seed(1)
    teacher = ClassificationModel("yolov5s-mcls-s.yaml", heads=task.heads)
    teacher_path = save_checkpoint(teacher, tmp_path / "teacher.pt", None, task="classify")
    cfg.teacher = str(teacher_path)
    fit(make_task(cfg), cfg)
    row = _rows(tmp_path / "cls")[0]
    heads = [h["name"] for h in task.heads]
    assert {f"train/{h}" for h in heads} | {"train/distill"} <= set(row)
    assert float(row["train/distill"]) > 0
