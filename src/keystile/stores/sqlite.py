"""``sqlite:///path``: the embedded default, stdlib ``sqlite3`` run off the event loop.

One connection per store, used by one worker thread at a time (a lock), in WAL mode so
other processes (the CLI) can read and write while the app runs. Every lifecycle change
is one ``BEGIN IMMEDIATE`` transaction, which also appends to ``keystile_changes``; other
processes poll that log (one indexed read a second) to evict changed keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ..errors import DuplicateKeyName, StoreError
from .base import (
    SYSTEM_ACTOR,
    ChangeListener,
    KeyEvent,
    KeyRecord,
    LocalChangeBus,
    QuotaState,
    UsageBucket,
    UsageCounts,
    UsageTotal,
    check_updatable,
    created_detail,
    event_detail,
    pruned_detail,
    reaped_detail,
    revoked_error,
    rotated_detail,
    update_action,
    utcnow,
)

__all__ = ["SQLiteKeyStore"]

T = TypeVar("T")

#: How often ``watch`` polls the change log for changes made by other processes.
DEFAULT_POLL_INTERVAL = 1.0
#: Change-log rows older than this are pruned.
CHANGE_LOG_RETENTION = timedelta(days=1)

_MIGRATIONS: list[str] = [
    """
    CREATE TABLE keystile_keys (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        expires_at REAL,
        last_used_at REAL,
        revoked_at REAL,
        replaces TEXT,
        replaced_by TEXT
    );
    CREATE INDEX keystile_keys_owner_name ON keystile_keys (owner, name);
    CREATE TABLE keystile_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE keystile_keys ADD COLUMN rate_limit TEXT;
    ALTER TABLE keystile_keys ADD COLUMN quota INTEGER;
    ALTER TABLE keystile_keys ADD COLUMN quota_remaining INTEGER;
    ALTER TABLE keystile_keys ADD COLUMN quota_refill REAL;
    ALTER TABLE keystile_keys ADD COLUMN quota_reset_at REAL;
    """,
    """
    ALTER TABLE keystile_keys ADD COLUMN disabled_at REAL;
    ALTER TABLE keystile_keys ADD COLUMN ip_allowlist TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE keystile_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        key_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX keystile_events_owner_at ON keystile_events (owner, at);
    CREATE INDEX keystile_events_key_at ON keystile_events (key_id, at);
    CREATE INDEX keystile_events_at ON keystile_events (at);
    """,
    """
    CREATE TABLE keystile_usage (
        key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, minute)
    );
    CREATE INDEX keystile_usage_minute ON keystile_usage (minute);
    """,
]

#: One row per (key, minute), added to by every process's flush.
_USAGE_UPSERT = (
    "INSERT INTO keystile_usage (key_id, minute, requests, rejected) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (key_id, minute) DO UPDATE SET requests = requests + excluded.requests,"
    " rejected = rejected + excluded.rejected"
)
#: Past any minute a store will hold: the open end of a period without ``until``.
_NO_END = 2**62

_COLUMNS = (
    "id, owner, name, prefix, secret_hash, scopes, metadata, created_at, expires_at,"
    " last_used_at, revoked_at, replaces, replaced_by, rate_limit, quota, quota_remaining,"
    " quota_refill, quota_reset_at, disabled_at, ip_allowlist"
)
_EVENT_COLUMNS = "seq, at, key_id, owner, action, actor, detail"

#: How ``update`` writes each field it may change: the column's value for a new value.
_UPDATABLE: dict[str, Callable[[Any], Any]] = {
    "rate_limit": lambda v: v,
    "quota": lambda v: v,
    "quota_remaining": lambda v: v,
    "quota_refill": lambda v: v.total_seconds() if v is not None else None,
    "quota_reset_at": lambda v: _ts(v),
    "name": lambda v: v,
    "scopes": lambda v: json.dumps(list(v)),
    "metadata": lambda v: json.dumps(dict(v)),
    "expires_at": lambda v: _ts(v),
    "ip_allowlist": lambda v: json.dumps(list(v)),
    "disabled_at": lambda v: _ts(v),
}

#: One batched usage write per key: ``last_used_at`` never backwards; a refill due by the
#: use time resets the quota to full (at the period's start); then the uses are taken.
#: Every right-hand side reads the row as it was before this UPDATE.
_REFILL_DUE = (
    "quota IS NOT NULL AND quota_refill > 0 AND quota_reset_at IS NOT NULL"
    " AND :at - quota_reset_at >= quota_refill"
)
_TOUCH_SQL = (
    "UPDATE keystile_keys SET last_used_at = MAX(COALESCE(last_used_at, :at), :at),"  # noqa: S608
    f" quota_reset_at = CASE WHEN {_REFILL_DUE} THEN quota_reset_at"
    " + quota_refill * CAST((:at - quota_reset_at) / quota_refill AS INTEGER)"
    " ELSE quota_reset_at END,"
    " quota_remaining = CASE WHEN quota IS NULL THEN quota_remaining"
    f" WHEN {_REFILL_DUE} THEN MAX(quota - :n, 0)"
    " ELSE MAX(COALESCE(quota_remaining, quota) - :n, 0) END"
    " WHERE id = :id"
)


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value is not None else None


def _record(row: sqlite3.Row) -> KeyRecord:
    created = _dt(row["created_at"])
    assert created is not None
    return KeyRecord(
        id=row["id"],
        owner=row["owner"],
        name=row["name"],
        prefix=row["prefix"],
        secret_hash=row["secret_hash"],
        scopes=tuple(json.loads(row["scopes"])),
        metadata=json.loads(row["metadata"]),
        created_at=created,
        expires_at=_dt(row["expires_at"]),
        last_used_at=_dt(row["last_used_at"]),
        revoked_at=_dt(row["revoked_at"]),
        replaces=row["replaces"],
        replaced_by=row["replaced_by"],
        rate_limit=row["rate_limit"],
        quota=row["quota"],
        quota_remaining=row["quota_remaining"],
        quota_refill=(
            timedelta(seconds=row["quota_refill"]) if row["quota_refill"] is not None else None
        ),
        quota_reset_at=_dt(row["quota_reset_at"]),
        disabled_at=_dt(row["disabled_at"]),
        ip_allowlist=tuple(json.loads(row["ip_allowlist"])),
    )


def _event(row: sqlite3.Row) -> KeyEvent:
    at = _dt(row["at"])
    assert at is not None
    return KeyEvent(
        at=at,
        key_id=row["key_id"],
        owner=row["owner"],
        action=row["action"],
        actor=row["actor"],
        detail=json.loads(row["detail"]),
        id=row["seq"],
    )


def _insert_row(conn: sqlite3.Connection, r: KeyRecord) -> None:
    conn.execute(
        f"INSERT INTO keystile_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
        (
            r.id,
            r.owner,
            r.name,
            r.prefix,
            r.secret_hash,
            json.dumps(list(r.scopes)),
            json.dumps(dict(r.metadata)),
            _ts(r.created_at),
            _ts(r.expires_at),
            _ts(r.last_used_at),
            _ts(r.revoked_at),
            r.replaces,
            r.replaced_by,
            r.rate_limit,
            r.quota,
            r.quota_remaining,
            _UPDATABLE["quota_refill"](r.quota_refill),
            _ts(r.quota_reset_at),
            _ts(r.disabled_at),
            json.dumps(list(r.ip_allowlist)),
        ),
    )


def _log_event(
    conn: sqlite3.Connection,
    at: float,
    key_id: str,
    owner: str,
    action: str,
    actor: str,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append an audit event inside the caller's transaction: it commits with the change."""
    conn.execute(
        "INSERT INTO keystile_events (at, key_id, owner, action, actor, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (at, key_id, owner, action, actor, json.dumps(dict(detail or {}))),
    )


