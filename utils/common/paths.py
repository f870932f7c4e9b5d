"""Run-folder naming and finding the repository's own files by bare name."""

from __future__ import annotations

from pathlib import Path

from utils.common.errors import MissingFileError, UnreadableFileError

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
        raise MissingFileError(f"--resume: no last.pt found below {search_dir}; pass the path: --resume PATH")
    return candidates[-1]


def find_file(path: str | Path, folder: Path, what: str) -> Path:
    """``path`` if it is a file; else, for a relative path, the same path inside the repository
    (``models/yolov5s.yaml`` from any working directory); else, for a bare name, the file of that name in
    ``folder`` or below (v7.0 looks ``coco128.yaml`` or ``hyp.scratch-low.yaml`` up in its ``data/`` tree so).

    Raises :class:`MissingFileError` saying where it looked, :class:`UnreadableFileError` for a folder.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UnreadableFileError(f"{what} '{path}' is a folder; give the path of the file itself")
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    if path.name == str(path):  # a bare name: no folder of its own was given
        for candidate in (folder / path.name, *sorted(folder.rglob(path.name))):
            if candidate.is_file():
                return candidate
    raise MissingFileError(f"{what} '{path}' not found (looked at {path.resolve()} and, for bare names, in {folder})")


# What a new run appends to or overwrites in its folder, and so must not find from an earlier run: results.csv
# gains rows, TensorBoard shows every event file of a folder as one run, weights/*.pt are replaced at epoch 0.
EARLIER_RUN_FILES = ("results.csv", "events.out.tfevents.*", "weights/*.pt")
# What Trainer.setup writes before the first epoch (removed again when setup fails on a user error).
SETUP_FILES = ("hyp.yaml", "opt.yaml", "labels.png")


def set_aside_earlier_run(save_dir: str | Path) -> Path | None:
    """Move an earlier run's results.csv, event files and weights into ``save_dir/previous`` (then ``previous2``
    ...) so that a new run started there with ``--exist-ok`` neither mixes its rows and curves with them nor
    overwrites their weights; returns that folder (None when there was nothing to move). Plots and YAMLs are
    simply rewritten by the new run, as in YOLOv5 v7.0."""
    save_dir = Path(save_dir)
    found = sorted({p for pattern in EARLIER_RUN_FILES for p in save_dir.glob(pattern) if p.is_file()})
    if not found:
        return None
    target = increment_path(save_dir / "previous")
    for path in found:
        destination = target / path.relative_to(save_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)
    return target


def remove_unused_run_dir(save_dir: str | Path) -> bool:
    """Undo a run folder that setup created but no training used: the files setup writes, the empty weights
    folder, then the folder itself if nothing else is in it. Returns True when the folder is gone."""
    save_dir = Path(save_dir)
    for name in SETUP_FILES:
        (save_dir / name).unlink(missing_ok=True)
    for folder in (save_dir / "weights", save_dir):
        try:
            folder.rmdir()  # only succeeds on an empty folder: nothing else is ever removed
        except OSError:
            return False
    return True
