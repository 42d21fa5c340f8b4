"""The Postgres store's webhooks and outbox (``stores.hooks_sql``): deliveries queued in
the transaction of their audit event, claimed with ``FOR UPDATE SKIP LOCKED`` so that
each is taken by one process of a fleet."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..hooks import Attempt, ClaimedDelivery, Delivery, Webhook, new_deliveries
from ..hooks_sql import HookStatements, ids_and_names
from ..records import KeyEvent, KeyRecord, utcnow
from ..sql import Statements
from .connection import Connection
from .schema import POSTGRES

__all__ = ["Hooks", "hook_statements", "queue_deliveries"]

_KEYS_TABLE = "keystile_keys"


@functools.lru_cache(maxsize=64)
def _statements(prefix: str) -> HookStatements:
    return HookStatements(POSTGRES, prefix, skip_locked=True)


def hook_statements(sql: Statements) -> HookStatements:
    """The webhook statements on the schema of ``sql``."""
    return _statements(sql.keys.removesuffix(_KEYS_TABLE))


async def queue_deliveries(conn: Any, sql: Statements, events: Sequence[KeyEvent]) -> None:
    """The deliveries ``events`` make, inside the caller's transaction."""
    hooks = hook_statements(sql)
    webhooks = [hooks.webhook(row) for row in await conn.fetch(hooks.webhooks)]
    if not webhooks:
        return
    key_ids = sorted({e.key_id for e in events if e.key_id})
    rows = await conn.fetch(
        f"SELECT id, name FROM {hooks.keys} WHERE id = ANY($1::text[])",  # noqa: S608
        key_ids,
    )
    made = new_deliveries(events, webhooks, ids_and_names(rows), utcnow())
    if made:
        await conn.executemany(hooks.insert_delivery, [hooks.delivery_values(d) for d in made])


class Hooks(Connection):
    """The webhook part of ``PostgresKeyStore``."""

    @property
    def _hooks(self) -> HookStatements:
        return hook_statements(self._sql)

    async def add_webhook(self, webhook: Webhook) -> None:
        async with self._connection("add_webhook") as conn:
            await conn.execute(self._hooks.insert_webhook, *self._hooks.webhook_values(webhook))

    async def list_webhooks(self) -> list[Webhook]:
        async def read(conn: Any) -> list[Webhook]:
            return [self._hooks.webhook(row) for row in await conn.fetch(self._hooks.webhooks)]

        return await self._idempotent("list_webhooks", read)

    async def remove_webhook(self, webhook_id: str) -> bool:
        async with self._connection("remove_webhook") as conn, conn.transaction():
            await conn.execute(self._hooks.abandon, webhook_id)
            status: str = await conn.execute(self._hooks.delete_webhook, webhook_id)
        return status != "DELETE 0"

    async def enqueue_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        rows = [self._hooks.delivery_values(d) for d in deliveries]
        async with self._connection("enqueue_deliveries") as conn:
            await conn.executemany(self._hooks.insert_delivery, rows)

    async def claim_deliveries(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedDelivery]:
        hooks = self._hooks
        async with self._connection("claim_deliveries") as conn, conn.transaction():
            due = await conn.fetch(hooks.due, now, limit)
            await conn.executemany(hooks.claim, [(lease_until, row["id"]) for row in due])
        return [hooks.claimed(row) for row in due]

    async def finish_delivery(self, attempt: Attempt, next_attempt_at: datetime | None) -> None:
        hooks = self._hooks
        async with self._connection("finish_delivery") as conn, conn.transaction():
            await conn.execute(hooks.finish, *hooks.finish_values(attempt, next_attempt_at))
            await conn.execute(hooks.insert_attempt, *hooks.attempt_values(attempt))

    async def list_deliveries(
        self, *, webhook_id: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        hooks = self._hooks

        async def read(conn: Any) -> list[Delivery]:
            if webhook_id is None:
                rows = await conn.fetch(hooks.deliveries, limit)
            else:
                rows = await conn.fetch(hooks.webhook_deliveries, webhook_id, limit)
            return [hooks.delivery(row) for row in reversed(rows)]

        return await self._idempotent("list_deliveries", read)

    async def list_attempts(self, *, delivery_id: str | None = None) -> list[Attempt]:
        hooks = self._hooks

        async def read(conn: Any) -> list[Attempt]:
            if delivery_id is None:
                rows = await conn.fetch(hooks.attempts)
            else:
                rows = await conn.fetch(hooks.delivery_attempts, delivery_id)
            return [hooks.attempt(row) for row in rows]

        return await self._idempotent("list_attempts", read)

    async def keys_expiring(self, *, after: datetime, until: datetime) -> list[KeyRecord]:
        hooks = self._hooks

        async def read(conn: Any) -> list[KeyRecord]:
            return [POSTGRES.record(row) for row in await conn.fetch(hooks.expiring, after, until)]

        return await self._idempotent("keys_expiring", read)
