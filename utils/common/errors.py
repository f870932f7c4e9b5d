"""The exception types for mistakes in what the user gave us (files, YAML, flags, checkpoints, permissions).

Command-line scripts print a :class:`UserError` as a single line ``error: <message>`` on stderr and exit with
status 2 (see :func:`utils.common.cli.run_cli`); anything else is an internal error and keeps its traceback. A message
says what is wrong, names the culprit (file, row, layer or flag) and what to do about it.

The subclasses also derive from the built-in exception a caller would expect (``ValueError`` for a bad value,
``FileNotFoundError`` for a missing file), so library code and tests that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; its message is shown as one line, without a traceback."""


class FlagError(UserError, ValueError):
    """A command-line flag outside its domain (``--epochs 0``), or two flags that contradict each other."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (flag, data YAML entry, list file) does not exist or holds nothing usable."""


class DataConfigError(UserError, ValueError):
    """A data-set YAML that cannot be used as it is (syntax, missing keys, ``nc`` that is not a positive number)."""


class UnreadableFileError(UserError, OSError):
    """A file the user named exists but cannot be read (permissions, a folder where a file was expected)."""


class UnwritableFolderError(UserError, OSError):
    """An output folder the user named (``--project``, ``--output-dir``, the folder of ``--path``) that cannot be
    created or written: no permission, a read-only file system, or a file where a folder should be."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model or the data; the message names the file."""
