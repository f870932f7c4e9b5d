"""Data-set YAML loading (yolov5 layout: ``path``, ``train``, ``val``, ``test``, ``nc``, ``names``).

Every path in the returned dict is absolute, so the rest of the toolkit never has to know where the YAML lived
or what the current working directory was when training started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.common.errors import DataConfigError, MissingFileError
from utils.common.paths import REPO_ROOT, find_file
from utils.common.user_files import load_user_yaml

DATA_DIR = REPO_ROOT / "data"  # bare data YAML names (coco128.yaml) are looked up here
SPLIT_KEYS = ("train", "val", "test")


def load_data_config(path: str | Path) -> dict[str, Any]:
    """Read a data YAML and return it with absolute paths, ``names`` as a list and ``nc`` checked.

    ``path`` in the YAML is the data-set root: relative roots resolve against the YAML's own folder (not the
    working directory) so a data set can be moved as a whole; no ``path`` means the YAML folder itself.
    ``train``/``val``/``test`` may each be a folder, a ``.txt`` list of images or a list of those. Other keys
    (e.g. ``heads`` of classification sets) are passed through untouched.
    """
    try:
        yaml_file = find_file(path, DATA_DIR, "data YAML").resolve()
    except MissingFileError as exc:
        raise MissingFileError(f"{exc}: give the path of a yolov5-style data YAML (keys path, train, val, nc, "
                               f"names)") from None
    data = load_user_yaml(yaml_file, "data YAML", DataConfigError) or {}
    if not isinstance(data, dict):
        raise DataConfigError(f"{yaml_file}: expected a mapping of keys (path, train, val, nc, names), got a "
                              f"{type(data).__name__}")
    data = dict(data)
    root = _resolve_root(data.get("path"), yaml_file)
    data["path"] = str(root)
    data["yaml_file"] = str(yaml_file)
    for key in SPLIT_KEYS:
        if data.get(key):
            try:
                data[key] = _resolve_split(data[key], root, key, yaml_file)
            except MissingFileError as exc:
                if not data.get("download"):
                    raise
                raise MissingFileError(f"{exc}. The YAML's 'download' is not run (no network at run time): "
                                        f"fetch it on a connected machine and unpack it so that {root} holds "
                                        f"the data set") from None
    if not data.get("train") and not data.get("val"):
        raise DataConfigError(f"{yaml_file}: needs at least a 'train' or 'val' entry (folder or .txt list of images)")
    data["names"], data["nc"] = _check_names(data.get("names"), data.get("nc"), yaml_file)
    return data


def _resolve_root(value: Any, yaml_file: Path) -> Path:
    if value in (None, ""):
        return yaml_file.parent
    root = Path(str(value)).expanduser()
    if not root.is_absolute():
        root = yaml_file.parent / root
    return root.resolve()


def _resolve_split(value: Any, root: Path, key: str, yaml_file: Path) -> str | list[str]:
    """One entry or a list; each must exist so a typo fails now, not after the model was built."""
    entries = value if isinstance(value, list | tuple) else [value]
    resolved = []
    for entry in entries:
        candidate = Path(str(entry)).expanduser()
        if not candidate.is_absolute():
            candidate = root / candidate
        candidate = candidate.resolve()
        if not candidate.exists():
            raise MissingFileError(
                f"{yaml_file}: '{key}: {entry}' -> {candidate} does not exist. Put the images in that folder "
                f"(labels in the sibling 'labels' folder, e.g. {root}/images/{key} + {root}/labels/{key}) or "
                f"write a .txt file listing one image path per line there; relative entries resolve against "
                f"'path' ({root})")
        resolved.append(str(candidate))
    return resolved if isinstance(value, list | tuple) else resolved[0]


def _check_names(names: Any, nc: Any, yaml_file: Path) -> tuple[list[str], int]:
    """Accept a list or an {index: name} dict; ``nc`` alone gives placeholder names class0..."""
    nc = None if nc is None else parse_class_count(nc, yaml_file)
    if names is None:
        if nc is None:
            raise DataConfigError(f"{yaml_file}: needs 'names' (list or {{index: name}}) and/or 'nc'")
        return [f"class{i}" for i in range(nc)], nc
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataConfigError(f"{yaml_file}: 'names' dict keys must be class indices 0, 1, ..., got "
                                  f"{list(names)}") from None
        if keys != list(range(len(keys))):
            raise DataConfigError(f"{yaml_file}: 'names' dict keys must be 0..{len(keys) - 1} without gaps, got "
                                  f"{keys}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    elif not isinstance(names, list | tuple):
        raise DataConfigError(f"{yaml_file}: 'names' must be a list or a dict, got {type(names).__name__}")
    names = [str(n) for n in names]
    if not names:
        raise DataConfigError(f"{yaml_file}: 'names' is empty; list one name per class")
    if nc is not None and nc != len(names):
        raise DataConfigError(f"{yaml_file}: nc is {nc} but {len(names)} names are given; make them agree")
    return names, len(names)


def parse_class_count(nc: Any, yaml_file: Path) -> int:
    """``nc`` as a positive int (YAML may give ``6`` or ``'6'``); anything else names the file and the value."""
    if isinstance(nc, bool) or not isinstance(nc, int | str) or not str(nc).strip().isdigit():
        raise DataConfigError(f"{yaml_file}: 'nc' must be the number of classes (a positive integer), got {nc!r}")
    if int(nc) < 1:
        raise DataConfigError(f"{yaml_file}: 'nc' is {nc}; a data set needs at least one class")
    return int(nc)
