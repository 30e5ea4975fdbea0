"""The errors an operator can fix from the message alone.

Every error raised at a boundary (a config key, a data file's line, a ledger line)
is a `FedcareError`. The command line catches this one family in one place
(`run_command`) and prints it as a single line, ``error: <message>``, exit status 2,
without a traceback. Anything else is a bug in fedcare and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


class FedcareError(Exception):
    """Bad input, named where it is: the file and line, or the key. The CLI prints it as
    one line without a traceback."""


class ConfigError(FedcareError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names
    the key (and the file, for YAML)."""


class DataError(FedcareError, ValueError):
    """A data file or a data setting cannot be used. `path` and `line` (1-based) say
    where, when the problem is in a file; the message starts with ``path:line:``."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        where = ("" if path is None else f"{path}: " if line is None else f"{path}:{line}: ")
        super().__init__(where + message)


class RunError(FedcareError, RuntimeError):
    """A run could not start, or it ended without a result; the message says why and
    where its log is."""


def run_command(func: Callable[..., int], *args) -> int:
    """func(*args), with a FedcareError printed as one line on stderr (exit 2)."""
    try:
        return func(*args)
    except FedcareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
