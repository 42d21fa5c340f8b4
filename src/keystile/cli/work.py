"""What a command runs, and the error it tells the operator: shared by ``command`` (which
declares commands) and ``session`` (which runs them on the key database), so neither
imports the other."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..manager import KeyManager

__all__ = ["CommandError", "Run", "Work"]

#: What a subcommand runs once its options are parsed; returns the exit code.
Run = Callable[[argparse.Namespace], int]
#: A command's work on the key database, with a manager opened on it.
Work = Callable[[argparse.Namespace, "KeyManager"], Awaitable[None]]


class CommandError(Exception):
    """A message for the operator; printed as one line, exit code 1."""
