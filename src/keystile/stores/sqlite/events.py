"""The SQLite store's audit log: appended to inside each change's transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from ..calls import EventQuery
from ..records import KeyEvent
from ..rules import SYSTEM_ACTOR, pruned_event
from .connection import Connection
from .hooks import queue_deliveries
from .schema import SQL, SQLITE, transaction

__all__ = ["Events", "log_events"]


def log_events(conn: sqlite3.Connection, events: Sequence[KeyEvent]) -> None:
    """Append ``events`` inside the caller's transaction: they commit with the change."""
    conn.executemany(SQL.insert_event, [SQLITE.event_values(e) for e in events])
    queue_deliveries(conn, events)


class Events(Connection):
    """The audit-log part of ``SQLiteKeyStore``."""

    async def _list_events(self, query: EventQuery) -> list[KeyEvent]:
        sql, params = SQL.select_events(query)
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [SQLITE.event(row) for row in reversed(rows)]

    async def record_event(self, event: KeyEvent) -> None:
        def record(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                log_events(conn, [event])

        await self._run(record)

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                pruned: int = conn.execute(SQL.prune_events, (before.timestamp(),)).rowcount
                log_events(conn, [pruned_event(before, pruned, actor)])
                return pruned

        return await self._run(prune)
