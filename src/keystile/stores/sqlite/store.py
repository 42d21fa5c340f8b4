"""``SQLiteKeyStore``, put together from its parts."""

from __future__ import annotations

from .events import Events
from .hooks import Hooks
from .keys import Keys
from .owners import Owners
from .usage import Usage
from .watch import Watch

__all__ = ["SQLiteKeyStore"]


class SQLiteKeyStore(Keys, Events, Owners, Usage, Watch, Hooks):
    """``sqlite:///path``: the embedded default, stdlib ``sqlite3`` run off the event loop.

    One connection per store, used by one worker thread at a time (a lock), in WAL mode
    so other processes (the CLI) can read and write while the app runs. Every lifecycle
    change is one ``BEGIN IMMEDIATE`` transaction, which also appends to
    ``keystile_changes``; other processes poll that log (one indexed read a second) to
    evict changed keys.

    Its parts, one concern each: ``connection`` (the connection and the worker thread),
    ``schema`` (migrations, how values are stored), ``keys``, ``events``, ``owners``
    (owner limits), ``usage``, ``watch`` (the change log), ``hooks`` (webhooks and their
    outbox)."""
