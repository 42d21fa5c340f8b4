"""The Postgres store's keys: reads, and each lifecycle change as one transaction that
also queues its NOTIFY and writes its audit events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..calls import Change, Importing, Insertion, Reaping, Rotation
from ..records import KeyEvent, KeyRecord, utcnow
from ..rules import rehashed_event
from ..sql import COLUMNS
from .connection import Connection, transaction_lock
from .events import log_events
from .owners import lock_owner_limits
from .schema import POSTGRES
from .watch import notify

__all__ = ["Keys"]


def _records(rows: Sequence[Any]) -> list[KeyRecord]:
    return [POSTGRES.record(row) for row in rows]


class Keys(Connection):
    """The keys part of ``PostgresKeyStore``."""

    async def _fetch(self, action: str, sql: str, *args: Any) -> list[KeyRecord]:
        """The keys ``sql`` reads, on the reader (``connection.py``), retried on a lost
        connection."""

        async def fetch(conn: Any) -> list[KeyRecord]:
            return _records(await conn.fetch(sql, *args))

        return await self._read(action, fetch)

    async def get(self, key_id: str) -> KeyRecord | None:
        self._read_unheard |= not self._listening
        found = await self._fetch("get", self._sql.get, key_id)
        return found[0] if found else None

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        ids = list(dict.fromkeys(key_ids))
        if not ids:
            return {}
        self._read_unheard |= not self._listening
        sql = f"SELECT {COLUMNS} FROM {self._sql.keys} WHERE id = ANY($1::text[])"  # noqa: S608
        return {r.id: r for r in await self._fetch("get_many", sql, ids)}

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None:
        found = await self._fetch("get_owned", self._sql.get_owned, key_id, owner)
        return found[0] if found else None

    async def list_keys(self, owner: str) -> list[KeyRecord]:
        return await self._fetch("list_keys", self._sql.list_keys, owner)

    async def list_all(self) -> list[KeyRecord]:
        return await self._fetch("list_all", self._sql.list_all)

    async def update_hash(
        self, key_id: str, secret_hash: str, *, replacing: str | None = None
    ) -> None:
        if replacing is None:

            async def update(conn: Any) -> None:
                await conn.execute(self._sql.set_hash, secret_hash, key_id)

            await self._idempotent("update_hash", update)
            return
        sql = self._sql
        async with self._connection("update_hash") as conn, conn.transaction():
            owner = await conn.fetchval(sql.replace_hash, secret_hash, key_id, replacing)
            event = owner is not None and rehashed_event(key_id, owner, replacing, utcnow())
            if event:
                await log_events(conn, sql, [event])

    async def _import(self, importing: Importing) -> list[str]:
        sql = self._sql
        async with self._connection("import_keys") as conn, conn.transaction():
            owners = [record.owner for record in importing.records]
            await lock_owner_limits(conn, self.schema, owners, shared=True)
            inserted = [
                record
                for record in importing.records
                if await conn.fetchval(sql.insert_new_key, *POSTGRES.key_values(record))
            ]
            for record in inserted:
                await conn.execute(sql.adopt_owner_limits, record.id, record.owner)
            await log_events(conn, sql, importing.events(inserted, utcnow()))
        return [record.id for record in inserted]

    async def _lock_name(self, conn: Any, owner: str, name: str) -> None:
        """Serialise, until the transaction ends, every change that could make a key of
        ``owner`` take ``name``: a partial unique index cannot express "holds its name",
        which depends on now() (an expired, unrevoked key holds none)."""
        await transaction_lock(conn, self.schema, f"{owner}\x1f{name}")

    async def _insert(self, insertion: Insertion) -> list[str]:
        record = insertion.record
        sql = self._sql
        async with self._connection("insert") as conn, conn.transaction():
            await lock_owner_limits(conn, self.schema, [record.owner], shared=True)
            if insertion.max_keys is not None:
                # Every insert with a cap on the owner's keys, whatever their names, waits
                # here for the one before it: the count below is then the committed one.
                await self._lock_name(conn, record.owner, "")
            await self._lock_name(conn, record.owner, record.name)
            now = utcnow()
            holders = await conn.fetch(sql.name_holders, record.owner, record.name, now)
            clash: list[str] = [row["id"] for row in holders]
            insertion.check(clash)
            if insertion.max_keys is not None:
                live = await conn.fetchval(sql.live_count, record.owner, now)
                insertion.check_room(live, clash)
            if clash:
                await conn.execute(
                    f"UPDATE {sql.keys} SET revoked_at = $1, replaced_by = $2"  # noqa: S608
                    " WHERE id = ANY($3::text[])",
                    now,
                    record.id,
                    clash,
                )
                await notify(conn, self.channel, clash)
            inserted = insertion.new_key(clash)
            await conn.execute(sql.insert_key, *POSTGRES.key_values(inserted))
            await conn.execute(sql.adopt_owner_limits, inserted.id, inserted.owner)
            await log_events(conn, sql, insertion.events(inserted, clash, now))
        return clash

    async def _revoke(self, event: KeyEvent) -> bool:
        async with self._connection("revoke") as conn, conn.transaction():
            revoked = await conn.fetchval(
                self._sql.revoke + " RETURNING id", event.at, event.key_id, event.owner
            )
            if revoked is not None:
                await notify(conn, self.channel, [event.key_id])
                await log_events(conn, self._sql, [event])
        return revoked is not None

    async def _rotate(self, rotation: Rotation) -> KeyRecord | None:
        key_id, successor = rotation.key_id, rotation.new_key()
        async with self._connection("rotate") as conn, conn.transaction():
            await lock_owner_limits(conn, self.schema, [rotation.owner], shared=True)
            # A concurrent rotation of the same key waits for this row lock, then READ
            # COMMITTED re-checks the WHERE on the committed row: replaced_by is set by
            # then, so it updates nothing and only one successor is ever inserted.
            row = await conn.fetchrow(
                f"{self._sql.rotate} RETURNING {COLUMNS}",
                successor.id,
                rotation.grace_until,
                key_id,
                rotation.owner,
                utcnow(),
            )
            if row is None:
                return None
            await conn.execute(self._sql.insert_key, *POSTGRES.key_values(successor))
            await conn.execute(self._sql.adopt_owner_limits, successor.id, successor.owner)
            await notify(conn, self.channel, [key_id])
            old = POSTGRES.record(row)
            await log_events(conn, self._sql, rotation.events(old, utcnow()))
        return old

    async def _reap(self, reaping: Reaping) -> list[KeyRecord]:
        # FOR UPDATE makes a key revoked concurrently drop out of the result (READ
        # COMMITTED re-checks the WHERE clause on locked rows) instead of being revoked
        # twice and reported as reaped.
        lock = "" if reaping.dry_run else " FOR UPDATE"
        async with self._connection("reap") as conn, conn.transaction():
            stale = _records(
                await conn.fetch(
                    self._sql.stale + lock,
                    reaping.include_disabled,
                    reaping.unused_since,
                    reaping.at,
                )
            )
            if not reaping.dry_run and stale:
                ids = [r.id for r in stale]
                await conn.execute(
                    f"UPDATE {self._sql.keys} SET revoked_at = $1"  # noqa: S608
                    " WHERE id = ANY($2::text[])",
                    reaping.at,
                    ids,
                )
                await notify(conn, self.channel, ids)
                await log_events(conn, self._sql, reaping.events(stale))
        return stale

    async def _update(self, change: Change) -> KeyRecord | None:
        key_id, owner, fields = change.key_id, change.owner, list(change.fields)
        sql = self._sql
        async with self._connection("update") as conn, conn.transaction():
            if change.names_matter:
                # The name the key will hold: lock it as insert does, so a concurrent
                # insert or update of that (owner, name) waits for this decision.
                name = change.fields.get("name") or await conn.fetchval(
                    f"SELECT name FROM {sql.keys} WHERE id = $1 AND owner = $2",  # noqa: S608
                    key_id,
                    owner,
                )
                if name is not None:
                    await self._lock_name(conn, owner, name)
            # A concurrent revoke holds the row: this waits for it, then READ COMMITTED
            # re-checks revoked_at on the committed row and updates nothing.
            row = await conn.fetchrow(
                f"{sql.update_key(fields)} RETURNING {COLUMNS}",
                *(POSTGRES.field(name, change.fields[name]) for name in fields),
                key_id,
                owner,
            )
            if row is None:
                current = await conn.fetchrow(sql.get_owned, key_id, owner)
                if current is not None and current["revoked_at"] is not None:
                    raise change.revoked()
                return None
            updated = POSTGRES.record(row)
            if change.names_matter and updated.holds_name(change.at):
                holder = sql.other_holder, owner, updated.name, key_id, change.at
                if await conn.fetchval(*holder) is not None:
                    raise change.duplicate(updated.name)
            await notify(conn, self.channel, [key_id])
            await log_events(conn, sql, [change.event()])
        return updated
