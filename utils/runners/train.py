"""What train.py does, callable from tests: pick the task, handle --resume/--extend and --evolve, fit."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.common.errors import FlagError, MissingFileError
from utils.common.paths import check_set_aside, check_writable_folder, increment_path, latest_run
from utils.common.torch_utils import select_device
from utils.train.config import TrainConfig, check_train_config
from utils.train.precision import requested_precision, resumed_precision, with_precision

if TYPE_CHECKING:
    from utils.tasks.base import Task

LOGGER = logging.getLogger(__name__)

# YOLOv5 v7.0 starts from yolov5s.pt when neither --cfg nor --weights is given, which it downloads; nothing is
# downloaded here, so the default is the smallest model of the family, trained from scratch.
DEFAULT_MODEL = "yolov5n.yaml"


def make_task(cfg: TrainConfig) -> Task:
    """The task of the model the config trains (its YAML's, or its checkpoint's, last layer) on ``cfg.data``."""
    from utils.tasks import build_task, task_of

    source: Any = cfg.cfg
    if not source:
        if not cfg.weights:
            raise FlagError("give --cfg (a model YAML) and/or --weights (a checkpoint)")
        from utils.weights.checkpoint import load_checkpoint

        source = load_checkpoint(cfg.weights).model
    return build_task(task_of(source), cfg.data, cfg.task_options())


def resume_config(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved run's config and training state, from ``--resume [PATH]``.

    A finished run is not silently restarted: it needs ``--extend N`` for N more epochs.
    """
    path = Path(cfg.resume) if isinstance(cfg.resume, str) else latest_run(cfg.project)
    if path.is_dir():
        path = path / "weights" / "last.pt"
    if not path.is_file():
        raise MissingFileError(f"--resume: {path} not found")
    from utils.weights.checkpoint import CheckpointError, read_checkpoint

    data = read_checkpoint(path)
    state = data.get("train_state") if isinstance(data, dict) else None
    if not state:
        raise CheckpointError(f"--resume: {path} holds no training state (best.pt files do not; use last.pt)")
    saved = TrainConfig(**{**state["cfg"], "resume": None})
    saved = dataclasses.replace(saved, project=str(path.parents[2]), name=path.parents[1].name, exist_ok=True)
    finished = state["epoch"] + 1 >= state["epochs"]
    if finished and not cfg.extend:
        raise FlagError(f"--resume {path}: training finished ({state['epochs']} epochs); nothing to resume. "
                        f"Use --resume {path} --extend N to train N more epochs.")
    if cfg.extend:
        saved = dataclasses.replace(saved, epochs=state["epochs"] + cfg.extend)
    if cfg.device:
        saved = dataclasses.replace(saved, device=cfg.device)
    if requested_precision(cfg) != "auto":
        LOGGER.warning("--resume continues in the precision the run trained in; the precision flags are ignored")
    precision, how = resumed_precision(state["cfg"], select_device(saved.device))
    saved = with_precision(saved, precision)
    LOGGER.info("resuming %s from epoch %d of %d, %s", path, state["epoch"] + 1, saved.epochs, how)
    return saved, state


def with_default_model(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the default model when it names none (no --cfg, --weights or --resume), saying so."""
    if cfg.cfg or cfg.weights or cfg.resume:
        return cfg
    LOGGER.info("model: %s from scratch (no --cfg or --weights given; YOLOv5's default, a pretrained yolov5s.pt, "
                "would need a download: give --weights yolov5s.pt where you have it)", DEFAULT_MODEL)
    return dataclasses.replace(cfg, cfg=DEFAULT_MODEL)


def check_run_folder(cfg: TrainConfig, in_place: bool) -> None:
    """Before anything loads: the run folder (``--evolve``: its folder of generations) can be created and written,
    and, written in place (``in_place``: --exist-ok, or DDP), its earlier run can be set aside whole."""
    if cfg.evolve:
        check_writable_folder(Path(cfg.project) / f"{cfg.name}_evolve", "--project", cfg.project)
        return
    save_dir = cfg.save_dir if in_place else increment_path(cfg.save_dir)
    check_writable_folder(save_dir, "--project", cfg.project)
    if in_place:
        check_set_aside(save_dir, "--project/--name", {"--weights": cfg.weights, "--cfg": cfg.cfg, "--data": cfg.data,
                                                       "--hyp": cfg.hyp, "--teacher": cfg.teacher})


def check_resumed_folder(cfg: TrainConfig, flag_value: str | bool) -> None:
    """A resumed run appends to results.csv and replaces weights/last.pt: both folders must be writable."""
    shown = flag_value if isinstance(flag_value, str) else cfg.save_dir
    for folder in (cfg.save_dir, cfg.save_dir / "weights"):
        check_writable_folder(folder, "--resume", shown, "make the run folder writable, or copy it and resume the copy")


def run_train(cfg: TrainConfig) -> dict[str, float]:
    from utils.compress.distill import check_distill_flags
    from utils.compress.sparsity import check_sparse_flags
    from utils.train.autobatch import resolve_batch_size
    from utils.train.engine import distributed_context, fit

    check_train_config(cfg)  # before anything loads: a bad flag leaves no run folder behind
    if not cfg.resume:
        check_run_folder(cfg, in_place=cfg.exist_ok or distributed_context()[2] > 1)
    check_sparse_flags(cfg)
    check_distill_flags(cfg)
    requested_precision(cfg)  # contradictory precision flags fail before anything loads
    cfg = with_default_model(cfg)
    if cfg.qat:
        from utils.compress.quant.qat import check_qat_flags

        check_qat_flags(cfg)
    cfg = resolve_batch_size(cfg, lambda: make_task(cfg).build_model(cfg.model_source()))  # --batch-size -1
    if cfg.evolve:
        from utils.train.evolve import evolve

        return evolve(cfg, make_task)
    state = None
    if cfg.resume:
        flag_value = cfg.resume
        cfg, state = resume_config(cfg)
        check_resumed_folder(cfg, flag_value)
    return fit(make_task(cfg), cfg, resume_state=state)
