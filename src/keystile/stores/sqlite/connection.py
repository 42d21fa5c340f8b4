"""The SQLite store's one connection: opened (and migrated) on first use, used by one
worker thread at a time, so the event loop never waits on the disk."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from ...errors import StoreError
from ..bus import LocalChangeBus
from ..common import CommonStore
from .schema import migrate

__all__ = ["DEFAULT_POLL_INTERVAL", "Connection", "select_in"]

T = TypeVar("T")

#: Ids per ``IN (...)`` list: SQLite limits the parameters of one statement.
_CHUNK = 500

#: Seconds a statement waits for another connection's lock before "database is locked".
BUSY_TIMEOUT = 10.0

#: How often ``watch`` polls the change log for changes made by other processes.
DEFAULT_POLL_INTERVAL = 1.0


def select_in(conn: sqlite3.Connection, sql: str, ids: Sequence[str]) -> Iterator[sqlite3.Row]:
    """The rows of ``sql`` (a query whose ``{marks}`` is an ``IN`` list) for ``ids``."""
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        yield from conn.execute(sql.format(marks=",".join("?" * len(chunk))), chunk)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. Two connections opening a new database at once can see the switch
    refused as "locked" at once, without SQLite's busy handler: wait for it as for a lock."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


class Connection(CommonStore):
    """The plumbing every part of ``SQLiteKeyStore`` runs its statements through."""

    def __init__(self, path: str | Path, *, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.path = str(path)
        self.poll_interval = poll_interval
        in_memory = self.path == ":memory:"
        resolved = self.path if in_memory else str(Path(self.path).resolve())
        self.display_url = f"sqlite:///{self.path}"
        self._bus = LocalChangeBus.for_identity(
            f"sqlite:{resolved}#{id(self)}" if in_memory else f"sqlite:{resolved}"
        )
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        #: The change log's position when this store connected: ``watch`` relays every
        #: change after it, so none made between the first read and the watch is missed.
        self._seq_at_open = 0

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._create_private()
            try:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            migrate(conn)
            self._seq_at_open = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM keystile_changes"
            ).fetchone()[0]
            self._conn = conn
        return self._conn

    def _create_private(self) -> None:
        """Create a missing database file readable by its owner only (0600): it holds key
        hashes and owners. SQLite gives the -wal and -shm files the mode of the database;
        an existing file keeps its mode."""
        if self.path in ("", ":memory:"):
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StoreError(f"cannot create SQLite database {self.path!r}: {exc}") from exc
        os.close(fd)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on the connection, in a worker thread; SQLite errors as ``StoreError``."""

        def call() -> T:
            with self._lock:
                try:
                    return fn(self._connect())
                except sqlite3.Error as exc:
                    raise StoreError(f"SQLite error: {exc}") from exc

        return await anyio.to_thread.run_sync(call)

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await anyio.to_thread.run_sync(close)
