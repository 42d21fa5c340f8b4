"""The root of the ``keystile`` command: its parser, the options taken before or after the
command, ``--version``, and how a run ends.

Errors are one line on stderr and exit code 1, never a traceback, and name the option as
typed (``--expires-in``), never a parameter of the Python API. ``--database-url`` and
``--json`` go before the command or after it, as gh's and stripe's do. A reader that goes
away (``keystile list | head -1``) ends the run quietly with 141, as if killed by SIGPIPE.

Each subcommand carries what it runs (``Command.run``, kept in the parsed arguments as
``handler``); building the parser imports the command modules and nothing heavier.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..database_url import DATABASE_URL_ENV, DEFAULT_DATABASE_URL
from ..errors import KeystileError
from . import demo, importing, keys, maintenance, owners, usage, webhooks
from .arguments import global_options
from .command import Command, CommandError
from .output import err

__all__ = ["EXIT_BROKEN_PIPE", "HELP_ORDER", "build_parser", "main"]

#: The exit status when the reader of our output went away, as if killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13
#: The order of the commands in ``keystile --help``: setting up, then a key's life as an
#: operator meets it.
HELP_ORDER = (
    "init",
    "import",
    "create",
    "list",
    "show",
    "update",
    "disable",
    "enable",
    "events",
    "revoke",
    "rotate",
    "reap",
    "owner",
    "usage",
    "webhooks",
    "demo",
)

DESCRIPTION = f"""\
Manage API keys for keystile-protected apps.

The database is --database-url, else ${DATABASE_URL_ENV}, else {DEFAULT_DATABASE_URL}
(a file in the current directory). URLs: sqlite:///path.db, postgresql://user@host/db.
Only init, create and demo create a missing SQLite file; the other commands fail.
KEY_ID is a key's id or its display form, as in ks_AbC123def456… (either works).
--database-url and --json go before the command or after it. --json prints one JSON
object per line: one for a command about one key, one per key, event or period for lists.
"""

EPILOG = """\
examples:
  keystile init
  keystile create --owner acme --name "ci deploy" --scope items:read --expires-in 90d
  keystile create --owner acme --name ci --rate-limit 10/second --quota 1000 --quota-refill 1d
  keystile list --owner acme
  keystile list --all
  keystile update KEY_ID --owner acme --scope items:read --ip-allow 10.0.0.0/8
  keystile update KEY_ID --owner acme --rate-limit 100/minute
  keystile disable KEY_ID --owner acme
  keystile enable KEY_ID --owner acme
  keystile events --owner acme --since 7d --json
  keystile rotate KEY_ID --owner acme --grace 1h
  keystile revoke KEY_ID --owner acme
  keystile reap --unused-for 90d --dry-run
  keystile import drf-api-key --source-url sqlite:///db.sqlite3 --owner-from name
  keystile import csv --file keys.csv --dry-run
  keystile usage KEY_ID --owner acme --since 7d --by hour
  keystile usage --owner acme --since 1d --top 10
  keystile webhooks add https://example.com/hooks/keystile --event key.revoked
  keystile webhooks deliveries --json
  keystile demo
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked (reading the
    installed distributions' metadata costs more than the rest of ``--help``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show program's version number and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        import importlib.metadata

        try:
            version = importlib.metadata.version("keystile")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        sys.stdout.write(f"keystile {version}\n")
        parser.exit()


def _commands() -> list[Command]:
    """Every command, in ``HELP_ORDER`` (a command missing from it fails here, loudly)."""
    found = [
        *maintenance.COMMANDS,
        *keys.COMMANDS,
        *owners.COMMANDS,
        *importing.COMMANDS,
        *usage.COMMANDS,
        *webhooks.COMMANDS,
        *demo.COMMANDS,
    ]
    return sorted(found, key=lambda command: HELP_ORDER.index(command.name))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keystile",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options(on_command=False, parser_class=_Parser)],
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    shared = [global_options(on_command=True, parser_class=_Parser)]
    for command in _commands():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            epilog=f"example:\n  {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=shared,
        )
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, where a failure is not ours
    except BrokenPipeError:
        _silence_closed_output()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return int(exc.code or 0)
    try:
        code: int = args.handler(args)
        return code
    except BrokenPipeError:
        raise
    except (KeystileError, CommandError, ValueError, OSError) as exc:
        err(f"keystile: error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def _silence_closed_output() -> None:
    """The reader went away (``keystile list | head -1``): point stdout, and stderr if its
    reader is gone too, at devnull, so that the interpreter's last flush cannot fail and
    print "Exception ignored" (the recipe in the Python docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
