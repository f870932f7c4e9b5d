"""``train.py --evolve N``: genetic hyperparameter search, one full (short) training per generation.

Each generation picks a parent among the best rows of ``evolve.csv`` (fitness-weighted), mutates the
evolvable hyperparameters by a random factor, clips them to their ranges, trains, and appends one row: the
task's headline metrics (detectors: P, R, mAP50, mAP50-95; classifiers: mean and per-head top-1), its fitness
(the number that picks best.pt), and the hyperparameters. Classifiers use the same search space; the
augmentation keys of detection (mosaic, mixup...) do nothing for them.
evolve.csv is appended after every generation, so an interrupted search loses at most one generation and
restarting the same command continues it. The best row is written to ``hyp_evolve.yaml`` and plotted.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from utils.train.config import TrainConfig, load_hyp

if TYPE_CHECKING:
    from utils.tasks.base import Task

LOGGER = logging.getLogger(__name__)

# key: (mutation gain, lower limit, upper limit); gain 0 = never mutated
SEARCH_SPACE: dict[str, tuple[float, float, float]] = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "fl_gamma": (0, 0.0, 2.0),
    "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9), "degrees": (1, 0.0, 45.0),
    "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0), "perspective": (0, 0.0, 0.001),
    "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0), "mixup": (1, 0.0, 1.0),
    "copy_paste": (1, 0.0, 1.0),
}


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def mutate(parent: dict[str, float], rng: np.random.Generator, probability: float = 0.8,
           sigma: float = 0.2) -> dict[str, float]:
    """Multiply each evolvable value by a factor in [0.3, 3]; at least one value always changes."""
    keys = [k for k, (gain, _, _) in SEARCH_SPACE.items() if gain > 0]
    gains = np.array([SEARCH_SPACE[k][0] for k in keys])
    factors = np.ones(len(keys))
    while (factors == 1).all():
        factors = (gains * (rng.random(len(keys)) < probability) * rng.standard_normal(len(keys)) * rng.random()
                   * sigma + 1).clip(0.3, 3.0)
    child = dict(parent)
    for key, factor in zip(keys, factors):
        _, low, high = SEARCH_SPACE[key]
        child[key] = float(np.clip(parent[key] * factor, low, high))
    return child


def select_parent(history: list[dict[str, float]], rng: np.random.Generator, top: int = 5) -> dict[str, float]:
    """Fitness-weighted choice among the ``top`` best generations so far."""
    best = sorted(history, key=lambda r: r["fitness"], reverse=True)[:top]
    weights = np.array([r["fitness"] for r in best]) - min(r["fitness"] for r in best) + 1e-6
    return best[int(rng.choice(len(best), p=weights / weights.sum()))]


def append_row(path: Path, row: dict[str, float]) -> None:
    new_file = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow({k: f"{v:.6g}" for k, v in row.items()})


def evolve(cfg: TrainConfig, make_task: Callable[[TrainConfig], Task]) -> dict[str, float]:
    """Run ``cfg.evolve`` generations (continuing an existing evolve.csv in the run folder); ``make_task`` builds
    each generation's task, which also scores it."""
    from utils.train.engine import fit

    out_dir = Path(cfg.project) / f"{cfg.name}_evolve"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "evolve.csv"
    base = load_hyp(cfg.hyp, cfg.hyp_override)
    rng = np.random.default_rng(cfg.seed + len(read_history(csv_path)))
    for generation in range(len(read_history(csv_path)), cfg.evolve):
        history = read_history(csv_path)
        hyp = base if not history else mutate({**base, **select_parent(history, rng)}, rng)
        hyp_file = out_dir / "hyp_candidate.yaml"
        hyp_file.write_text(yaml.safe_dump({k: hyp[k] for k in base}, sort_keys=False))
        run_cfg = dataclasses.replace(cfg, evolve=None, hyp=str(hyp_file), hyp_override=None, noplots=True,
                                      project=str(out_dir), name=f"gen{generation}", exist_ok=True, noval=True)
        task = make_task(run_cfg)
        metrics = fit(task, run_cfg)
        fitness = task.fitness(metrics) if metrics else 0.0
        row = {**{k: float(metrics.get(k, 0.0)) for k in task.headline_metrics}, "fitness": fitness,
               **{k: float(hyp[k]) for k in SEARCH_SPACE}}
        append_row(csv_path, row)
        LOGGER.info("evolve generation %d/%d: fitness %.4f", generation + 1, cfg.evolve, fitness)
    return write_best(csv_path, base)


def write_best(csv_path: Path, base: dict) -> dict[str, float]:
    history = read_history(csv_path)
    best = max(history, key=lambda r: r["fitness"])
    best_hyp = {**base, **{k: best[k] for k in SEARCH_SPACE}}
    (csv_path.parent / "hyp_evolve.yaml").write_text(
        f"# best of {len(history)} generations, fitness {best['fitness']:.5f}\n"
        + yaml.safe_dump(best_hyp, sort_keys=False))
    plot_evolution(history, csv_path.with_suffix(".png"))
    return {k: value for k, value in best.items() if k not in SEARCH_SPACE}


def plot_evolution(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, (gain, _, _) in SEARCH_SPACE.items() if gain > 0]
    fitness = np.array([r["fitness"] for r in history])
    cols = 6
    fig, axes = plt.subplots(int(np.ceil(len(keys) / cols)), cols, figsize=(16, 12), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.scatter([r[key] for r in history], fitness, c=fitness, cmap="viridis", s=12)
        ax.set_title(key, fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
