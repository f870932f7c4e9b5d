"""Run-folder naming and finding the repository's own files by bare name."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def find_file(path: str | Path, folder: Path, what: str) -> Path:
    """``path`` if it is a file; else, for a relative path, the same path inside the repository
    (``models/yolov5s.yaml`` from any working directory); else, for a bare name, the file of that name in
    ``folder`` or below (v7.0 looks ``coco128.yaml`` or ``hyp.scratch-low.yaml`` up in its ``data/`` tree so).

    Raises FileNotFoundError saying where it looked.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    if path.name == str(path):  # a bare name: no folder of its own was given
        for candidate in (folder / path.name, *sorted(folder.rglob(path.name))):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{what} '{path}' not found (looked at {path.resolve()} and, for bare names, in {folder})")
