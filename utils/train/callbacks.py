"""Training callbacks: one signature ``hook(trainer)`` per event; loggers and the training plug-ins (freezing,
sparse training, QAT, distillation) are ordinary callbacks.

Events, in the order a run fires them (YOLOv5's names where YOLOv5 has the event):

* ``on_model_built``: the model is built and on its device, no data loaded yet (checks that need the model);
* ``on_loaders_built``: the loaders exist, the optimizer and EMA not yet: a plug-in may replace
  ``trainer.model`` (QAT) or ``trainer.memory_format``;
* ``on_pretrain_routine_end``: everything is set up: a plug-in may wrap ``trainer.loss_fn``, extend
  ``trainer.loss_names`` and record ``trainer.checkpoint_extras``;
* ``on_train_epoch_start``: the task's plan for the epoch has set ``requires_grad``; a plug-in may freeze more;
* ``on_before_optimizer_step``: gradients are final (unscaled, clipped); a plug-in may add to them;
* ``on_train_batch_end``;
* ``on_train_epoch_end``: the epoch's batches are done: a plug-in may add to ``trainer.extra_scalars`` and
  ``trainer.extra_histograms`` (logged with the epoch);
* ``on_fit_epoch_end``: validated and saved; loggers write the epoch's row;
* ``on_model_save``, ``on_train_end``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from utils.train.engine import Trainer

LOGGER = logging.getLogger(__name__)

EVENTS = ("on_model_built", "on_loaders_built", "on_pretrain_routine_end", "on_train_epoch_start",
          "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end", "on_fit_epoch_end", "on_model_save",
          "on_train_end")


class Callbacks:
    """A list of hooks per event, run in registration order."""

    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable[[Any], None]]] = defaultdict(list)

    def add(self, event: str, hook: Callable[[Any], None]) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown callback event '{event}'; known: {', '.join(EVENTS)}")
        self._hooks[event].append(hook)

    def add_logger(self, logger: object) -> None:
        """Register every method of ``logger`` named like an event."""
        for event in EVENTS:
            if hasattr(logger, event):
                self.add(event, getattr(logger, event))

    def run(self, event: str, trainer: Any) -> None:
        for hook in self._hooks.get(event, []):
            hook(trainer)

    def merged_after(self, first: Callbacks) -> Callbacks:
        """A new list: every hook of ``first``, then this list's hooks, event by event."""
        merged = Callbacks()
        for source in (first, self):
            for event, hooks in source._hooks.items():
                merged._hooks[event].extend(hooks)
        return merged


class CSVLogger:
    """results.csv: one row per epoch (losses, metrics, learning rates); appends on resume.

    A row with columns the file does not have yet (the first validated epoch of a ``--noval`` run, a resume
    with other metrics) rewrites the file with the union of the columns, earlier rows left blank there, so
    that every value stays under its own header.
    """

    def on_fit_epoch_end(self, trainer: Trainer) -> None:
        path = Path(trainer.save_dir) / "results.csv"
        row = {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in trainer.epoch_row().items()}
        header: list[str] = []
        rows: list[dict[str, str]] = []
        if path.exists():  # one row per epoch: small enough to read whole
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                header = list(reader.fieldnames or [])
        if header and set(row) <= set(header):
            with path.open("a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, header, restval="").writerow(row)
            return
        columns = list(row) + [k for k in header if k not in row]
        partial = path.with_suffix(".csv.tmp")  # replaced in one step: an interruption keeps the old file
        with partial.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, columns, restval="")
            writer.writeheader()
            writer.writerows([*rows, row])
        os.replace(partial, path)


class TensorBoardLogger:
    """TensorBoard scalars (losses, metrics, lr) and the trainer's histograms per epoch in ``save_dir``."""

    def __init__(self) -> None:
        self.writer = None

    def on_pretrain_routine_end(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.save_dir))

    def on_fit_epoch_end(self, trainer: Trainer) -> None:
        if self.writer is None:
            return
        for key, value in trainer.epoch_row().items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, trainer.epoch)
        for tag, values in trainer.extra_histograms.items():
            if values.numel():
                self.writer.add_histogram(tag, values, trainer.epoch)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class ResultsPlotter:
    """results.png from results.csv at the end of training (one panel per column)."""

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.cfg.noplots:
            return
        plot_results_csv(Path(trainer.save_dir) / "results.csv")


def plot_results_csv(path: Path) -> Path | None:
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    columns = [c for c in rows[0] if c != "epoch"]
    n_cols = 5
    n_rows = (len(columns) + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        filled = [r for r in rows if r[column] != ""]  # blank: an epoch without validation
        ax.plot([float(r["epoch"]) for r in filled], [float(r[column]) for r in filled], marker=".")
        ax.set_title(column, fontsize=9)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def default_callbacks() -> Callbacks:
    callbacks = Callbacks()
    for logger in (CSVLogger(), TensorBoardLogger(), ResultsPlotter()):
        callbacks.add_logger(logger)
    return callbacks
