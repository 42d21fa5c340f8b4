"""The SQLite store's keys: reads, and each lifecycle change as one transaction that
also appends to the change log and the audit log."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from ..calls import Change, Importing, Insertion, Reaping, Rotation
from ..records import KeyEvent, KeyRecord, utcnow
from ..rules import rehashed_event
from ..sql import COLUMNS
from .connection import Connection, select_in
from .events import log_events
from .schema import SQL, SQLITE, transaction
from .watch import log_changes

__all__ = ["Keys"]

_GET_MANY = f"SELECT {COLUMNS} FROM keystile_keys WHERE id IN ({{marks}})"  # noqa: S608
_REPLACED = "UPDATE keystile_keys SET revoked_at = ?, replaced_by = ? WHERE id = ?"
_REVOKED = "UPDATE keystile_keys SET revoked_at = ? WHERE id = ?"


def _records(rows: Sequence[sqlite3.Row]) -> list[KeyRecord]:
    return [SQLITE.record(row) for row in rows]


class Keys(Connection):
    """The keys part of ``SQLiteKeyStore``."""

    async def get(self, key_id: str) -> KeyRecord | None:
        row = await self._run(lambda conn: conn.execute(SQL.get, (key_id,)).fetchone())
        return SQLITE.record(row) if row is not None else None

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        ids = list(key_ids)
        rows = await self._run(lambda conn: list(select_in(conn, _GET_MANY, ids)))
        return {row["id"]: SQLITE.record(row) for row in rows}

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None:
        record = await self.get(key_id)
        return record if record is not None and record.owner == owner else None

    async def list_keys(self, owner: str) -> list[KeyRecord]:
        return _records(await self._run(lambda c: c.execute(SQL.list_keys, (owner,)).fetchall()))

    async def list_all(self) -> list[KeyRecord]:
        return _records(await self._run(lambda c: c.execute(SQL.list_all).fetchall()))

    async def update_hash(
        self, key_id: str, secret_hash: str, *, replacing: str | None = None
    ) -> None:
        if replacing is None:
            await self._run(lambda conn: conn.execute(SQL.set_hash, (secret_hash, key_id)))
            return

        def replace(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                row = conn.execute(SQL.replace_hash, (secret_hash, key_id, replacing)).fetchone()
                event = row and rehashed_event(key_id, row[0], replacing, utcnow())
                if event:
                    log_events(conn, [event])

        await self._run(replace)

    async def _import(self, importing: Importing) -> list[str]:
        def insert(conn: sqlite3.Connection) -> list[KeyRecord]:
            with transaction(conn):
                inserted = [
                    record
                    for record in importing.records
                    if conn.execute(SQL.insert_new_key, SQLITE.key_values(record)).fetchone()
                ]
                for record in inserted:
                    conn.execute(SQL.adopt_owner_limits, (record.id, record.owner))
                log_events(conn, importing.events(inserted, utcnow()))
                return inserted

        return [record.id for record in await self._run(insert)]

    async def _insert(self, insertion: Insertion) -> list[str]:
        record = insertion.record

        def insert(conn: sqlite3.Connection) -> list[str]:
            with transaction(conn):
                now = utcnow()
                holders = conn.execute(
                    SQL.name_holders, (record.owner, record.name, now.timestamp())
                )
                clash: list[str] = [row[0] for row in holders]
                insertion.check(clash)
                if insertion.max_keys is not None:
                    (live,) = conn.execute(
                        SQL.live_count, (record.owner, now.timestamp())
                    ).fetchone()
                    insertion.check_room(live, clash)
                conn.executemany(_REPLACED, [(now.timestamp(), record.id, old) for old in clash])
                log_changes(conn, clash, now)
                inserted = insertion.new_key(clash)
                conn.execute(SQL.insert_key, SQLITE.key_values(inserted))
                conn.execute(SQL.adopt_owner_limits, (inserted.id, inserted.owner))
                log_events(conn, insertion.events(inserted, clash, now))
                return clash

        return await self._run(insert)

    async def _revoke(self, event: KeyEvent) -> bool:
        def revoke(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                params = (event.at.timestamp(), event.key_id, event.owner)
                if not conn.execute(SQL.revoke, params).rowcount:
                    return False
                log_changes(conn, [event.key_id], event.at)
                log_events(conn, [event])
                return True

        return await self._run(revoke)

    async def _rotate(self, rotation: Rotation) -> KeyRecord | None:
        key_id, successor = rotation.key_id, rotation.new_key()

        def rotate(conn: sqlite3.Connection) -> KeyRecord | None:
            with transaction(conn):
                now = utcnow()
                grace = rotation.grace_until.timestamp()
                params = (successor.id, grace, key_id, rotation.owner, now.timestamp())
                if not conn.execute(SQL.rotate, params).rowcount:
                    return None
                conn.execute(SQL.insert_key, SQLITE.key_values(successor))
                conn.execute(SQL.adopt_owner_limits, (successor.id, successor.owner))
                log_changes(conn, [key_id], now)
                old = SQLITE.record(conn.execute(SQL.get, (key_id,)).fetchone())
                log_events(conn, rotation.events(old, now))
                return old

        return await self._run(rotate)

    async def _reap(self, reaping: Reaping) -> list[KeyRecord]:
        at = reaping.at.timestamp()
        params = (reaping.include_disabled, reaping.unused_since.timestamp(), at)

        def reap(conn: sqlite3.Connection) -> list[KeyRecord]:
            with transaction(conn):
                stale = _records(conn.execute(SQL.stale, params).fetchall())
                if not reaping.dry_run and stale:
                    conn.executemany(_REVOKED, [(at, r.id) for r in stale])
                    log_changes(conn, [r.id for r in stale], reaping.at)
                    log_events(conn, reaping.events(stale))
                return stale

        return await self._run(reap)

    async def _update(self, change: Change) -> KeyRecord | None:
        key_id, owner, fields = change.key_id, change.owner, list(change.fields)
        values = [SQLITE.field(name, change.fields[name]) for name in fields]

        def update(conn: sqlite3.Connection) -> KeyRecord | None:
            # The write lock comes first: the name check and the write are one critical
            # section, as in insert.
            with transaction(conn):
                conn.execute(SQL.update_key(fields), [*values, key_id, owner])
                row = conn.execute(SQL.get_owned, (key_id, owner)).fetchone()
                if row is None:
                    return None
                updated = SQLITE.record(row)
                if updated.revoked_at is not None:
                    raise change.revoked()
                if change.names_matter and updated.holds_name(change.at):
                    params = (owner, updated.name, key_id, change.at.timestamp())
                    if conn.execute(SQL.other_holder, params).fetchone() is not None:
                        raise change.duplicate(updated.name)
                log_changes(conn, [key_id], change.at)
                log_events(conn, [change.event()])
                return updated

        return await self._run(update)
