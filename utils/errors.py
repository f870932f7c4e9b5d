"""The one exception type for mistakes in what the user gave us (files, YAML, flags, checkpoints, permissions).

Command-line scripts print a :class:`UserError` as a single line ``error: <message>`` on stderr and exit with
status 2 (see :func:`utils.cli.run_cli`); anything else is an internal error and keeps its traceback. A message
says what is wrong, names the culprit (file, row, layer or flag) and what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; its message is shown as one line, without a traceback."""
