"""The ``keystile`` command: mint, list, show, update, disable, enable, revoke, rotate and
reap keys; read the audit log and a key's usage; run a demo.

One module per concern: ``app`` (the root parser, the options taken before or after the
command, errors and exit codes), ``command`` (what a subcommand is), ``arguments`` (what
each option accepts), ``output`` (tables and JSON Lines), ``changes`` (``update``'s
options as the manager's arguments), ``session`` (the key database and the manager a
command runs on), and a module per group of commands: ``keys``, ``maintenance``,
``usage``, ``demo``. Each subcommand carries its handler; nothing dispatches on the
command's name.

Importing this package, building the parser and ``keystile --help`` load argparse and
these small modules only: a command imports the manager, the stores and anyio when it
runs, so the help comes back at once.
"""

from __future__ import annotations

from .app import build_parser, main

__all__ = ["build_parser", "main"]
