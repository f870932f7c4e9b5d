"""Run-folder naming."""

from __future__ import annotations

from pathlib import Path


def increment_path(path: str | Path, sep: str = "") -> Path:
    """``runs/train/exp`` -> ``runs/train/exp2``, ``exp3``, ... : the first name not taken yet."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}{sep}{n}")).exists():
        n += 1
    return candidate


def latest_run(search_dir: str | Path = ".") -> Path:
    """Most recently written ``last.pt`` below ``search_dir`` (for ``--resume`` without a path)."""
    candidates = sorted(Path(search_dir).glob("**/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--resume: no last.pt found below {search_dir}; pass the path: --resume PATH")
    return candidates[-1]
