"""The SQLite store's webhooks and outbox (``stores.hooks_sql``): deliveries queued in the
transaction of their audit event, claimed under the database's write lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from ..hooks import Attempt, ClaimedDelivery, Delivery, Webhook, new_deliveries
from ..hooks_sql import HookStatements, ids_and_names
from ..records import KeyEvent, KeyRecord, utcnow
from .connection import Connection, select_in
from .schema import SQLITE, transaction

__all__ = ["HOOKS", "Hooks", "queue_deliveries"]

T = TypeVar("T")

HOOKS = HookStatements(SQLITE)


def queue_deliveries(conn: sqlite3.Connection, events: Sequence[KeyEvent]) -> None:
    """The deliveries ``events`` make, inside the caller's transaction."""
    webhooks = [HOOKS.webhook(row) for row in conn.execute(HOOKS.webhooks)]
    if not webhooks:
        return
    key_ids = sorted({e.key_id for e in events if e.key_id})
    sql = f"SELECT id, name FROM {HOOKS.keys} WHERE id IN ({{marks}})"  # noqa: S608
    names = ids_and_names(list(select_in(conn, sql, key_ids)))
    made = new_deliveries(events, webhooks, names, utcnow())
    conn.executemany(HOOKS.insert_delivery, [HOOKS.delivery_values(d) for d in made])


class Hooks(Connection):
    """The webhook part of ``SQLiteKeyStore``."""

    async def add_webhook(self, webhook: Webhook) -> None:
        await self._write(
            lambda conn: conn.execute(HOOKS.insert_webhook, HOOKS.webhook_values(webhook))
        )

    async def list_webhooks(self) -> list[Webhook]:
        rows = await self._run(lambda conn: conn.execute(HOOKS.webhooks).fetchall())
        return [HOOKS.webhook(row) for row in rows]

    async def remove_webhook(self, webhook_id: str) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            conn.execute(HOOKS.abandon, (webhook_id,))
            return bool(conn.execute(HOOKS.delete_webhook, (webhook_id,)).rowcount)

        return await self._write(remove)

    async def enqueue_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        rows = [HOOKS.delivery_values(d) for d in deliveries]
        await self._write(lambda conn: conn.executemany(HOOKS.insert_delivery, rows))

    async def claim_deliveries(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedDelivery]:
        def claim(conn: sqlite3.Connection) -> list[ClaimedDelivery]:
            due = conn.execute(HOOKS.due, (now.timestamp(), limit)).fetchall()
            conn.executemany(HOOKS.claim, [(lease_until.timestamp(), row["id"]) for row in due])
            return [HOOKS.claimed(row) for row in due]

        return await self._write(claim)

    async def finish_delivery(self, attempt: Attempt, next_attempt_at: datetime | None) -> None:
        def finish(conn: sqlite3.Connection) -> None:
            conn.execute(HOOKS.finish, HOOKS.finish_values(attempt, next_attempt_at))
            conn.execute(HOOKS.insert_attempt, HOOKS.attempt_values(attempt))

        await self._write(finish)

    async def list_deliveries(
        self, *, webhook_id: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        sql, params = HOOKS.deliveries, list[object]([limit])
        if webhook_id is not None:
            sql, params = HOOKS.webhook_deliveries, [webhook_id, limit]
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [HOOKS.delivery(row) for row in reversed(rows)]

    async def list_attempts(self, *, delivery_id: str | None = None) -> list[Attempt]:
        sql, params = HOOKS.attempts, []
        if delivery_id is not None:
            sql, params = HOOKS.delivery_attempts, [delivery_id]
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [HOOKS.attempt(row) for row in rows]

    async def keys_expiring(self, *, after: datetime, until: datetime) -> list[KeyRecord]:
        params = (after.timestamp(), until.timestamp())
        rows = await self._run(lambda conn: conn.execute(HOOKS.expiring, params).fetchall())
        return [SQLITE.record(row) for row in rows]

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def write(conn: sqlite3.Connection) -> T:
            with transaction(conn):
                return fn(conn)

        return await self._run(write)
