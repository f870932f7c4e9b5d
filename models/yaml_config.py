"""Reading model YAMLs: locating the file, safe argument resolution, and row validation.

YOLOv5 ``eval``-ed every string in a YAML row. Here a string argument is resolved through a whitelist:
the model's symbols (``nc``, ``anchors``, named head sizes), ``None``/``True``/``False``, literals that
``ast.literal_eval`` accepts, and otherwise it stays a plain string (``'nearest'``).
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import yaml

from utils.common.errors import UserError
from utils.common.paths import find_file
from utils.common.user_files import load_user_yaml

MODELS_DIR = Path(__file__).resolve().parent
_CONSTANTS = {"None": None, "True": True, "False": False}


class ModelConfigError(UserError, ValueError):
    """A model YAML that cannot be built; the message names the file and layer."""


def find_model_yaml(cfg: str | Path) -> Path:
    """Accept a path, or a bare name looked up in ``models/`` and its sub-folders (``yolov5s.yaml``)."""
    path = Path(cfg)
    if path.suffix not in {".yaml", ".yml"}:
        path = path.with_suffix(".yaml")
    return find_file(path, MODELS_DIR, "model config")


def load_model_yaml(cfg: str | Path | dict) -> dict:
    """Return a deep copy of the YAML dict, remembering the file it came from in ``yaml_file``."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    path = find_model_yaml(cfg)
    data = load_user_yaml(path, "model config", ModelConfigError)
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a mapping with 'backbone' and 'head'")
    data["yaml_file"] = str(path)
    return data


def last_module_name(cfg: dict) -> str:
    """The module name of the YAML's last row (``Detect``, ``Classify``...), which decides the model class."""
    rows = (cfg.get("backbone") or []) + (cfg.get("head") or [])
    return rows[-1][2] if rows and isinstance(rows[-1], list) and len(rows[-1]) == 4 else ""


def resolve_arg(value: Any, symbols: dict[str, Any]) -> Any:
    """Resolve one YAML argument without ``eval``: symbol, constant, literal, or the string itself."""
    if isinstance(value, list):
        return [resolve_arg(v, symbols) for v in value]
    if not isinstance(value, str):
        return value
    if value in symbols:
        return copy.deepcopy(symbols[value])
    if value in _CONSTANTS:
        return _CONSTANTS[value]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def model_symbols(cfg: dict) -> dict[str, Any]:
    """Names a YAML row may use: ``nc``, ``anchors`` and any ``nc<k>`` / ``heads`` keys."""
    symbols = {key: cfg[key] for key in cfg if key in {"nc", "anchors", "heads"} or key.startswith("nc")}
    return symbols


def layer_rows(cfg: dict) -> list[tuple[str, list]]:
    """``[(section, row), ...]`` over backbone then head, each row checked to be ``[from, n, module, args]``."""
    where = cfg.get("yaml_file", "<dict>")
    rows = []
    for section in ("backbone", "head"):
        if section not in cfg:
            raise ModelConfigError(f"{where}: missing '{section}' section")
        if not isinstance(cfg[section] or [], list):
            raise ModelConfigError(f"{where}: '{section}' must be a list of [from, n, module, args] rows")
        for row in cfg[section] or []:
            index = len(rows)
            if not isinstance(row, list) or len(row) != 4:
                raise ModelConfigError(f"{where}: layer {index}: expected [from, n, module, args], got {row!r}")
            if not isinstance(row[3], list):
                raise ModelConfigError(f"{where}: layer {index}: args must be a list, got {row[3]!r}")
            repeats = row[1]
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
                raise ModelConfigError(f"{where}: layer {index} ({row[2]}): repeat count n must be an integer >= 1, "
                                       f"got {repeats!r}")
            rows.append((section, row))
    return rows


# The most times one row may repeat its block once depth_multiple is applied. The deepest stage of any published
# YOLOv5 model repeats 12 times (YOLOv5x: 9 x 1.33), YOLOv8x's 6; 100 is far beyond any real model, while a typo
# like n: 3000000 would otherwise build blocks until memory runs out, minutes later, without naming the row.
MAX_REPEATS = 100


def scaled_repeats(n: int, depth_multiple: float) -> int:
    """How many times a row with repeat count ``n`` builds its block (YOLOv5: ``n`` scaled, at least 1; a row of
    1 stays 1)."""
    return max(round(n * depth_multiple), 1) if n > 1 else n


def check_model_numbers(cfg: dict) -> None:
    """``depth_multiple`` / ``width_multiple`` must be numbers > 0, class counts (``nc``, ``nc1``...) integers
    >= 1 and every row's scaled repeat count at most ``MAX_REPEATS``: anything else would build a model of the wrong
    size without a word, or never finish building it."""
    where = cfg.get("yaml_file", "<dict>")
    for key in ("depth_multiple", "width_multiple"):
        value = cfg.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ModelConfigError(f"{where}: {key} must be a number greater than 0, got {value!r}")
    depth_multiple = cfg.get("depth_multiple", 1.0)
    for index, (_, row) in enumerate(layer_rows(cfg)):
        repeats = scaled_repeats(row[1], depth_multiple)
        if repeats > MAX_REPEATS:
            scaled = f" x depth_multiple {depth_multiple:g} = {repeats}" if repeats != row[1] else ""
            raise ModelConfigError(f"{where}: layer {index} ({row[2]}): repeat count n {row[1]}{scaled} exceeds "
                                   f"{MAX_REPEATS} (the deepest published YOLOv5 stage repeats 12 times); give the "
                                   "number of blocks the row should build")
    for key, value in cfg.items():
        is_class_count = key == "nc" or (key.startswith("nc") and key[2:].isdigit())
        if is_class_count and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                     or value < 1):
            raise ModelConfigError(f"{where}: {key} (number of classes) must be an integer >= 1, got {value!r}")


def dump_model_yaml(cfg: dict, header: str = "") -> str:
    """A model YAML in YOLOv5's layout: settings first, one ``[from, n, module, args]`` row per line.

    Used to write pruned models; ``load_model_yaml`` reads the text back to an equal dict.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in cfg.items():
        if key == "yaml_file":
            continue
        if key in {"backbone", "head", "anchors"} and isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {_flow(row)}" for row in value]
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {_flow(k)}:{_nested(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def _nested(value: Any) -> str:
    if isinstance(value, dict) and value:  # an empty table stays {} (a pruning that cut nothing), not null
        return "".join(f"\n    {_flow(k)}: {_flow(v)}" for k, v in value.items())
    return f" {_flow(value)}"


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("\n...")
