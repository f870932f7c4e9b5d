"""Run-folder naming, output-folder checks, setting an earlier run aside, finding the repository's own files by
bare name."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from utils.common.errors import MissingFileError, UnreadableFileError, UnwritableFolderError

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGGER = logging.getLogger(__name__)


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


# A run folder's set-aside earlier runs: previous, previous2, ... (kept in place by every later --exist-ok run).
SET_ASIDE = re.compile(r"previous\d*")
# What Trainer.setup writes before the first epoch (removed again when setup fails on a user error).
SETUP_FILES = ("hyp.yaml", "opt.yaml", "labels.png")


def check_writable_folder(folder: str | Path, flag: str, value: object, advice: str | None = None) -> Path:
    """Refuse, before any work, an output folder we could not write: the folder itself, or else the nearest of its
    parents that exists (where it would be created), must be a folder that this user can write in and enter.

    Why here and not at the first write: train.py, the pruning tools and export.py write only after minutes of
    work, and the OSError they would meet there is a traceback. ``flag`` and ``value`` name what the user gave
    (``--project runs``); ``advice`` replaces the default "pass FLAG a folder you can write to".
    """
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    advice = advice or f"pass {flag} a folder you can write to"
    if not existing.is_dir():
        raise UnwritableFolderError(f"{flag} {value}: {existing} is a file, not a folder; {advice}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (to create {folder} in it)"
        raise UnwritableFolderError(f"{flag} {value}: cannot write to the folder {existing}{where}: permission denied "
                                    f"or a read-only file system; {advice}")
    return folder


def earlier_run_entries(save_dir: str | Path) -> list[Path]:
    """Everything in a run folder but the earlier runs already set aside there."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if not SET_ASIDE.fullmatch(p.name))


def check_set_aside(save_dir: str | Path, flag: str, inputs: dict[str, str | Path | None]) -> None:
    """Refuse, before any work, an ``--exist-ok`` run folder whose earlier run cannot be set aside whole: one that
    holds the working directory or this repository, one that holds a file this run reads (``inputs``: flag ->
    path; it would be moved away before being read), or a sub-folder we may not move."""
    save_dir = Path(save_dir).expanduser()
    entries = earlier_run_entries(save_dir)
    if not entries:
        return
    folder = save_dir.resolve()
    for holds, what in ((Path.cwd(), "the working directory"), (REPO_ROOT, "the yolo-kit repository")):
        if holds.resolve() == folder or folder in holds.resolve().parents:
            raise UnwritableFolderError(f"{flag} {save_dir}: --exist-ok would move everything in it aside, and it "
                                        f"holds {what}; give the run a folder of its own (--project/--name)")
    for name, path in inputs.items():
        if path and folder in Path(path).expanduser().resolve().parents and not _in_set_aside(folder, path):
            raise UnwritableFolderError(f"{name} {path} lies in the run folder {save_dir}, whose earlier run "
                                        "--exist-ok moves aside; copy it elsewhere or choose another --name")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and not os.access(entry, os.W_OK | os.X_OK):
            raise UnwritableFolderError(f"{flag} {save_dir}: --exist-ok cannot move the earlier run's {entry} aside "
                                        "(permission denied); fix its permissions or choose another --name")


def _in_set_aside(folder: Path, path: str | Path) -> bool:
    relative = Path(path).expanduser().resolve().relative_to(folder)
    return bool(SET_ASIDE.fullmatch(relative.parts[0]))


def set_aside_earlier_run(save_dir: str | Path) -> Path | None:
    """Move everything an earlier run left in ``save_dir`` (results, YAMLs, plots, weights, labels, images) into
    ``save_dir/previous`` (then ``previous2`` ...) so that a new run started there with ``--exist-ok`` neither
    mixes its files with them nor overwrites them; earlier set-aside runs stay where they are. Logs one line
    saying where the files went; returns that folder (None when there was nothing to move)."""
    save_dir = Path(save_dir)
    entries = earlier_run_entries(save_dir)
    if not entries:
        return None
    target = increment_path(save_dir / "previous")
    target.mkdir()
    for path in entries:
        path.rename(target / path.name)
    LOGGER.warning("--exist-ok: %s held an earlier run; its %d files and folders were moved to %s so that this run "
                   "neither mixes with nor overwrites them", save_dir, len(entries), target)
    return target


def set_aside_earlier_files(files: Iterable[Path], folder: str | Path) -> Path | None:
    """The named artifacts of an earlier run (export.py's files beside the weights, a pruning tool's pruned.yaml /
    .pt) that exist, moved into ``folder/previous`` (then ``previous2`` ...): what ``--exist-ok`` means for a
    script whose output is files, not a run folder. Logs one line saying where; returns that folder (None when
    none existed); :func:`restore_earlier_run` puts them back after a failed run."""
    existing = [Path(path) for path in files if Path(path).exists()]
    if not existing:
        return None
    target = increment_path(Path(folder) / "previous")
    target.mkdir(parents=True)
    for path in existing:
        path.rename(target / path.name)
    LOGGER.warning("--exist-ok: the earlier %s %s moved to %s, so that this run neither overwrites nor mixes with "
                   "them", "file was" if len(existing) == 1 else f"{len(existing)} files were",
                   ", ".join(p.name for p in existing), target)
    return target


def restore_earlier_run(save_dir: str | Path, set_aside: Path) -> None:
    """Undo :func:`set_aside_earlier_run` after a run that failed before writing anything of its own (call once the
    new run's setup files are removed): each entry goes back unless its name is taken again."""
    save_dir = Path(save_dir)
    for path in sorted(set_aside.iterdir()):
        if not (save_dir / path.name).exists():
            path.rename(save_dir / path.name)
    with contextlib.suppress(OSError):
        set_aside.rmdir()  # only when everything went back


def remove_unused_run_dir(save_dir: str | Path, keep_folder: bool = False) -> bool:
    """Undo a run folder that setup created but no training used: the files setup writes, the empty weights
    folder, then (unless ``keep_folder``: it existed before) the folder itself if nothing else is in it. Returns
    True when the folder is gone."""
    save_dir = Path(save_dir)
    for name in SETUP_FILES:
        (save_dir / name).unlink(missing_ok=True)
    for folder in (save_dir / "weights",) + (() if keep_folder else (save_dir,)):
        try:
            folder.rmdir()  # only succeeds on an empty folder: nothing else is ever removed
        except OSError:
            return False
    return True
