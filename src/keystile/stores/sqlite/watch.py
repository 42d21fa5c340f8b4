"""How SQLite stores in other processes hear of a change: each change's transaction
appends the changed key ids to ``keystile_changes``, and ``watch`` polls that log (one
indexed read per interval) for rows after the last one it saw."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta

import anyio

from ...errors import StoreError
from .connection import Connection

__all__ = ["CHANGE_LOG_RETENTION", "Watch", "log_changes"]

#: Change-log rows older than this are pruned.
CHANGE_LOG_RETENTION = timedelta(days=1)


def log_changes(conn: sqlite3.Connection, key_ids: Sequence[str], at: datetime) -> None:
    """Append ``key_ids`` inside the caller's transaction, pruning old rows."""
    conn.execute(
        "DELETE FROM keystile_changes WHERE at < ?", ((at - CHANGE_LOG_RETENTION).timestamp(),)
    )
    conn.executemany(
        "INSERT INTO keystile_changes (key_id, at) VALUES (?, ?)",
        [(k, at.timestamp()) for k in key_ids],
    )


class Watch(Connection):
    """The change-log watcher of ``SQLiteKeyStore``."""

    async def watch(self) -> None:
        """Poll the change log for changes other processes made since this store
        connected (keys may have been verified before the watch began); evict them."""

        def since(conn: sqlite3.Connection, seq: int) -> list[tuple[int, str]]:
            rows = conn.execute(
                "SELECT seq, key_id FROM keystile_changes WHERE seq > ? ORDER BY seq", (seq,)
            )
            return [(row[0], row[1]) for row in rows]

        seen: int = await self._run(lambda conn: self._seq_at_open)
        while True:
            await anyio.sleep(self.poll_interval)
            try:
                changes = await self._run(functools.partial(since, seq=seen))
            except StoreError:
                continue
            for seq, key_id in changes:
                seen = seq
                self._bus.publish(key_id)
