"""Knowledge distillation from a frozen teacher while training (``train.py --teacher T.pt``), mostly to fine-tune
a pruned student back from its unpruned parent. See docs/distill.md for why the outputs are distilled.

Detection (output level, after Mehta & Ozturk 2018, "Object detection at 200 Frames Per Second"): on every
level's raw map the student's objectness follows the teacher's sigmoid, and its class scores and box are
pulled towards the teacher's where the teacher sees an object (weighted by the teacher's objectness), so the
teacher's many confident background cells do not drown the few cells that hold objects. Each term is a
divergence that is exactly 0 when the student's outputs equal the teacher's:

* objectness: Bernoulli KL(sigma(t) || sigma(s)) per cell (= BCE against the teacher's sigmoid minus the
  teacher's own entropy; the same gradient as that BCE), mean over cells, levels weighted as in the YOLOv5 loss;
* classes: Bernoulli KL per class (YOLO classes are independent sigmoids), mean over classes, teacher-objectness
  weighted mean over cells, summed over levels; skipped for single-class models as in the YOLOv5 loss;
* box: squared difference of the decoded box (xy = 2 sigma - 0.5 in the cell, wh = (2 sigma)^2 in anchors),
  teacher-objectness weighted mean over cells, summed over levels.

The three are weighted by the task's own (size-scaled) box/obj/cls gains and the sum by ``--distill-weight``,
so at weight 1 the distillation has the task loss's balance and scale.

Classification: per head, Hinton's temperature-scaled KL(softmax(t / T) || softmax(s / T)) * T^2, weighted and
masked like the task's head losses (head weights, heads trained this epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import task_of
from utils.common.errors import UserError

if TYPE_CHECKING:
    from utils.train.config import TrainConfig

LOGGER = logging.getLogger(__name__)

# (student preds, teacher preds, batch) -> (loss to add to the task's loss, per-image value to log)
DistillCriterion = Callable[[Any, Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


class TeacherError(UserError):
    """A --teacher that cannot be used: missing, unreadable, or not comparable with the student."""


# ---------------------------------------------------------------------------------------------- losses
def bernoulli_kl_with_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(Bernoulli(sigmoid(teacher)) || Bernoulli(sigmoid(student))), from logits (stable)."""
    p = teacher.sigmoid()
    return (p * (F.logsigmoid(teacher) - F.logsigmoid(student))
            + (1 - p) * (F.logsigmoid(-teacher) - F.logsigmoid(-student)))


def _decoded_box(raw: torch.Tensor) -> torch.Tensor:
    """xy offset in the cell and wh in anchor units, as the YOLOv5 v6+ head decodes them."""
    xy, wh = raw[..., :2].sigmoid() * 2 - 0.5, (raw[..., 2:4].sigmoid() * 2) ** 2
    return torch.cat((xy, wh), -1)


def detection_distill_terms(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                            balance: Sequence[float], nc: int) -> torch.Tensor:
    """Unweighted ``(box, obj, cls)`` distillation terms over the levels' raw maps (bs, na, ny, nx, 5 + nc)."""
    box = obj = cls = torch.zeros((), device=student[0].device)
    for s, t, level_balance in zip(student, teacher, balance):
        s, t = s.float(), t.float().detach()
        if s.shape != t.shape:
            raise ValueError(f"student map {tuple(s.shape)} and teacher map {tuple(t.shape)} differ")
        weight = t[..., 4].sigmoid()
        total = weight.sum().clamp(min=1e-9)
        obj = obj + bernoulli_kl_with_logits(s[..., 4], t[..., 4]).mean() * level_balance
        box = box + (weight * (_decoded_box(s) - _decoded_box(t)).pow(2).sum(-1)).sum() / total
        if nc > 1:
            cls = cls + (weight * bernoulli_kl_with_logits(s[..., 5:], t[..., 5:]).mean(-1)).sum() / total
    return torch.stack((box, obj, cls))


def detection_distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                           gains: Mapping[str, float], balance: Sequence[float], nc: int) -> torch.Tensor:
    """``box_gain * box + obj_gain * obj + cls_gain * cls`` (per image, like the YOLOv5 loss items)."""
    terms = detection_distill_terms(student, teacher, balance, nc)
    weights = torch.tensor([gains["box"], gains["obj"], gains["cls"]], device=terms.device, dtype=terms.dtype)
    return (terms * weights).sum()


