"""The Postgres store's audit log: written inside each change's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..calls import EventQuery
from ..records import KeyEvent
from ..rules import SYSTEM_ACTOR, pruned_event
from ..sql import Statements
from .connection import Connection
from .hooks import queue_deliveries
from .schema import POSTGRES

__all__ = ["Events", "log_events"]


async def log_events(conn: Any, sql: Statements, events: Sequence[KeyEvent]) -> None:
    """Append ``events`` inside the caller's transaction, so they commit (or roll back)
    with the change they record."""
    if events:
        await conn.executemany(sql.insert_event, [POSTGRES.event_values(e) for e in events])
        await queue_deliveries(conn, sql, events)


class Events(Connection):
    """The audit-log part of ``PostgresKeyStore``."""

    async def _list_events(self, query: EventQuery) -> list[KeyEvent]:
        sql, params = self._sql.select_events(query)

        async def list_events(conn: Any) -> list[KeyEvent]:
            return [POSTGRES.event(row) for row in reversed(await conn.fetch(sql, *params))]

        return await self._idempotent("list_events", list_events)

    async def record_event(self, event: KeyEvent) -> None:
        # Not retried: a retry after a lost commit acknowledgement would record it twice.
        async with self._connection("record_event") as conn, conn.transaction():
            await log_events(conn, self._sql, [event])

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        # Not retried: a retry after a lost commit acknowledgement would record two prunes.
        async with self._connection("prune_events") as conn, conn.transaction():
            status: str = await conn.execute(self._sql.prune_events, before)
            pruned = int(status.rsplit(" ", 1)[-1])
            await log_events(conn, self._sql, [pruned_event(before, pruned, actor)])
        return pruned
