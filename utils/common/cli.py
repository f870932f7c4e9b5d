"""What every command-line script shares: user errors as one line, and a fast process exit."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from utils.common.errors import FlagError, UserError

TRACEBACK_ENV = "YOLOKIT_TRACEBACK"  # set to 1 to see the traceback behind an `error: ...` line


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None,
            log_level: int = logging.INFO) -> int:
    """Run a script's ``main``; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2.

    The one logging set-up of every script: messages at ``log_level`` and above, as plain lines on stdout (errors
    go to stderr). Internal errors propagate with their traceback. ``YOLOKIT_TRACEBACK=1`` re-raises user errors
    too.
    """
    logging.basicConfig(level=log_level, format="%(message)s", stream=sys.stdout)
    try:
        return main(argv)
    except UserError as exc:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


class UserArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, ``--epochs abc``) are a :class:`FlagError`: one ``error:`` line
    and exit status 2 like every other user error, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise FlagError(f"{message} (see {self.prog} --help)")


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with ``code`` after the atexit handlers, skipping the interpreter's module teardown.

    Tearing down torch's module graph takes ~0.5-1 s on a 2-core VM (`python -c "import torch"` spends a third
    of its time there), a large share of a 7 s val.py run. atexit handlers (logging, multiprocessing) still run
    and the standard streams are flushed; only call this once every file the script wrote is closed.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
