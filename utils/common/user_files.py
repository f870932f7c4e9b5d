"""Reading the files a user names (YAMLs, lists): a missing, unreadable or malformed file is one clear error.

Every reader names the file and says what kind of file was expected, so a typo, a permission problem or a
broken YAML ends in ``error: ...`` instead of a traceback from deep inside a parser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from utils.common.errors import MissingFileError, UnreadableFileError, UserError


def read_user_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); ``what`` names the file in errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{what} '{path}' not found") from None
    except IsADirectoryError:
        raise UnreadableFileError(f"{what} '{path}' is a folder; give the path of the file itself") from None
    except PermissionError:
        raise UnreadableFileError(f"{what} '{path}' is not readable (permission denied); fix its permissions "
                                  f"or copy it somewhere readable") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}): is it the right "
                                  f"file?") from None


def load_user_yaml(path: str | Path, what: str, error: type[UserError] = UserError) -> Any:
    """The parsed YAML of ``path``; a syntax error raises ``error`` naming the file, line and column."""
    text = read_user_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{what} '{path}' is not valid YAML ({problem} at{where or ' an unknown place'}); fix "
                    f"the syntax there") from exc
