"""The SQLite store's owner limits: set in one transaction that copies them onto every
key of the owner and logs each key as changed, so other processes evict them."""

from __future__ import annotations

import sqlite3

from ..records import KeyEvent, OwnerLimits
from .connection import Connection
from .events import log_events
from .schema import SQL, SQLITE, transaction
from .watch import log_changes

__all__ = ["Owners"]


class Owners(Connection):
    """The owner-limits part of ``SQLiteKeyStore``."""

    async def get_owner_limits(self, owner: str) -> OwnerLimits | None:
        row = await self._run(lambda c: c.execute(SQL.get_owner_limits, (owner,)).fetchone())
        return SQL.owner_limits(row) if row is not None else None

    async def _put_owner_limits(
        self, owner: str, limits: OwnerLimits | None, event: KeyEvent
    ) -> list[str] | None:
        def put(conn: sqlite3.Connection) -> list[str] | None:
            with transaction(conn):
                if limits is not None:
                    conn.execute(SQL.put_owner_limits, SQL.owner_values(limits))
                elif not conn.execute(SQL.delete_owner_limits, (owner,)).rowcount:
                    return None
                conn.execute(SQL.share_owner_limits, (SQLITE.encode("owner", limits), owner))
                ids = [row[0] for row in conn.execute(SQL.owner_keys, (owner,))]
                log_changes(conn, ids, event.at)
                log_events(conn, [event])
                return ids

        return await self._run(put)
