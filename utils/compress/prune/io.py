"""A pruned model on disk: a readable model YAML (``--path``) and a checkpoint beside it (same name, ``.pt``).

Both load like any other model (``train.py --cfg pruned.yaml --weights pruned.pt``, ``val.py``, ``export.py``)
with the safe loader and without the pruning library: the YAML keeps the original rows and adds the widths
table of :mod:`models.channels`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from models.registry import task_of
from models.yaml_config import dump_model_yaml
from utils.common.errors import UserError
from utils.common.paths import check_writable_folder, set_aside_earlier_files
from utils.weights.checkpoint import save_checkpoint


def pruned_paths(path: str | Path) -> tuple[Path, Path]:
    """(YAML, checkpoint) for ``--path``: ``pruned.yaml`` and ``pruned.pt``."""
    yaml_path = Path(path)
    if yaml_path.suffix not in {".yaml", ".yml"}:
        raise UserError(f"--path {path}: give the pruned model's YAML file name, e.g. --path pruned.yaml")
    return yaml_path, yaml_path.with_suffix(".pt")


def result_files(path: str | Path) -> list[Path]:
    """Every file a pruning run writes for ``--path`` (``latency_tables.json`` is a cache shared by runs, not
    one of them): what ``--exist-ok`` sets aside."""
    yaml_path, weights_path = pruned_paths(path)
    candidates = yaml_path.with_name(f"{yaml_path.stem}_candidates.csv")
    return [yaml_path, weights_path, candidates, candidates.with_suffix(".png")]


def set_aside_earlier_result(path: str | Path, exist_ok: bool) -> None:
    """With ``--exist-ok``, an earlier result for ``--path`` goes into ``previous/`` beside it before this run
    writes its first file (without it, :func:`check_writable` refused the run)."""
    if exist_ok:
        set_aside_earlier_files(result_files(path), Path(path).parent)


def check_writable(path: str | Path, exist_ok: bool) -> tuple[Path, Path]:
    """Refuse to replace an earlier result unless asked, and a folder we cannot write in (checked before any work
    starts: pruning and validation take minutes, and their result would be lost at the first write)."""
    yaml_path, weights_path = pruned_paths(path)
    for target in (yaml_path, weights_path):
        if target.exists() and not exist_ok:
            raise UserError(f"{target} already exists; pass --exist-ok to set it aside (into previous/) or choose "
                            "another --path")
    if not yaml_path.parent.exists():
        raise UserError(f"--path {path}: folder {yaml_path.parent} does not exist; create it first")
    check_writable_folder(yaml_path.parent, "--path", path, "choose a --path in a folder you can write to")
    return yaml_path, weights_path


def save_pruned(model: nn.Module, path: str | Path, header: str, **meta: Any) -> tuple[Path, Path]:
    """Write the YAML (atomically) and the checkpoint; returns both paths."""
    yaml_path, weights_path = pruned_paths(path)
    cfg = dict(model.yaml)
    head = model.model[-1]
    if task_of(model) == "detect" and head.stride is not None:
        # the trained anchors (AutoAnchor may have changed the YAML's), in pixels as the YAML writes them
        pixels = (head.anchors * head.stride.view(-1, 1, 1)).view(head.nl, -1)
        cfg["anchors"] = [[round(float(v), 3) for v in level] for level in pixels]
    text = dump_model_yaml(cfg, header)
    write_text_atomic(yaml_path, text)
    model.yaml = cfg
    save_checkpoint(model, weights_path, **meta)
    return yaml_path, weights_path


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and ``os.replace``: a crash leaves the old file or none."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
