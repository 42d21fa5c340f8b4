"""``keystile demo``: an example app on 127.0.0.1 with a fresh key, and the curl lines to
try it (the app itself is ``keystile.demo``)."""

from __future__ import annotations

import argparse
import os

from ..database_url import DATABASE_URL_ENV, resolve_database_url
from . import arguments as types
from .command import Command, CommandError

__all__ = ["COMMANDS"]


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=types.port, default=8000)
    p.add_argument(
        "--self-test",
        action="store_true",
        help="send the curl requests itself, print the answers and exit (0 if as expected)",
    )


def _demo(args: argparse.Namespace) -> int:
    """Without ``--database-url`` or the environment, the demo uses a database of its own
    (a temporary file), never the default ``keystile.db`` of the current directory."""
    if args.json:
        raise CommandError("keystile demo prints no JSON: it serves an app and prints curl lines")
    from ..demo import run_demo

    explicit = args.database_url or os.environ.get(DATABASE_URL_ENV)
    url = resolve_database_url(args.database_url) if explicit else None
    return run_demo(url, host=args.host, port=args.port, self_test=args.self_test)


COMMANDS = (
    Command(
        "demo",
        "serve an example app on 127.0.0.1 with a fresh key and print curl lines",
        "keystile demo --port 8000",
        _demo_arguments,
        _demo,
    ),
)
