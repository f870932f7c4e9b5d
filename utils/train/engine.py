"""The one training loop, shared by every task.

:class:`Trainer` owns what all tasks share: device and DDP, AMP, EMA, gradient accumulation to a nominal
batch of 64, warm-up, the lr schedule, freezing, checkpoints (atomic, with every state needed for an exact
resume), early stopping and the callbacks that log. A :class:`~utils.tasks.base.Task` supplies the model,
the data, the loss, validation and the fitness number. Training features that change how a run trains
(freezing, sparse training, QAT, distillation) are plug-ins: callbacks on the events of
:mod:`utils.train.callbacks`, chosen from the config by :func:`utils.train.plugins.plugins_for`; the loop has no
branch for any of them.

Exact resume: every epoch starts by reseeding all random generators from ``(seed, epoch)`` and gradients
accumulated after an epoch's last optimizer step are dropped by the next epoch's ``zero_grad`` (as v7.0
does), so an epoch depends only on the state saved at the end of the previous one. ``--resume`` after a
kill therefore reproduces the uninterrupted run (bit for bit on CPU with ``--deterministic``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from utils.common.errors import UserError
from utils.common.paths import increment_path, remove_unused_run_dir, restore_earlier_run, set_aside_earlier_run
from utils.common.torch_utils import (
    de_parallel,
    float_outputs,
    seed_everything,
    select_device,
    set_inplace_activations,
    training_memory_format,
)
from utils.tasks.base import Task
from utils.train.callbacks import Callbacks, default_callbacks
from utils.train.config import TrainConfig, load_hyp
from utils.train.ema import ModelEMA
from utils.train.freeze import apply_trainable, freeze_batchnorm_stats
from utils.train.optim import SAM, build_optimizer, lr_lambda, scheduled_factor, warmup_step
from utils.train.precision import requested_precision, resolve_precision, with_precision
from utils.weights.checkpoint import load_state_strict, remove_stale_temp_files, save_checkpoint

LOGGER = logging.getLogger(__name__)


def distributed_context() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, -1, 1) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", -1)), world


class Trainer:
    """Fits ``task`` according to ``cfg``; ``fit()`` returns the final metrics.

    ``plugins`` (default: those ``cfg`` asks for) are callback objects whose hooks run before the other
    callbacks of each event.
    """

    def __init__(self, task: Task, cfg: TrainConfig, callbacks: Callbacks | None = None,
                 plugins: list[Any] | None = None):
        from utils.train.plugins import plugins_for

        self.task, self.cfg = task, cfg
        self.plugins = plugins_for(cfg) if plugins is None else list(plugins)
        own = Callbacks()
        for plugin in self.plugins:
            own.add_logger(plugin)
        self.callbacks = (callbacks or default_callbacks()).merged_after(own)
        self.rank, self.local_rank, self.world_size = distributed_context()
        self.device = self._init_device()
        self.precision = resolve_precision(requested_precision(cfg), self.device)
        self.cfg = cfg = with_precision(cfg, self.precision.name)  # opt.yaml and last.pt record what is used
        if self.is_main:
            LOGGER.info("precision: %s", self.precision.describe())
        self.hyp = load_hyp(cfg.hyp, cfg.hyp_override)
        if cfg.label_smoothing:
            self.hyp["label_smoothing"] = cfg.label_smoothing
        task.hyp = self.hyp
        self.epoch, self.start_epoch, self.epochs = 0, 0, cfg.epochs
        self.best_fitness, self.best_epoch = -math.inf, -1
        self.metrics: dict[str, float] = {}
        self.loss_names = tuple(task.loss_names)  # results.csv / progress-bar loss columns (plug-ins may add)
        self.train_loss = torch.zeros(len(self.loss_names))
        self.extra_scalars: dict[str, float] = {}  # plug-ins' per-epoch values (results.csv, TensorBoard)
        self.extra_histograms: dict[str, torch.Tensor] = {}  # plug-ins' per-epoch TensorBoard histograms
        self.checkpoint_extras: dict[str, Any] = {}  # plug-ins' plain data, recorded in every checkpoint
        self.last_opt_step = -1
        self.epoch_lrs: list[float] = []
        self.resume_state: dict[str, Any] | None = None
        self.set_aside: Path | None = None  # where --exist-ok moved an earlier run in the run folder

    # ------------------------------------------------------------------ setup
    def _init_device(self) -> torch.device:
        if self.world_size > 1:
            backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
                return torch.device("cuda", self.local_rank)
            return torch.device("cpu")
        return select_device(self.cfg.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        cfg = self.cfg
        self.save_dir = Path(cfg.project) / cfg.name
        if not (cfg.exist_ok or self.resume_state or self.world_size > 1):  # DDP ranks must agree on one folder
            self.save_dir = increment_path(self.save_dir)
        self.weights_dir = self.save_dir / "weights"
        self.created_save_dir = not self.save_dir.exists()
        if self.is_main:
            self._prepare_run_dir()
            (self.save_dir / "hyp.yaml").write_text(yaml.safe_dump(self.hyp, sort_keys=False))
            (self.save_dir / "opt.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        seed_everything(cfg.seed + self.rank, cfg.deterministic)
        self.task.save_dir = self.save_dir
        self.model = self.task.build_model(cfg.model_source()).to(self.device)
        self.callbacks.run("on_model_built", self)  # checks that need the model fail before any data loads
        # before the EMA copy, so that it matches; DDP ranks each see batch_size // world_size images
        self.memory_format = training_memory_format(self.model, cfg.imgsz, max(cfg.batch_size // self.world_size, 1),
                                                    throughout=cfg.compile or self.precision.name == "bf16")
        if self.device.type == "cpu":
            set_inplace_activations(self.model, False)
        self.train_loader, self.val_loader = self.task.build_loaders(self.model)
        if self.val_loader is None and self.is_main:
            LOGGER.warning("%s has no validation split: training runs without validation (no P, R or mAP per epoch; "
                           "best.pt is the epoch of the lowest training loss); add 'val: <images>' to score each "
                           "epoch", cfg.data)
        self.callbacks.run("on_loaders_built", self)
        if self.world_size > 1:
            self.train_loader = distributed_loader(self.train_loader, self.world_size, self.rank, cfg.seed)
        self._init_optimization()
        if self.resume_state:
            self._restore(self.resume_state)
        if self.world_size > 1:
            self._wrap_ddp()
        self.forward_model = compiled(self.model) if cfg.compile else self.model
        self.loss_fn = self.task.criterion(de_parallel(self.model))
        self.callbacks.run("on_pretrain_routine_end", self)

    def _init_optimization(self) -> None:
        cfg, hyp = self.cfg, self.hyp
        batch = cfg.batch_size
        self.accumulate = max(round(hyp["nbs"] / batch), 1)
        weight_decay = hyp["weight_decay"] * batch * self.accumulate / hyp["nbs"]
        self.optimizer = build_optimizer(self.model, cfg.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
        self.sam = SAM(self.optimizer, hyp["sam_rho"]) if cfg.optimizer == "SAM" else None
        self.lf = lr_lambda(self.epochs, hyp["lrf"], cfg.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda=lambda e: scheduled_factor(self.lf, e))
        self.amp, self.amp_dtype = self.precision.autocast, self.precision.autocast_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.grad_scaling)  # bfloat16 needs no scaling
        self.ema = ModelEMA(self.model) if self.is_main else None

    def _wrap_ddp(self) -> None:
        if self.cfg.sync_bn and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ------------------------------------------------------------------ loop
    def _prepare_run_dir(self) -> None:
        """Create the run folder; in an existing one, set an earlier run aside whole (--exist-ok: utils.common.paths
        logs where it went) and drop temp files of an interrupted checkpoint save (--resume)."""
        if self.weights_dir.is_dir():  # half-written checkpoints belong to no run: dropped, not set aside
            remove_stale_temp_files(self.weights_dir)
        if not (self.created_save_dir or self.resume_state):
            self.set_aside = set_aside_earlier_run(self.save_dir)
        self.weights_dir.mkdir(parents=True, exist_ok=True)

    def _undo_run_dir(self) -> None:
        """After a user error found during setup: remove what setup wrote and put a set-aside earlier run back, so
        that the folder is as the user left it (or gone, when setup created it)."""
        if self.created_save_dir:
            remove_unused_run_dir(self.save_dir)
        elif not self.resume_state:
            remove_unused_run_dir(self.save_dir, keep_folder=True)
            if self.set_aside is not None:
                restore_earlier_run(self.save_dir, self.set_aside)
                LOGGER.info("%s: the earlier run was put back (this run stopped before training)", self.save_dir)

    def fit(self) -> dict[str, float]:
        try:
            self.setup()
        except UserError:  # a mistake found while loading: leave the run folder as it was
            if self.is_main:
                self._undo_run_dir()
            raise
        LOGGER.info("Logging results to %s; training for %d epochs", self.save_dir, self.epochs)
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch = epoch
            self._begin_epoch()
            self.train_loss = self.train_one_epoch()
            self.extra_scalars, self.extra_histograms = {}, {}
            self.callbacks.run("on_train_epoch_end", self)
            self.epoch_lrs = [group["lr"] for group in self.optimizer.param_groups]  # logged: used this epoch
            self.scheduler.step()
            if self.is_main:
                self._end_epoch()
            if self._should_stop():
                break
        return self._finish()

    def _begin_epoch(self) -> None:
        plan = self.task.epoch_plan(self.epoch, self.epochs)
        apply_trainable(de_parallel(self.model), plan.trainable)
        self.lr_scale = plan.lr_scale
        if plan.description:
            LOGGER.info("epoch %d trains %s", self.epoch, plan.description)
        self.callbacks.run("on_train_epoch_start", self)  # plug-ins may freeze more (--freeze, schedules)
        self.model.train()
        freeze_batchnorm_stats(self.model)
        reseed_for_epoch(self.cfg.seed + self.rank, self.epoch, self.train_loader)

    def train_one_epoch(self) -> torch.Tensor:
        loader = self.train_loader
        n_batches = len(loader) if not self.cfg.max_batches else min(len(loader), self.cfg.max_batches)
        warmup_iters = max(round(self.hyp["warmup_epochs"] * n_batches), 100) if self.hyp["warmup_epochs"] else -1
        mean_loss = torch.zeros(len(self.loss_names))
        bar = tqdm(enumerate(loader), total=n_batches, disable=not self.is_main,
                   bar_format="{l_bar}{bar:10}{r_bar}")
        self.optimizer.zero_grad()
        accumulate = self.accumulate
        for i, raw_batch in bar:
            if i >= n_batches:
                break
            step = i + n_batches * self.epoch
            if step <= warmup_iters:
                accumulate = warmup_step(self.optimizer, step, warmup_iters, self.lf(self.epoch) * self.lr_scale,
                                         self.hyp, self.cfg.batch_size)
            elif self.lr_scale != 1.0:
                for group in self.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * scheduled_factor(self.lf, self.epoch) * self.lr_scale
            batch = self.task.preprocess(raw_batch, self.device)
            batch["images"] = batch["images"].contiguous(memory_format=self.memory_format)
            items = self._forward_backward(batch)
            if step - self.last_opt_step >= accumulate:
                self._optimizer_step(batch)
                self.last_opt_step = step
            mean_loss = (mean_loss * i + items.cpu()) / (i + 1)
            bar.set_description(self._progress_text(mean_loss, batch))
            self.callbacks.run("on_train_batch_end", self)
        # Gradients accumulated after the last optimizer step are dropped by the next epoch's zero_grad (as v7.0),
        # so nothing pending outlives the epoch and last.pt holds all an exact resume needs.
        return mean_loss

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass under autocast (unless the run trains in float32) and the loss; a bfloat16 forward's
        outputs are cast to float32 first, so that the loss's sums and IoUs keep float32 precision."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            preds = self.forward_model(batch["images"])
            return self.loss_fn(float_outputs(preds) if self.precision.name == "bf16" else preds, batch)

    def _forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        loss, items = self._loss(batch)
        if self.world_size > 1:
            loss = loss * self.world_size  # DDP averages gradients across ranks
        self.scaler.scale(loss).backward()
        return items.detach()

    def _optimizer_step(self, batch: dict[str, Any]) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.sam is not None:
            self._sam_second_pass(batch)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.hyp["grad_clip"])
        self.callbacks.run("on_before_optimizer_step", self)  # after clipping: added terms keep their strength
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)

    def _sam_second_pass(self, batch: dict[str, Any]) -> None:
        """SAM: gradients at the perturbed weights replace the ones at the current weights."""
        self.sam.perturb()
        self.optimizer.zero_grad()
        loss, _ = self._loss(batch)
        loss.backward()
        self.sam.restore()

    def _progress_text(self, mean_loss: torch.Tensor, batch: dict[str, Any]) -> str:
        mem = f"{torch.cuda.memory_reserved() / 1e9:.3g}G" if self.device.type == "cuda" else "cpu"
        losses = " ".join(f"{name} {value:.4g}" for name, value in zip(self.loss_names, mean_loss.tolist()))
        extra = f" inst {batch['n_instances']}" if "n_instances" in batch else ""
        return f"{self.epoch}/{self.epochs - 1} {mem} {losses}{extra} size {batch['images'].shape[-1]}"

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self) -> None:
        final = self.epoch + 1 == self.epochs
        if self.val_loader is not None and (not self.cfg.noval or final):
            self.metrics = self.task.validate(self.ema.ema, self.val_loader, self.save_dir, plots=False)
        fitness = self.task.fitness(self.metrics) if self.metrics else -float(self.train_loss.sum())
        if fitness > self.best_fitness:
            self.best_fitness, self.best_epoch = fitness, self.epoch
        self._save(fitness == self.best_fitness)
        self.callbacks.run("on_fit_epoch_end", self)

    def epoch_row(self) -> dict[str, Any]:
        """One results.csv row: epoch, training losses, validation metrics, learning rates."""
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update({f"train/{n}": float(v) for n, v in zip(self.loss_names, self.train_loss.tolist())})
        for key, value in self.metrics.items():  # the task's validation losses come already named "val/..."
            if isinstance(value, (int, float)):
                row[key if key.startswith("val/") else f"metrics/{key}"] = float(value)
        row.update(self.extra_scalars)
        row.update({f"lr/pg{j}": float(lr) for j, lr in enumerate(self.epoch_lrs)})
        return row

    def _should_stop(self) -> bool:
        patience = self.cfg.patience or math.inf  # 0 disables early stopping, as in v7.0
        stop = self.epoch - self.best_epoch >= patience if self.is_main else False
        if stop:
            LOGGER.info("early stop: no improvement for %d epochs (best epoch %d)", self.cfg.patience,
                        self.best_epoch)
        if self.world_size > 1:
            flag = torch.tensor([int(stop)])
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    # ------------------------------------------------------------------ checkpoints
    def train_state(self) -> dict[str, Any]:
        """Everything besides the EMA weights that an exact resume needs (plain data and tensors only)."""
        return {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "best_fitness": float(self.best_fitness),
            "best_epoch": self.best_epoch,
            "last_opt_step": self.last_opt_step,
            "model": de_parallel(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "cfg": self.cfg.to_dict(),
            "hyp": self.hyp,
        }

    def _save(self, is_best: bool) -> None:
        if self.cfg.nosave and self.epoch + 1 != self.epochs:
            return
        meta = {"epoch": self.epoch, "fitness": float(self.task.fitness(self.metrics)) if self.metrics else None,
                "metrics": {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float))},
                "precision": self.precision.name, **self.cfg.checkpoint_meta(), **self.checkpoint_extras}
        extra = self.task.checkpoint_meta()
        last = save_checkpoint(self.ema.ema, self.weights_dir / "last.pt", self.train_state(), **meta, **extra)
        if is_best:
            save_checkpoint(self.ema.ema, self.weights_dir / "best.pt", None, **meta, **extra)
        if self.cfg.save_period > 0 and self.epoch % self.cfg.save_period == 0:
            save_checkpoint(self.ema.ema, self.weights_dir / f"epoch{self.epoch}.pt", None, **meta, **extra)
        self.callbacks.run("on_model_save", self)
        LOGGER.debug("saved %s", last)

    def _restore(self, state: dict[str, Any]) -> None:
        load_state_strict(self.model, state["model"], "last.pt")
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_fitness, self.best_epoch = state["best_fitness"], state["best_epoch"]
        self.last_opt_step = state["last_opt_step"]
        self.start_epoch = state["epoch"] + 1
        set_rng_state(state["rng"])

    def _finish(self) -> dict[str, float]:
        if self.is_main:
            best = self.weights_dir / "best.pt"
            if best.exists() and self.val_loader is not None:
                self.metrics = self.task.final_validation(best, self.val_loader, self.save_dir,
                                                          plots=not self.cfg.noplots)
            self.callbacks.run("on_train_end", self)
            LOGGER.info("%d epochs completed; results saved to %s", self.epoch - self.start_epoch + 1,
                        self.save_dir)
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        return self.metrics


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` of the training model; the original module stays the owner of the weights.

    Inductor fuses the BatchNorm/SiLU element-wise work around each convolution, forward and backward, and its
    BatchNorm is exact in any layout, so on a CPU it is the fastest exact step, channels-last throughout
    (yolov5n, batch 32, 256 px on 2 cores: 0.75 s; eager 0.99-1.05 s with the exact layout of
    ``training_memory_format``, 1.17 s NCHW). Not the default: Inductor needs a C++ compiler on the machine,
    and its 1-2 minutes of first compilation outweigh short runs.
    Freezing changes (``requires_grad``) and new input shapes recompile; the FX graph cache on disk makes later
    runs start fast.
    """
    LOGGER.info("torch.compile: the first batches compile the model (1-2 min on a small CPU, cached afterwards)")
    return torch.compile(model)


