"""The training plug-ins a config asks for: the one place where train.py's flags become plug-ins.

A plug-in is an object with hooks named like the events of :mod:`utils.train.callbacks` (``on_model_built``,
``on_loaders_built``, ``on_pretrain_routine_end``, ``on_train_epoch_start``, ``on_before_optimizer_step``,
``on_train_epoch_end``, ``on_train_end``...); the trainer runs its hooks before the loggers'. Each lives with the
feature it implements:

* :class:`utils.train.freeze.Freezing`: ``--freeze`` and ``--freeze-schedule``;
* :class:`utils.compress.quant.qat.QuantizationAwareTraining`: ``--qat``;
* :class:`utils.compress.sparsity.SparseTraining`: ``--sparse`` / ``--sparse-decay``;
* :class:`utils.compress.distill.TeacherDistillation`: ``--teacher`` / ``--distill-weight``.
"""

from __future__ import annotations

from typing import Any

from utils.train.config import TrainConfig


def plugins_for(cfg: TrainConfig) -> list[Any]:
    """The plug-ins ``cfg`` asks for, in the order their hooks run."""
    plugins: list[Any] = []
    if cfg.freeze or cfg.freeze_schedule:
        from utils.train.freeze import Freezing

        plugins.append(Freezing(cfg.freeze, cfg.freeze_schedule))
    if cfg.qat:
        from utils.compress.quant.qat import QuantizationAwareTraining

        plugins.append(QuantizationAwareTraining())
    if cfg.sparse:
        from utils.compress.sparsity import SparseTraining

        plugins.append(SparseTraining(cfg.sparse, cfg.sparse_decay, plots=not cfg.noplots, remain=cfg.sparse_remain,
                                      imgsz=cfg.imgsz))
    if cfg.teacher:
        from utils.compress.distill import TeacherDistillation

        plugins.append(TeacherDistillation(cfg.teacher, cfg.distill_weight))
    return plugins