def classification_distill_loss(student: Mapping[str, torch.Tensor], teacher: Sequence[torch.Tensor],
                                head_weights: Sequence[float], temperature: float) -> torch.Tensor:
    """Sum over heads of ``weight * T^2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean); ``teacher`` lists the
    teacher's logits in the student's head order, ``head_weights`` is 0 for heads not trained now."""
    total = torch.zeros((), device=next(iter(student.values())).device)
    for s, t, weight in zip(student.values(), teacher, head_weights):
        if not weight:
            continue
        log_s = F.log_softmax(s.float() / temperature, dim=1)
        log_t = F.log_softmax(t.float().detach() / temperature, dim=1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
        total = total + weight * kl * temperature**2
    return total


# ---------------------------------------------------------------------------------------------- the teacher
def check_distill_flags(cfg: TrainConfig) -> None:
    """Before anything loads: the teacher file exists and the weights are sensible."""
    if cfg.teacher and not Path(cfg.teacher).is_file():
        raise TeacherError(f"--teacher {cfg.teacher}: file not found; give the trained (unpruned) model's .pt, "
                           f"e.g. runs/train/exp/weights/best.pt")
    if not cfg.distill_weight > 0:
        raise UserError(f"--distill-weight {cfg.distill_weight}: must be > 0 (1.0 = the task loss's own scale)")
    if not cfg.distill_temperature > 0:
        raise UserError(f"--distill-temperature {cfg.distill_temperature}: must be > 0 (e.g. 4)")
    from utils.train.config import TrainConfig

    default = TrainConfig()
    if not cfg.teacher and (cfg.distill_weight, cfg.distill_temperature) != (default.distill_weight,
                                                                             default.distill_temperature):
        LOGGER.warning("--distill-weight / --distill-temperature have no effect without --teacher")


def load_teacher(path: str | Path, device: torch.device, memory_format: torch.memory_format) -> nn.Module:
    """The teacher, safely loaded (weights_only), Conv+BN fused, frozen, in eval mode, on the student's device."""
    from utils.weights.checkpoint import load_checkpoint

    try:
        model = load_checkpoint(path, fuse=True).model
    except UserError as exc:  # unreadable or refused: the loader says why; the flag names the file
        raise TeacherError(f"--teacher {path}: cannot be loaded as a model checkpoint ({exc})") from None
    model = model.to(device, memory_format=memory_format).eval()
    model.requires_grad_(False)
    return model


def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> Any:
    """The teacher's raw outputs: in eval mode Detect returns (decoded, raw maps), the maps are what the student's
    training-mode forward returns; classifiers return logits (a tensor, or a dict per head)."""
    with torch.no_grad():
        out = teacher(images)
    return out[1] if isinstance(out, tuple) else out


def check_teacher_matches(teacher: nn.Module, student: nn.Module, path: str | Path) -> None:
    """Same task, same classes (per head), and for detectors the same strides and anchors (equal grids)."""
    where = f"--teacher {path}"
    kinds = task_of(teacher), task_of(student)
    if kinds[0] != kinds[1]:
        raise TeacherError(f"{where} is a {kinds[0]} model but the student is a {kinds[1]} model; distil from a "
                           f"teacher trained for the same task")
    if kinds[0] == "detect":
        _check_detect_heads(teacher.model[-1], student.model[-1], where)
    else:
        _check_classify_heads(teacher, student, where)
    names_t, names_s = list(getattr(teacher, "names", []) or []), list(getattr(student, "names", []) or [])
    if kinds[0] == "detect" and names_t and names_s and names_t != names_s:
        LOGGER.warning("%s: class names %s differ from the student's %s (same count, distilled by index)",
                       where, names_t, names_s)


def _check_detect_heads(t_head: nn.Module, s_head: nn.Module, where: str) -> None:
    if t_head.nc != s_head.nc:
        raise TeacherError(f"{where} predicts {t_head.nc} classes but the student {s_head.nc}; the teacher must be "
                           f"trained on the same classes (same data YAML, same --single-cls)")
    if (t_head.nl, t_head.na) != (s_head.nl, s_head.na) or not torch.equal(t_head.stride.cpu(), s_head.stride.cpu()):
        raise TeacherError(f"{where} has strides {t_head.stride.tolist()} with {t_head.na} anchors per level, the "
                           f"student {s_head.stride.tolist()} with {s_head.na}; output distillation needs equal grids")
    pixels = s_head.stride.detach().cpu().float().view(-1, 1, 1)
    t_anchors = t_head.anchors.detach().cpu().float() * pixels
    s_anchors = s_head.anchors.detach().cpu().float() * pixels
    if not torch.allclose(t_anchors, s_anchors, rtol=1e-3, atol=1e-2):
        raise TeacherError(f"{where}: anchors {t_anchors.flatten().tolist()} px differ from the student's "
                           f"{s_anchors.flatten().tolist()}; box distillation needs the same anchors: start the "
                           f"student from the teacher's model (a pruned copy keeps them) and pass --noautoanchor if "
                           f"AutoAnchor changed them")


def _check_classify_heads(teacher: nn.Module, student: nn.Module, where: str) -> None:
    from models.classify import heads_of

    t_heads, s_heads = heads_of(teacher), heads_of(student)
    t_sizes = [(h["name"], len(h["names"])) for h in t_heads]
    s_sizes = [(h["name"], len(h["names"])) for h in s_heads]
    if [n for _, n in t_sizes] != [n for _, n in s_sizes]:
        raise TeacherError(f"{where} has heads (name, classes) {t_sizes} but the student {s_sizes}; the teacher "
                           f"must be trained on the same heads and classes")
    if [n for n, _ in t_sizes] != [n for n, _ in s_sizes]:
        LOGGER.warning("%s: head names %s differ from the student's %s (distilled by position)", where,
                       [n for n, _ in t_sizes], [n for n, _ in s_sizes])


class Distillation:
    """The teacher plus the task's distillation criterion; wraps the task's ``loss_fn``.

    The teacher runs once per batch: the SAM optimizer's second forward on the same images reuses its outputs.
    """

    def __init__(self, teacher: nn.Module, criterion: DistillCriterion, weight: float):
        self.teacher, self.criterion, self.weight = teacher, criterion, weight
        self._images: torch.Tensor | None = None
        self._outputs: Any = None

    def teacher_outputs(self, images: torch.Tensor) -> Any:
        if images is not self._images:
            self._images, self._outputs = images, teacher_outputs(self.teacher, images)
        return self._outputs

    def wrap(self, loss_fn: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
             ) -> Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
        """``loss_fn`` plus ``weight x`` the distillation loss; its per-image value is appended to the items."""

        def distilled(preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
            loss, items = loss_fn(preds, batch)
            added, logged = self.criterion(preds, self.teacher_outputs(batch["images"]), batch)
            logged = (logged * self.weight).detach().reshape(1).to(items.device, items.dtype)
            return loss + added * self.weight, torch.cat((items, logged))

        return distilled


def build_distillation(task: Any, student: nn.Module, teacher_path: str | Path, weight: float,
                       device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
                       ) -> Distillation:
    """Load and check the teacher against the built student; the task supplies its criterion."""
    teacher = load_teacher(teacher_path, device, memory_format)
    check_teacher_matches(teacher, student, teacher_path)
    LOGGER.info("--teacher %s: distilling its outputs (weight %g)", teacher_path, weight)
    return Distillation(teacher, task.distill_criterion(student), weight)


class TeacherDistillation:
    """Training plug-in for ``--teacher``: once the student and its loss exist, load and check the teacher, add
    the distillation term to the loss and its value to the logged loss columns (``distill``)."""

    def __init__(self, teacher: str | Path, weight: float = 1.0):
        self.teacher_path, self.weight = teacher, weight
        self.distillation: Distillation | None = None

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        from utils.common.torch_utils import de_parallel

        self.distillation = build_distillation(trainer.task, de_parallel(trainer.model), self.teacher_path,
                                               self.weight, trainer.device, trainer.memory_format)
        trainer.loss_fn = self.distillation.wrap(trainer.loss_fn)
        trainer.loss_names = (*trainer.loss_names, "distill")