def distributed_loader(loader: DataLoader, world_size: int, rank: int, seed: int) -> DataLoader:
    """The same data set and collation, sharded across ranks; each rank gets batch_size // world_size."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=max(loader.batch_size // world_size, 1), sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      worker_init_fn=loader.worker_init_fn, pin_memory=loader.pin_memory)


# ---------------------------------------------------------------------- RNG helpers
def reseed_for_epoch(seed: int, epoch: int, loader: Any) -> None:
    """Reseed Python, NumPy, torch and the loader's own generators from (seed, epoch).

    Data order and augmentation of an epoch then depend on nothing but the seed and the epoch number.
    """
    epoch_seed = (seed * 1_000_003 + epoch) % 2**31
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "reseed"):  # data sets with their own generator (main-process augmentation)
        dataset.reseed(epoch_seed)
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed)
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
    inner_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if hasattr(inner_sampler, "set_epoch"):
        inner_sampler.set_epoch(epoch)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])


def fit(task: Task, cfg: TrainConfig, callbacks: Callbacks | None = None,
        resume_state: dict[str, Any] | None = None) -> dict[str, float]:
    """Train ``task`` with ``cfg``; ``resume_state`` is the ``train_state`` of a last.pt."""
    trainer = Trainer(task, cfg, callbacks)
    if resume_state is not None:
        trainer.resume_state = resume_state
    start = time.time()
    metrics = trainer.fit()
    LOGGER.info("training took %.1f min", (time.time() - start) / 60)
    return metrics