def _log_changes(conn: sqlite3.Connection, key_ids: Sequence[str], at: float) -> None:
    conn.execute(
        "DELETE FROM keystile_changes WHERE at < ?", (at - CHANGE_LOG_RETENTION.total_seconds(),)
    )
    conn.executemany(
        "INSERT INTO keystile_changes (key_id, at) VALUES (?, ?)", [(k, at) for k in key_ids]
    )


class SQLiteKeyStore:
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

    # -- plumbing -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._create_private()
            try:
                conn = sqlite3.connect(
                    self.path, timeout=10.0, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._migrate(conn)
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

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS keystile_migrations"
                " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM keystile_migrations")}
            for version, script in enumerate(_MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO keystile_migrations VALUES (?, ?)",
                    (version, utcnow().timestamp()),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                try:
                    return fn(self._connect())
                except sqlite3.Error as exc:
                    raise StoreError(f"SQLite error: {exc}") from exc

        return await anyio.to_thread.run_sync(call)

    # -- the protocol ---------------------------------------------------------------

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await anyio.to_thread.run_sync(close)

    async def get(self, key_id: str) -> KeyRecord | None:
        def get(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM keystile_keys WHERE id = ?",  # noqa: S608
                (key_id,),
            ).fetchone()
            return _record(row) if row is not None else None

        return await self._run(get)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        ids = list(key_ids)

        def get_many(conn: sqlite3.Connection) -> dict[str, KeyRecord]:
            found: dict[str, KeyRecord] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(
                    f"SELECT {_COLUMNS} FROM keystile_keys WHERE id IN ({marks})",  # noqa: S608
                    chunk,
                ):
                    found[row["id"]] = _record(row)
            return found

        return await self._run(get_many)

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None:
        record = await self.get(key_id)
        return record if record is not None and record.owner == owner else None

    async def list_keys(self, owner: str) -> list[KeyRecord]:
        def list_keys(conn: sqlite3.Connection) -> list[KeyRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM keystile_keys WHERE owner = ?"  # noqa: S608
                " ORDER BY created_at, id",
                (owner,),
            )
            return [_record(row) for row in rows]

        return await self._run(list_keys)

    async def list_all(self) -> list[KeyRecord]:
        def list_all(conn: sqlite3.Connection) -> list[KeyRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM keystile_keys ORDER BY owner, created_at, id"  # noqa: S608
            )
            return [_record(row) for row in rows]

        return await self._run(list_all)

    async def insert(
        self, record: KeyRecord, *, replace: bool = False, actor: str = SYSTEM_ACTOR
    ) -> list[str]:
        def insert(conn: sqlite3.Connection) -> list[str]:
            with self._transaction(conn):
                now = utcnow().timestamp()
                clash = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM keystile_keys WHERE owner = ? AND name = ?"
                        " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
                        " ORDER BY created_at",
                        (record.owner, record.name, now),
                    )
                ]
                if clash and not replace:
                    raise DuplicateKeyName(
                        f"owner {record.owner!r} already has an active key named"
                        f" {record.name!r}; pass replace=True (--replace) to revoke it"
                        " and mint a new one"
                    )
                conn.executemany(
                    "UPDATE keystile_keys SET revoked_at = ?, replaced_by = ? WHERE id = ?",
                    [(now, record.id, old) for old in clash],
                )
                _log_changes(conn, clash, now)
                for old in clash:
                    detail = {"replaced_by": record.id}
                    _log_event(conn, now, old, record.owner, "replaced", actor, detail)
                replaces = clash[-1] if clash else record.replaces
                _insert_row(conn, _with(record, replaces=replaces))
                detail = created_detail(record, replaces)
                _log_event(conn, now, record.id, record.owner, "created", actor, detail)
                return clash

        revoked = await self._run(insert)
        for key_id in revoked:
            self._bus.publish(key_id)
        return revoked

    async def revoke(
        self,
        key_id: str,
        owner: str,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
        action: str = "revoked",
    ) -> bool:
        def revoke(conn: sqlite3.Connection) -> bool:
            with self._transaction(conn):
                cursor = conn.execute(
                    "UPDATE keystile_keys SET revoked_at = ?"
                    " WHERE id = ? AND owner = ? AND revoked_at IS NULL",
                    (at.timestamp(), key_id, owner),
                )
                if cursor.rowcount:
                    _log_changes(conn, [key_id], at.timestamp())
                    _log_event(conn, at.timestamp(), key_id, owner, action, actor)
                return cursor.rowcount > 0

        revoked = await self._run(revoke)
        if revoked:
            self._bus.publish(key_id)
        return revoked

    async def rotate(
        self,
        key_id: str,
        owner: str,
        successor: KeyRecord,
        *,
        grace_until: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        def rotate(conn: sqlite3.Connection) -> KeyRecord | None:
            with self._transaction(conn):
                now = utcnow().timestamp()
                cursor = conn.execute(
                    "UPDATE keystile_keys SET replaced_by = ?,"
                    " expires_at = MIN(COALESCE(expires_at, ?), ?)"
                    " WHERE id = ? AND owner = ? AND revoked_at IS NULL AND replaced_by IS NULL"
                    " AND disabled_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                    (
                        successor.id,
                        grace_until.timestamp(),
                        grace_until.timestamp(),
                        key_id,
                        owner,
                        now,
                    ),
                )
                if not cursor.rowcount:
                    return None
                _insert_row(conn, _with(successor, replaces=key_id))
                _log_changes(conn, [key_id], now)
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM keystile_keys WHERE id = ?",  # noqa: S608
                    (key_id,),
                ).fetchone()
                old = _record(row)
                detail = rotated_detail(successor.id, old.expires_at)
                _log_event(conn, now, key_id, owner, "rotated", actor, detail)
                detail = created_detail(successor, key_id)
                _log_event(conn, now, successor.id, owner, "created", actor, detail)
                return old

        updated = await self._run(rotate)
        if updated is not None:
            self._bus.publish(key_id)
        return updated

    async def reap(
        self,
        *,
        unused_since: datetime,
        at: datetime,
        dry_run: bool,
        include_disabled: bool = False,
        actor: str = SYSTEM_ACTOR,
    ) -> list[KeyRecord]:
        def reap(conn: sqlite3.Connection) -> list[KeyRecord]:
            with self._transaction(conn):
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM keystile_keys WHERE revoked_at IS NULL"  # noqa: S608
                    " AND (? OR disabled_at IS NULL)"
                    " AND (COALESCE(last_used_at, created_at) < ?"
                    " OR (expires_at IS NOT NULL AND expires_at <= ?))"
                    " ORDER BY created_at, id",
                    (include_disabled, unused_since.timestamp(), at.timestamp()),
                ).fetchall()
                stale = [_record(row) for row in rows]
                if not dry_run and stale:
                    conn.executemany(
                        "UPDATE keystile_keys SET revoked_at = ? WHERE id = ?",
                        [(at.timestamp(), r.id) for r in stale],
                    )
                    _log_changes(conn, [r.id for r in stale], at.timestamp())
                    for r in stale:
                        detail = reaped_detail(r, unused_since)
                        _log_event(conn, at.timestamp(), r.id, r.owner, "reaped", actor, detail)
                return stale

        stale = await self._run(reap)
        if not dry_run:
            for record in stale:
                self._bus.publish(record.id)
        return stale

    async def touch_many(
        self, touches: Mapping[str, datetime], uses: Mapping[str, int] | None = None
    ) -> dict[str, QuotaState]:
        counts = uses or {}
        rows = [
            {"at": at.timestamp(), "n": counts.get(key_id, 0), "id": key_id}
            for key_id, at in touches.items()
        ]
        ids = list(touches)

        def touch(conn: sqlite3.Connection) -> dict[str, QuotaState]:
            with self._transaction(conn):
                conn.executemany(_TOUCH_SQL, rows)
                quotas: dict[str, QuotaState] = {}
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for row in conn.execute(
                        "SELECT id, quota_remaining, quota_reset_at FROM keystile_keys"  # noqa: S608
                        f" WHERE id IN ({marks}) AND quota IS NOT NULL",
                        chunk,
                    ):
                        quotas[row[0]] = QuotaState(row[1], _dt(row[2]))
                return quotas

        return await self._run(touch)

    async def add_usage(self, counts: UsageCounts) -> None:
        rows = [
            (key_id, int(minute.timestamp()), requests, rejected)
            for (key_id, minute), (requests, rejected) in counts.items()
        ]
        if not rows:
            return

        def add(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                conn.executemany(_USAGE_UPSERT, rows)

        await self._run(add)

    async def usage(
        self,
        key_id: str,
        owner: str,
        *,
        since: datetime,
        until: datetime | None,
        bucket_seconds: int,
    ) -> list[UsageBucket]:
        params = (
            bucket_seconds,
            bucket_seconds,
            key_id,
            owner,
            int(since.timestamp()),
            int(until.timestamp()) if until is not None else _NO_END,
        )

        def usage(conn: sqlite3.Connection) -> list[UsageBucket]:
            rows = conn.execute(
                "SELECT (u.minute / ?) * ? AS start, SUM(u.requests), SUM(u.rejected)"
                " FROM keystile_usage AS u JOIN keystile_keys AS k ON k.id = u.key_id"
                " WHERE u.key_id = ? AND k.owner = ? AND u.minute >= ? AND u.minute < ?"
                " GROUP BY start ORDER BY start",
                params,
            )
            return [
                UsageBucket(datetime.fromtimestamp(row[0], timezone.utc), row[1], row[2])
                for row in rows
            ]

        return await self._run(usage)

    async def top_usage(
        self, owner: str, *, since: datetime, until: datetime | None, limit: int
    ) -> list[UsageTotal]:
        params = (
            owner,
            int(since.timestamp()),
            int(until.timestamp()) if until is not None else _NO_END,
            limit,
        )

        def top(conn: sqlite3.Connection) -> list[UsageTotal]:
            rows = conn.execute(
                "SELECT u.key_id, k.name, SUM(u.requests) AS r, SUM(u.rejected) AS j"
                " FROM keystile_usage AS u JOIN keystile_keys AS k ON k.id = u.key_id"
                " WHERE k.owner = ? AND u.minute >= ? AND u.minute < ?"
                " GROUP BY u.key_id, k.name ORDER BY r DESC, j DESC, u.key_id LIMIT ?",
                params,
            )
            return [UsageTotal(row[0], row[1], row[2], row[3]) for row in rows]

        return await self._run(top)

    async def prune_usage(self, *, before: datetime, limit: int) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            with self._transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM keystile_usage WHERE rowid IN (SELECT rowid FROM"
                    " keystile_usage WHERE minute < ? LIMIT ?)",
                    (int(before.timestamp()), limit),
                )
                return cursor.rowcount

        return await self._run(prune)

    async def update(
        self,
        key_id: str,
        owner: str,
        changes: Mapping[str, Any],
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        check_updatable(changes)
        fields = list(changes)
        detail = event_detail(changes)
        names_matter = "name" in changes or "expires_at" in changes

        def update(conn: sqlite3.Connection) -> KeyRecord | None:
            # BEGIN IMMEDIATE takes the write lock first: the name check below and the
            # write are one critical section, as in insert.
            with self._transaction(conn):
                if fields:
                    assignments = ", ".join(f"{name} = ?" for name in fields)
                    conn.execute(
                        f"UPDATE keystile_keys SET {assignments}"  # noqa: S608
                        " WHERE id = ? AND owner = ? AND revoked_at IS NULL",
                        [_UPDATABLE[name](changes[name]) for name in fields] + [key_id, owner],
                    )
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM keystile_keys WHERE id = ? AND owner = ?",  # noqa: S608
                    (key_id, owner),
                ).fetchone()
                if row is None:
                    return None
                updated = _record(row)
                if updated.revoked_at is not None:
                    raise revoked_error(key_id, owner)
                if not fields:
                    return updated
                if names_matter and updated.holds_name(at):
                    clash = conn.execute(
                        "SELECT 1 FROM keystile_keys WHERE owner = ? AND name = ? AND id <> ?"
                        " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                        (owner, updated.name, key_id, at.timestamp()),
                    ).fetchone()
                    if clash is not None:
                        raise DuplicateKeyName(
                            f"owner {owner!r} already has an active key named {updated.name!r}"
                        )
                _log_changes(conn, [key_id], at.timestamp())
                action = update_action(changes)
                _log_event(conn, at.timestamp(), key_id, owner, action, actor, detail)
                return updated

        updated = await self._run(update)
        if updated is not None and fields:
            self._bus.publish(key_id)
        return updated

    async def list_events(
        self,
        *,
        owner: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("owner = ?", owner),
            ("key_id = ?", key_id),
            ("at >= ?", _ts(since)),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {_EVENT_COLUMNS} FROM keystile_events"  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, seq DESC"
        if limit is not None and limit > 0:
            sql += " LIMIT ?"
            params.append(limit)

        def list_events(conn: sqlite3.Connection) -> list[KeyEvent]:
            return [_event(row) for row in conn.execute(sql, params)][::-1]

        return await self._run(list_events)

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            with self._transaction(conn):
                cursor = conn.execute("DELETE FROM keystile_events WHERE at < ?", (_ts(before),))
                detail = pruned_detail(before, cursor.rowcount)
                _log_event(conn, utcnow().timestamp(), "", "", "pruned", actor, detail)
                return cursor.rowcount

        return await self._run(prune)

    async def update_hash(self, key_id: str, secret_hash: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE keystile_keys SET secret_hash = ? WHERE id = ?", (secret_hash, key_id)
            )
        )

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        return self._bus.subscribe(listener)

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


def _with(record: KeyRecord, **changes: Any) -> KeyRecord:
    return dataclasses.replace(record, **changes)
