"""What a subcommand is: its name, its help line, an example, its options and what it runs;
and ``CommandError``, a message for the operator.

A command on the key database is an ``async def work(args, manager)`` declared with
``on_keys(work)``: the manager, the stores and anyio are imported when it runs, never when
the parser is built, so ``keystile --help`` and a usage error cost argparse alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

from .work import CommandError, Run, Work

__all__ = ["Command", "CommandError", "Run", "Work", "on_keys"]


class Command(NamedTuple):
    """``keystile <name>``: ``help`` is its line in the root's list and its own description,
    ``example`` closes its ``--help``, ``add_arguments`` declares its options, ``run`` is
    what it does. (A named tuple: ``dataclasses`` would import ``inspect``, ``ast`` and
    ``dis`` for ``--help``.)"""

    name: str
    help: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Run


def on_keys(work: Work, *, creates_database: bool = False) -> Run:
    """``work`` run with a ``KeyManager`` on the key database. Only a command that
    ``creates_database`` may run on a SQLite file that does not exist yet: for any other,
    opening it would create an empty database and report success on nothing."""

    def run(args: argparse.Namespace) -> int:
        from .session import run_on_keys

        return run_on_keys(args, work, creates_database=creates_database)

    return run
