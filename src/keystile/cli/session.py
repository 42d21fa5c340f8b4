"""The key database and the ``KeyManager`` a command runs on.

The one module of the command that imports the manager, the stores and anyio at its top
(the others import what they need inside the function that needs it); it is loaded when
a command runs (``command.on_keys``), never for ``--help``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from pathlib import Path

import anyio

from ..database_url import DATABASE_URL_ENV, resolve_database_url
from ..manager import KeyManager
from ..stores import SQLiteKeyStore, store_from_url
from ..stores.protocol import KeyStore
from .work import CommandError, Work

__all__ = ["MAX_LIFETIME_ENV", "default_actor", "require_database", "run_on_keys"]


def default_actor() -> str:
    """``cli:<user>@<host>``: who the audit log names when ``--actor`` is not given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    actor = f"cli:{user}@{socket.gethostname()}"[:255]
    return actor if actor.isprintable() else "cli"


def require_database(store: KeyStore, url: str) -> None:
    """Refuse to run on a SQLite file that does not exist (opening it would create it)."""
    if not isinstance(store, SQLiteKeyStore) or store.path == ":memory:":
        return
    path = Path(store.path)
    if path.exists():
        return
    where = "" if path.is_absolute() else f" (no file {path.resolve()})"
    raise CommandError(
        f"no key database at {url}{where}: run 'keystile init' to create it, "
        f"or pass --database-url / set {DATABASE_URL_ENV} to use another"
    )


def run_on_keys(args: argparse.Namespace, work: Work, *, creates_database: bool) -> int:
    """Open the database ``--database-url`` (or the environment, or the default) names,
    run ``work`` with a manager on it, close it; exit code 0."""
    url = resolve_database_url(args.database_url)
    store = store_from_url(url)
    if not creates_database:
        require_database(store, url)
    anyio.run(_with_manager, store, args, work)
    return 0


#: The environment variable holding the lifetime policy of every key the command mints
#: or changes (``366d``): ``KeyManager(max_lifetime=...)``.
MAX_LIFETIME_ENV = "KEYSTILE_MAX_LIFETIME"


async def _with_manager(store: KeyStore, args: argparse.Namespace, work: Work) -> None:
    max_lifetime = os.environ.get(MAX_LIFETIME_ENV) or None
    manager = KeyManager(store, actor=default_actor(), max_lifetime=max_lifetime)
    await manager.open()
    try:
        if getattr(args, "actor", None) is not None:
            manager.actor = args.actor
        await work(args, manager)
    finally:
        await manager.close()
