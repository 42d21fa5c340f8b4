"""The Postgres store's owner limits: set in one transaction that copies them onto every
key of the owner and queues a NOTIFY for each, so other processes evict them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..records import KeyEvent, OwnerLimits
from .connection import Connection, transaction_lock
from .events import log_events
from .schema import POSTGRES
from .watch import notify

__all__ = ["Owners", "lock_owner_limits"]


async def lock_owner_limits(conn: Any, schema: str, owners: Iterable[str], *, shared: bool) -> None:
    """Hold, until the transaction ends, the lock between an owner's limits and its new keys.

    A new key copies its owner's limits in its own transaction, and setting them copies
    them onto the keys there are: under READ COMMITTED, a key inserted while the limits
    are set would see neither. New keys take the lock shared (they do not wait for each
    other), setting the limits takes it alone. Each transaction takes it first, before
    any row lock, so the two never wait on each other in a circle."""
    for owner in sorted(set(owners)):
        await transaction_lock(conn, schema, f"owner-limits\x1f{owner}", shared=shared)


class Owners(Connection):
    """The owner-limits part of ``PostgresKeyStore``."""

    async def get_owner_limits(self, owner: str) -> OwnerLimits | None:
        async def get(conn: Any) -> OwnerLimits | None:
            row = await conn.fetchrow(self._sql.get_owner_limits, owner)
            return self._sql.owner_limits(row) if row is not None else None

        return await self._idempotent("get_owner_limits", get)

    async def _put_owner_limits(
        self, owner: str, limits: OwnerLimits | None, event: KeyEvent
    ) -> list[str] | None:
        sql = self._sql
        async with self._connection("set_owner_limits") as conn, conn.transaction():
            await lock_owner_limits(conn, self.schema, [owner], shared=False)
            # The owner's key rows before its owner row, as a usage flush locks them.
            await conn.execute(sql.owner_keys + " ORDER BY id FOR UPDATE", owner)
            if limits is not None:
                await conn.execute(sql.put_owner_limits, *sql.owner_values(limits))
            elif await conn.execute(sql.delete_owner_limits, owner) == "DELETE 0":
                return None
            await conn.execute(sql.share_owner_limits, POSTGRES.encode("owner", limits), owner)
            ids = [row["id"] for row in await conn.fetch(sql.owner_keys, owner)]
            await notify(conn, self.channel, ids)
            await log_events(conn, sql, [event])
        return ids
