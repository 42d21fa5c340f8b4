"""``postgresql://…``: the production store, an asyncpg pool shared by many processes.

Every lifecycle change is one transaction that also runs ``pg_notify`` on a channel of
its own schema, so the notification is delivered exactly when (and only if) the change
commits. ``watch`` holds one dedicated ``LISTEN`` connection per process and relays each
notified key id to the local change bus; when that connection drops it reconnects with
capped backoff and publishes ``None`` ("events may have been missed"), because NOTIFY
is fire-and-forget: what was sent while nobody listened is gone.

Table names are always qualified with the quoted schema (never ``search_path``), so a
connection pooler that drops startup parameters cannot point the store at another schema.
Values only ever travel as ``$n`` parameters; the schema is the one identifier put into
SQL text, and it is validated before that.

Outages surface as ``StoreError`` within the connect/command timeouts, never as a hang or
an asyncpg exception. The pool is created lazily and per event loop, so a store that
could not connect at ``open()`` recovers when the database returns, and one used from a
fresh loop (``TestClient`` without ``with``) gets a pool of that loop. Reads and
idempotent writes are retried when their pooled connection turns out to be dead (after
a server restart every pooled connection is); other writes are not, since a lost commit
acknowledgement would make a retry report the wrong outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg

from ..errors import ConfigurationError, DuplicateKeyName, StoreError
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

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LISTEN_RECONNECT_MAX",
    "DEFAULT_POOL_MAX_SIZE",
    "DEFAULT_POOL_MIN_SIZE",
    "DEFAULT_SCHEMA",
    "LISTENER_APPLICATION_NAME",
    "POOL_APPLICATION_NAME",
    "PostgresKeyStore",
]

T = TypeVar("T")

logger = logging.getLogger("keystile.postgres")

DEFAULT_SCHEMA = "public"
DEFAULT_POOL_MIN_SIZE = 1
DEFAULT_POOL_MAX_SIZE = 10
#: Seconds any one statement may take before the operation fails with ``StoreError``.
DEFAULT_COMMAND_TIMEOUT = 5.0
#: Seconds to establish a connection; bounds how long an outage can stall a request.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Cap of the listener's exponential reconnect backoff, in seconds.
DEFAULT_LISTEN_RECONNECT_MAX = 5.0
#: First reconnect delay of the listener; doubled on every failed attempt.
LISTEN_RECONNECT_MIN = 0.1
#: How often the listener proves its connection is alive. A killed backend is noticed at
#: once (termination listener); this catches silent drops (a partition, a dead NAT entry).
LISTEN_HEALTH_INTERVAL = 1.0
#: ``application_name`` of the connections (followed by ``:<schema>``), so operators
#: (and tests) can tell them apart in ``pg_stat_activity``.
POOL_APPLICATION_NAME = "keystile"
LISTENER_APPLICATION_NAME = "keystile-listener"

_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_CHANNEL = "keystile_changes"
_NAMEDATALEN = 63

#: What a failed operation can raise from asyncpg or the socket beneath it.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
)
#: The subset that means "this connection is gone", where a retry on another is safe.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)

_COLUMNS = (
    "id, owner, name, prefix, secret_hash, scopes, metadata, created_at, expires_at,"
    " last_used_at, revoked_at, replaces, replaced_by, rate_limit, quota, quota_remaining,"
    " quota_refill, quota_reset_at, disabled_at, ip_allowlist"
)
_EVENT_COLUMNS = "id, at, key_id, owner, action, actor, detail"

#: Migration scripts, applied in order, each once; ``{schema}`` is the quoted schema.
#: Append new versions; never edit an applied one.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE {schema}.keystile_keys (
        id text PRIMARY KEY,
        owner text NOT NULL,
        name text NOT NULL,
        prefix text NOT NULL,
        secret_hash text NOT NULL,
        scopes text[] NOT NULL DEFAULT '{{}}',
        metadata jsonb NOT NULL DEFAULT '{{}}',
        created_at timestamptz NOT NULL,
        expires_at timestamptz,
        last_used_at timestamptz,
        revoked_at timestamptz,
        replaces text,
        replaced_by text
    );
    CREATE INDEX keystile_keys_owner_name ON {schema}.keystile_keys (owner, name);
    """,
    """
    ALTER TABLE {schema}.keystile_keys
        ADD COLUMN rate_limit text,
        ADD COLUMN quota bigint,
        ADD COLUMN quota_remaining bigint,
        ADD COLUMN quota_refill interval,
        ADD COLUMN quota_reset_at timestamptz;
    """,
    """
    ALTER TABLE {schema}.keystile_keys
        ADD COLUMN disabled_at timestamptz,
        ADD COLUMN ip_allowlist text[] NOT NULL DEFAULT '{{}}';
    CREATE TABLE {schema}.keystile_events (
        id bigserial PRIMARY KEY,
        at timestamptz NOT NULL,
        key_id text NOT NULL,
        owner text NOT NULL,
        action text NOT NULL,
        actor text NOT NULL,
        detail jsonb NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX keystile_events_owner_at ON {schema}.keystile_events (owner, at);
    CREATE INDEX keystile_events_key_at ON {schema}.keystile_events (key_id, at);
    CREATE INDEX keystile_events_at ON {schema}.keystile_events (at);
    """,
    """
    CREATE TABLE {schema}.keystile_usage (
        key_id text NOT NULL,
        minute timestamptz NOT NULL,
        requests bigint NOT NULL DEFAULT 0,
        rejected bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, minute)
    );
    CREATE INDEX keystile_usage_minute ON {schema}.keystile_usage (minute);
    """,
]

#: The fields ``update`` may change, with the SQL type of their parameter.
_UPDATABLE: dict[str, str] = {
    "rate_limit": "text",
    "quota": "bigint",
    "quota_remaining": "bigint",
    "quota_refill": "interval",
    "quota_reset_at": "timestamptz",
    "name": "text",
    "scopes": "text[]",
    "metadata": "jsonb",
    "expires_at": "timestamptz",
    "ip_allowlist": "text[]",
    "disabled_at": "timestamptz",
}


def _param(name: str, value: Any) -> Any:
    """An ``update`` value as asyncpg takes it for the column's type."""
    if name in ("scopes", "ip_allowlist"):
        return list(value)
    if name == "metadata":
        return json.dumps(dict(value))
    return value


#: A refill is due by the use time ``t.at``.
_REFILL_DUE = (
    "k.quota IS NOT NULL AND k.quota_refill > interval '0' AND k.quota_reset_at IS NOT NULL"
    " AND t.at >= k.quota_reset_at + k.quota_refill"
)
#: One statement per batch: ``last_used_at`` never backwards (GREATEST ignores NULL); a
#: refill due by the use time resets the quota to full at the period's start; then the
#: batch's uses are taken, never below 0. Right-hand sides read the row before the UPDATE.
_TOUCH_SQL = (
    "UPDATE {keys} AS k SET last_used_at = GREATEST(k.last_used_at, t.at),"  # noqa: S608
    f" quota_reset_at = CASE WHEN {_REFILL_DUE} THEN k.quota_reset_at + k.quota_refill"
    " * floor(extract(epoch from (t.at - k.quota_reset_at))"
    " / extract(epoch from k.quota_refill)) ELSE k.quota_reset_at END,"
    " quota_remaining = CASE WHEN k.quota IS NULL THEN k.quota_remaining"
    f" WHEN {_REFILL_DUE} THEN GREATEST(k.quota - t.n, 0)"
    " ELSE GREATEST(COALESCE(k.quota_remaining, k.quota) - t.n, 0) END"
    " FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) AS t(id, at, n)"
    " WHERE k.id = t.id RETURNING k.id, k.quota, k.quota_remaining, k.quota_reset_at"
)


#: One statement per usage flush: every (key, minute) row added to what other processes
#: already wrote for it.
_USAGE_UPSERT = (
    "INSERT INTO {usage} AS u (key_id, minute, requests, rejected)"
    " SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[])"
    " ON CONFLICT (key_id, minute) DO UPDATE SET requests = u.requests + EXCLUDED.requests,"
    " rejected = u.rejected + EXCLUDED.rejected"
)


def _validate_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"invalid Postgres schema name {schema!r}: use 1-63 letters, digits and"
            " underscores, not starting with a digit"
        )
    return schema


def _channel_for(schema: str) -> str:
    """The NOTIFY channel of a schema: distinct per schema so that tenants (and test
    schemas) sharing a database do not evict each other's keys, and at most 63 bytes,
    since Postgres truncates a longer ``LISTEN`` name but rejects it in ``pg_notify``."""
    if schema == DEFAULT_SCHEMA:
        return _CHANNEL
    channel = f"{_CHANNEL}__{schema}"
    if len(channel) > _NAMEDATALEN:
        channel = f"{_CHANNEL}__{hashlib.sha1(schema.encode()).hexdigest()}"  # noqa: S324
    return channel


def _record(row: Mapping[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        owner=row["owner"],
        name=row["name"],
        prefix=row["prefix"],
        secret_hash=row["secret_hash"],
        scopes=tuple(row["scopes"]),
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        replaces=row["replaces"],
        replaced_by=row["replaced_by"],
        rate_limit=row["rate_limit"],
        quota=row["quota"],
        quota_remaining=row["quota_remaining"],
        quota_refill=row["quota_refill"],
        quota_reset_at=row["quota_reset_at"],
        disabled_at=row["disabled_at"],
        ip_allowlist=tuple(row["ip_allowlist"]),
    )


def _event(row: Mapping[str, Any]) -> KeyEvent:
    return KeyEvent(
        at=row["at"],
        key_id=row["key_id"],
        owner=row["owner"],
        action=row["action"],
        actor=row["actor"],
        detail=json.loads(row["detail"]),
        id=row["id"],
    )


def _row_args(r: KeyRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.owner,
        r.name,
        r.prefix,
        r.secret_hash,
        list(r.scopes),
        json.dumps(dict(r.metadata)),
        r.created_at,
        r.expires_at,
        r.last_used_at,
        r.revoked_at,
        r.replaces,
        r.replaced_by,
        r.rate_limit,
        r.quota,
        r.quota_remaining,
        r.quota_refill,
        r.quota_reset_at,
        r.disabled_at,
        list(r.ip_allowlist),
    )


class PostgresKeyStore:
    """A ``KeyStore`` on PostgreSQL through an asyncpg pool (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int = DEFAULT_POOL_MIN_SIZE,
        max_size: int = DEFAULT_POOL_MAX_SIZE,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        listen_reconnect_max: float = DEFAULT_LISTEN_RECONNECT_MAX,
    ) -> None:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid Postgres URL: {exc}") from None
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ConfigurationError(
                f"a Postgres URL starts with postgresql:// or postgres://, not {parts.scheme!r}"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_schema = next((v for k, v in query if k == "schema"), None)
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigurationError(
                f"need 0 <= min_size <= max_size and max_size >= 1, got {min_size}, {max_size}"
            )
        for label, value in (
            ("command_timeout", command_timeout),
            ("connect_timeout", connect_timeout),
            ("listen_reconnect_max", listen_reconnect_max),
        ):
            if not value > 0:
                raise ConfigurationError(f"{label} must be a positive number of seconds")

        self.schema = _validate_schema(schema or url_schema or DEFAULT_SCHEMA)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.listen_reconnect_max = listen_reconnect_max
        self.channel = _channel_for(self.schema)

        # asyncpg passes unknown query parameters to the server as settings, where
        # ``schema`` would be rejected; it is ours, so it never reaches asyncpg.
        self._dsn = urlunsplit(
            parts._replace(query=urlencode([q for q in query if q[0] != "schema"]))
        )
        self._password = parts.password or next((v for k, v in query if k == "password"), None)
        self.display_url = self._redact(url)

        host = parts.hostname or next((v for k, v in query if k == "host"), "localhost")
        try:
            port: int | str = parts.port or 5432
        except ValueError:  # a multi-host URL; asyncpg parses it, the identity need not
            port = parts.netloc.rsplit("@", 1)[-1]
        database = parts.path.lstrip("/") or parts.username or ""
        self._bus = LocalChangeBus.for_identity(
            f"postgresql:{host}:{port}/{database}/{self.schema}"
        )

        q = f'"{self.schema}"'
        self._q = q
        self._keys = f"{q}.keystile_keys"
        self._usage = f"{q}.keystile_usage"
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._migrated = False
        self._guard: asyncio.Task[None] | None = None
        #: Whether this store's LISTEN connection is up, and whether keys were read while
        #: it was not: their state may have changed unheard, so the next LISTEN must reset.
        self._listening = False
        self._read_unheard = False

    def __repr__(self) -> str:
        return f"PostgresKeyStore({self.display_url!r})"

    # -- plumbing -------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        """``text`` with the password masked: URLs and error messages pass through here
        before they reach a log, an exception or a terminal."""
        with contextlib.suppress(ValueError):  # not a URL after all: the rules below apply
            parts = urlsplit(text)
            if parts.scheme and parts.password is not None:
                user = parts.username or ""
                host = parts.netloc.rsplit("@", 1)[1]
                text = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        text = re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)
        if self._password:
            for form in {self._password, unquote(self._password)}:
                text = text.replace(form, "***")
        return text

    def _describe(self, exc: BaseException) -> str:
        detail = self._redact(str(exc))
        return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__

    def _error(self, action: str, exc: BaseException) -> StoreError:
        return StoreError(
            f"PostgreSQL at {self.display_url}: {action} failed ({self._describe(exc)})"
        )

    def application_name(self, role: str) -> str:
        """``role:schema``, cut to the 63 bytes Postgres keeps."""
        return f"{role}:{self.schema}"[:_NAMEDATALEN]

    def _connect_kwargs(self, role: str) -> dict[str, Any]:
        return {
            "timeout": self.connect_timeout,
            "command_timeout": self.command_timeout,
            "server_settings": {"application_name": self.application_name(role)},
        }

    async def _get_pool(self) -> asyncpg.Pool:
        """The pool of the running event loop, created (and migrated) on first use.

        Created lazily, so a store whose database was down at ``open()`` recovers when
        it returns; recreated when the loop changed, because asyncpg connections belong
        to the loop that made them (Starlette's ``TestClient`` without ``with`` runs each
        request on a fresh loop)."""
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._pool_loop is loop:
            return self._pool
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            if self._pool is not None and self._pool_loop is loop:
                return self._pool
            if self._pool is not None:
                self._abandon_pool(self._pool)
                self._pool = None
            try:
                pool = await asyncio.wait_for(
                    asyncpg.create_pool(
                        self._dsn,
                        min_size=self.min_size,
                        max_size=self.max_size,
                        **self._connect_kwargs(POOL_APPLICATION_NAME),
                    ),
                    timeout=self.connect_timeout * 2,
                )
            except _DB_ERRORS as exc:
                raise self._error("connecting", exc) from exc
            try:
                if not self._migrated:
                    async with pool.acquire(timeout=self._acquire_timeout) as conn:
                        await self._migrate(conn)
                    self._migrated = True
            except BaseException as exc:
                pool.terminate()
                if isinstance(exc, _DB_ERRORS):
                    raise self._error("migrating", exc) from exc
                raise
            self._pool, self._pool_loop = pool, loop
            self._guard = loop.create_task(self._guard_pool(pool))
            return pool

    async def _guard_pool(self, pool: asyncpg.Pool) -> None:
        """Close ``pool`` when its loop shuts down without ``close()`` being called.

        ``asyncio.run`` and anyio cancel every pending task before closing their loop;
        this task waits for exactly that, so a pool left behind by a short-lived loop
        (a ``TestClient`` request) closes its sockets instead of leaking them."""
        try:
            await asyncio.Event().wait()
        finally:
            if self._guard is asyncio.current_task():
                self._guard = None
                if self._pool is pool:
                    self._pool = self._pool_loop = None
                await self._close_pool(pool, self.command_timeout)

    @staticmethod
    def _abandon_pool(pool: asyncpg.Pool) -> None:
        """Drop a pool of another (usually closed) loop: it cannot be closed gracefully
        from here, so its sockets are aborted on a best-effort basis."""
        with contextlib.suppress(Exception):  # a closed loop refuses callbacks
            pool.terminate()

    @property
    def _acquire_timeout(self) -> float:
        # Acquiring may mean connecting, or waiting for a busy connection's statement.
        return self.connect_timeout + self.command_timeout

    @asynccontextmanager
    async def _connection(self, action: str) -> AsyncIterator[Any]:
        """A pooled connection; every database or socket failure becomes ``StoreError``."""
        pool = await self._get_pool()
        try:
            async with pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn
        except _DB_ERRORS as exc:
            raise self._error(action, exc) from exc

    async def _idempotent(self, action: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run a read (or a write safe to repeat) and retry it when its connection
        turns out to be dead, so a killed backend costs a retry, not a failed request."""
        # After a server restart every pooled connection may be dead; each failed try
        # costs one round trip and the pool reconnects that holder on its next acquire.
        # A refused or timed-out connect is not "lost" and ends the loop at once.
        attempts = self.max_size + 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._connection(action) as conn:
                    return await fn(conn)
            except StoreError as exc:
                if attempt == attempts or not isinstance(exc.__cause__, _CONNECTION_LOST):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _migrate(self, conn: Any) -> None:
        """Apply pending migrations, once, even with many processes starting together:
        the advisory lock serialises them and each re-reads the applied versions after
        taking it. Nothing is created when all is current, so an app role without CREATE
        privilege can open a database an operator initialised."""
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"keystile:migrate:{self.schema}"
            )
            has_schema = await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema
            )
            if not has_schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._q}")
            has_table = await conn.fetchval(
                "SELECT to_regclass($1)", f"{self._q}.keystile_migrations"
            )
            if not has_table:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._q}.keystile_migrations"
                    " (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            done = {
                row[0]
                for row in await conn.fetch(
                    f"SELECT version FROM {self._q}.keystile_migrations"  # noqa: S608
                )
            }
            for version, script in enumerate(_MIGRATIONS, start=1):
                if version in done:
                    continue
                await conn.execute(script.format(schema=self._q))
                await conn.execute(
                    f"INSERT INTO {self._q}.keystile_migrations (version, applied_at)"  # noqa: S608
                    " VALUES ($1, now())",
                    version,
                )

    async def _notify(self, conn: Any, key_ids: Sequence[str]) -> None:
        """Queue one NOTIFY per changed key inside the caller's transaction, so other
        processes hear of the change exactly when it commits."""
        if key_ids:
            await conn.execute(
                "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS t(id)",
                self.channel,
                list(key_ids),
            )

    async def _log_events(
        self,
        conn: Any,
        at: datetime,
        events: Sequence[tuple[str, str, str, Mapping[str, Any]]],
        actor: str,
    ) -> None:
        """Append audit events ``(key_id, owner, action, detail)`` inside the caller's
        transaction, so they commit (or roll back) with the change they record."""
        if events:
            await conn.executemany(
                f"INSERT INTO {self._q}.keystile_events"  # noqa: S608
                " (at, key_id, owner, action, actor, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                [(at, k, o, a, actor, json.dumps(dict(d))) for k, o, a, d in events],
            )

    async def _insert_row(self, conn: Any, record: KeyRecord) -> None:
        await conn.execute(
            f"INSERT INTO {self._keys} ({_COLUMNS}) VALUES"  # noqa: S608
            " ($1, $2, $3, $4, $5, $6::text[], $7::jsonb, $8, $9, $10, $11, $12, $13,"
            " $14, $15, $16, $17, $18, $19, $20::text[])",
            *_row_args(record),
        )

    # -- the protocol ---------------------------------------------------------------

    async def open(self) -> None:
        await self._get_pool()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        loop, self._pool_loop = self._pool_loop, None
        guard, self._guard = self._guard, None
        if pool is None:
            return
        if guard is not None:
            guard.cancel()  # it sees it is no longer self._guard and leaves the pool to us
        if loop is not asyncio.get_running_loop():
            self._abandon_pool(pool)
            return
        await self._close_pool(pool, self.command_timeout)

    @staticmethod
    async def _close_pool(pool: asyncpg.Pool, grace: float) -> None:
        """Close gracefully if that finishes within ``grace`` seconds, else abort the sockets.

        Shielded, because an anyio cancel scope re-cancels every await and closing must
        still finish when the caller is being cancelled."""
        with anyio.CancelScope(shield=True):
            try:
                await asyncio.wait_for(pool.close(), timeout=grace)
            except asyncio.CancelledError:
                pool.terminate()
                raise
            except _DB_ERRORS:
                pool.terminate()

    async def get(self, key_id: str) -> KeyRecord | None:
        async def get(conn: Any) -> KeyRecord | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM {self._keys} WHERE id = $1",  # noqa: S608
                key_id,
            )
            return _record(row) if row is not None else None

        self._read_unheard |= not self._listening
        return await self._idempotent("get", get)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        ids = list(dict.fromkeys(key_ids))
        if not ids:
            return {}

        async def get_many(conn: Any) -> dict[str, KeyRecord]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._keys} WHERE id = ANY($1::text[])",  # noqa: S608
                ids,
            )
            return {row["id"]: _record(row) for row in rows}

        self._read_unheard |= not self._listening
        return await self._idempotent("get_many", get_many)

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None:
        async def get_owned(conn: Any) -> KeyRecord | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM {self._keys} WHERE id = $1 AND owner = $2",  # noqa: S608
                key_id,
                owner,
            )
            return _record(row) if row is not None else None

        return await self._idempotent("get_owned", get_owned)

    async def list_keys(self, owner: str) -> list[KeyRecord]:
        async def list_keys(conn: Any) -> list[KeyRecord]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._keys} WHERE owner = $1"  # noqa: S608
                " ORDER BY created_at, id",
                owner,
            )
            return [_record(row) for row in rows]

        return await self._idempotent("list_keys", list_keys)

    async def list_all(self) -> list[KeyRecord]:
        async def list_all(conn: Any) -> list[KeyRecord]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._keys} ORDER BY owner, created_at, id"  # noqa: S608
            )
            return [_record(row) for row in rows]

        return await self._idempotent("list_all", list_all)

    async def insert(
        self, record: KeyRecord, *, replace: bool = False, actor: str = SYSTEM_ACTOR
    ) -> list[str]:
        async with self._connection("insert") as conn, conn.transaction():
            # The clash check and the insert must be one critical section per
            # (owner, name): a partial unique index cannot express "active", which
            # depends on now() (an expired, unrevoked key does not clash). The
            # transaction-scoped lock serialises exactly the contenders for one name.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
                self.schema,
                f"{record.owner}\x1f{record.name}",
            )
            now = utcnow()
            clash: list[str] = [
                row["id"]
                for row in await conn.fetch(
                    f"SELECT id FROM {self._keys} WHERE owner = $1 AND name = $2"  # noqa: S608
                    " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3)"
                    " ORDER BY created_at, id",
                    record.owner,
                    record.name,
                    now,
                )
            ]
            if clash and not replace:
                raise DuplicateKeyName(
                    f"owner {record.owner!r} already has an active key named"
                    f" {record.name!r}; pass replace=True (--replace) to revoke it"
                    " and mint a new one"
                )
            if clash:
                await conn.execute(
                    f"UPDATE {self._keys} SET revoked_at = $1, replaced_by = $2"  # noqa: S608
                    " WHERE id = ANY($3::text[])",
                    now,
                    record.id,
                    clash,
                )
                await self._notify(conn, clash)
            replaces = clash[-1] if clash else record.replaces
            await self._insert_row(conn, dataclasses.replace(record, replaces=replaces))
            events = [(old, record.owner, "replaced", {"replaced_by": record.id}) for old in clash]
            events.append((record.id, record.owner, "created", created_detail(record, replaces)))
            await self._log_events(conn, now, events, actor)
        for key_id in clash:
            self._bus.publish(key_id)
        return clash

    async def revoke(
        self,
        key_id: str,
        owner: str,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
        action: str = "revoked",
    ) -> bool:
        async with self._connection("revoke") as conn, conn.transaction():
            revoked = await conn.fetchval(
                f"UPDATE {self._keys} SET revoked_at = $1"  # noqa: S608
                " WHERE id = $2 AND owner = $3 AND revoked_at IS NULL RETURNING id",
                at,
                key_id,
                owner,
            )
            if revoked is not None:
                await self._notify(conn, [key_id])
                await self._log_events(conn, at, [(key_id, owner, action, {})], actor)
        if revoked is not None:
            self._bus.publish(key_id)
        return revoked is not None

    async def rotate(
        self,
        key_id: str,
        owner: str,
        successor: KeyRecord,
        *,
        grace_until: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        async with self._connection("rotate") as conn, conn.transaction():
            # LEAST ignores NULL: a key without expiry gets exactly grace_until. A
            # concurrent rotation of the same key waits for this row lock, then READ
            # COMMITTED re-checks the WHERE on the committed row: replaced_by is set by
            # then, so it updates nothing and only one successor is ever inserted.
            row = await conn.fetchrow(
                f"UPDATE {self._keys} SET replaced_by = $1,"  # noqa: S608
                " expires_at = LEAST(expires_at, $2)"
                " WHERE id = $3 AND owner = $4 AND revoked_at IS NULL AND replaced_by IS NULL"
                " AND disabled_at IS NULL AND (expires_at IS NULL OR expires_at > $5)"
                f" RETURNING {_COLUMNS}",
                successor.id,
                grace_until,
                key_id,
                owner,
                utcnow(),
            )
            if row is None:
                return None
            await self._insert_row(conn, dataclasses.replace(successor, replaces=key_id))
            await self._notify(conn, [key_id])
            old = _record(row)
            events = [
                (key_id, owner, "rotated", rotated_detail(successor.id, old.expires_at)),
                (successor.id, owner, "created", created_detail(successor, key_id)),
            ]
            await self._log_events(conn, utcnow(), events, actor)
        self._bus.publish(key_id)
        return old

    async def reap(
        self,
        *,
        unused_since: datetime,
        at: datetime,
        dry_run: bool,
        include_disabled: bool = False,
        actor: str = SYSTEM_ACTOR,
    ) -> list[KeyRecord]:
        # FOR UPDATE makes a key revoked concurrently drop out of the result (READ
        # COMMITTED re-checks the WHERE clause on locked rows) instead of being revoked
        # twice and reported as reaped.
        lock = "" if dry_run else " FOR UPDATE"
        async with self._connection("reap") as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._keys} WHERE revoked_at IS NULL"  # noqa: S608
                " AND ($3 OR disabled_at IS NULL)"
                " AND (COALESCE(last_used_at, created_at) < $1"
                " OR (expires_at IS NOT NULL AND expires_at <= $2))"
                f" ORDER BY created_at, id{lock}",
                unused_since,
                at,
                include_disabled,
            )
            stale = [_record(row) for row in rows]
            if not dry_run and stale:
                ids = [r.id for r in stale]
                await conn.execute(
                    f"UPDATE {self._keys} SET revoked_at = $1"  # noqa: S608
                    " WHERE id = ANY($2::text[])",
                    at,
                    ids,
                )
                await self._notify(conn, ids)
                events = [(r.id, r.owner, "reaped", reaped_detail(r, unused_since)) for r in stale]
                await self._log_events(conn, at, events, actor)
        if not dry_run:
            for record in stale:
                self._bus.publish(record.id)
        return stale

    async def touch_many(
        self, touches: Mapping[str, datetime], uses: Mapping[str, int] | None = None
    ) -> dict[str, QuotaState]:
        if not touches:
            return {}
        ids = list(touches)
        ats = [touches[k] for k in ids]
        counts = [(uses or {}).get(k, 0) for k in ids]
        sql = _TOUCH_SQL.format(keys=self._keys)

        async def touch(conn: Any) -> dict[str, QuotaState]:
            rows = await conn.fetch(sql, ids, ats, counts)
            return {
                row["id"]: QuotaState(row["quota_remaining"], row["quota_reset_at"])
                for row in rows
                if row["quota"] is not None
            }

        if any(counts):
            # Taking uses is not idempotent: a retry after a lost commit acknowledgement
            # would take them twice. The recorder keeps a failed batch and retries it.
            async with self._connection("touch_many") as conn:
                return await touch(conn)
        return await self._idempotent("touch_many", touch)

    async def add_usage(self, counts: UsageCounts) -> None:
        if not counts:
            return
        # Sorted, so two processes upserting the same rows lock them in the same order.
        keys = sorted(counts)
        args = (
            [k for k, _ in keys],
            [m for _, m in keys],
            [counts[k][0] for k in keys],
            [counts[k][1] for k in keys],
        )
        # Adding is not idempotent (a retry after a lost acknowledgement would count
        # twice): no retry here; the recorder keeps a failed batch and tries again.
        async with self._connection("add_usage") as conn:
            await conn.execute(_USAGE_UPSERT.format(usage=self._usage), *args)

    async def usage(
        self,
        key_id: str,
        owner: str,
        *,
        since: datetime,
        until: datetime | None,
        bucket_seconds: int,
    ) -> list[UsageBucket]:
        sql = (
            "SELECT to_timestamp(floor(extract(epoch FROM u.minute) / $5) * $5) AS start,"  # noqa: S608
            " sum(u.requests)::bigint AS requests, sum(u.rejected)::bigint AS rejected"
            f" FROM {self._usage} AS u JOIN {self._keys} AS k ON k.id = u.key_id"
            " WHERE u.key_id = $1 AND k.owner = $2 AND u.minute >= $3"
            " AND ($4::timestamptz IS NULL OR u.minute < $4) GROUP BY 1 ORDER BY 1"
        )

        async def usage(conn: Any) -> list[UsageBucket]:
            rows = await conn.fetch(sql, key_id, owner, since, until, bucket_seconds)
            return [UsageBucket(r["start"], r["requests"], r["rejected"]) for r in rows]

        return await self._idempotent("usage", usage)

    async def top_usage(
        self, owner: str, *, since: datetime, until: datetime | None, limit: int
    ) -> list[UsageTotal]:
        sql = (
            "SELECT u.key_id, k.name, sum(u.requests)::bigint AS requests,"  # noqa: S608
            " sum(u.rejected)::bigint AS rejected"
            f" FROM {self._usage} AS u JOIN {self._keys} AS k ON k.id = u.key_id"
            " WHERE k.owner = $1 AND u.minute >= $2 AND ($3::timestamptz IS NULL OR u.minute < $3)"
            " GROUP BY u.key_id, k.name ORDER BY requests DESC, rejected DESC, u.key_id LIMIT $4"
        )

        async def top(conn: Any) -> list[UsageTotal]:
            rows = await conn.fetch(sql, owner, since, until, limit)
            return [UsageTotal(r["key_id"], r["name"], r["requests"], r["rejected"]) for r in rows]

        return await self._idempotent("top_usage", top)

    async def prune_usage(self, *, before: datetime, limit: int) -> int:
        sql = (
            f"DELETE FROM {self._usage} WHERE ctid = ANY(ARRAY(SELECT ctid FROM"  # noqa: S608
            f" {self._usage} WHERE minute < $1 LIMIT $2))"
        )

        async def prune(conn: Any) -> int:
            status: str = await conn.execute(sql, before, limit)
            return int(status.rsplit(" ", 1)[-1])

        return await self._idempotent("prune_usage", prune)

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
        if not fields:
            current = await self.get_owned(key_id, owner)
            if current is not None and current.revoked_at is not None:
                raise revoked_error(key_id, owner)
            return current
        detail = event_detail(changes)
        assignments = ", ".join(
            f"{name} = ${i}::{_UPDATABLE[name]}" for i, name in enumerate(fields, start=1)
        )
        n = len(fields)
        async with self._connection("update") as conn, conn.transaction():
            if "name" in changes or "expires_at" in changes:
                # The name the key will hold: lock it as insert does, so a concurrent
                # insert or update of that (owner, name) waits for this decision.
                name = changes.get("name") or await conn.fetchval(
                    f"SELECT name FROM {self._keys} WHERE id = $1 AND owner = $2",  # noqa: S608
                    key_id,
                    owner,
                )
                if name is not None:
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
                        self.schema,
                        f"{owner}\x1f{name}",
                    )
            # A concurrent revoke holds the row: this waits for it, then READ COMMITTED
            # re-checks revoked_at on the committed row and updates nothing.
            row = await conn.fetchrow(
                f"UPDATE {self._keys} SET {assignments}"  # noqa: S608
                f" WHERE id = ${n + 1} AND owner = ${n + 2} AND revoked_at IS NULL"
                f" RETURNING {_COLUMNS}",
                *(_param(name, changes[name]) for name in fields),
                key_id,
                owner,
            )
            if row is None:
                revoked = await conn.fetchval(
                    f"SELECT revoked_at IS NOT NULL FROM {self._keys}"  # noqa: S608
                    " WHERE id = $1 AND owner = $2",
                    key_id,
                    owner,
                )
                if revoked:
                    raise revoked_error(key_id, owner)
                return None
            updated = _record(row)
            if ("name" in changes or "expires_at" in changes) and updated.holds_name(at):
                clash = await conn.fetchval(
                    f"SELECT 1 FROM {self._keys} WHERE owner = $1 AND name = $2"  # noqa: S608
                    " AND id <> $3 AND revoked_at IS NULL"
                    " AND (expires_at IS NULL OR expires_at > $4)",
                    owner,
                    updated.name,
                    key_id,
                    at,
                )
                if clash is not None:
                    raise DuplicateKeyName(
                        f"owner {owner!r} already has an active key named {updated.name!r}"
                    )
            await self._notify(conn, [key_id])
            await self._log_events(
                conn, at, [(key_id, owner, update_action(changes), detail)], actor
            )
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
        for column, value in (("owner", owner), ("key_id", key_id), ("at", since)):
            if value is not None:
                params.append(value)
                where.append(f"{column} {'>=' if column == 'at' else '='} ${len(params)}")
        sql = f"SELECT {_EVENT_COLUMNS} FROM {self._q}.keystile_events"  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, id DESC"
        if limit is not None and limit > 0:
            params.append(limit)
            sql += f" LIMIT ${len(params)}"

        async def list_events(conn: Any) -> list[KeyEvent]:
            return [_event(row) for row in await conn.fetch(sql, *params)][::-1]

        return await self._idempotent("list_events", list_events)

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        # Not retried: a retry after a lost commit acknowledgement would record two prunes.
        async with self._connection("prune_events") as conn, conn.transaction():
            status: str = await conn.execute(
                f"DELETE FROM {self._q}.keystile_events WHERE at < $1",  # noqa: S608
                before,
            )
            pruned = int(status.rsplit(" ", 1)[-1])
            await self._log_events(
                conn, utcnow(), [("", "", "pruned", pruned_detail(before, pruned))], actor
            )
        return pruned

    async def update_hash(self, key_id: str, secret_hash: str) -> None:
        async def update(conn: Any) -> None:
            await conn.execute(
                f"UPDATE {self._keys} SET secret_hash = $1 WHERE id = $2",  # noqa: S608
                secret_hash,
                key_id,
            )

        await self._idempotent("update_hash", update)

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        return self._bus.subscribe(listener)

    async def watch(self) -> None:
        """LISTEN on a dedicated connection and relay notified key ids to subscribers.

        Not a pooled connection: the pool runs ``UNLISTEN *`` on release. Never raises
        but for cancellation; while the database is unreachable it keeps retrying with
        capped exponential backoff, logging once per failure streak. After every
        reconnect it publishes ``None``: notifications sent while it was away are lost,
        so every cached key must be re-checked. It does so after the first connect too
        when keys were read before it (for example while the database was down at
        startup and came back before the listener did): their state may have changed
        while nobody listened."""
        backoff = LISTEN_RECONNECT_MIN
        failing = False
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(
                    self._dsn, **self._connect_kwargs(LISTENER_APPLICATION_NAME)
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._on_notification)
                self._listening = True
                if self._read_unheard:
                    self._read_unheard = False
                    self._bus.publish(None)
                if failing:
                    logger.info("listener reconnected to %s", self.display_url)
                failing = False
                backoff = LISTEN_RECONNECT_MIN
                await self._hold(conn, lost)
            except Exception as exc:  # anything but cancellation: log, back off, retry
                if not failing:
                    failing = True
                    logger.warning(
                        "LISTEN connection to %s failed (%s); retrying with backoff up to %.1fs",
                        self.display_url,
                        self._describe(exc),
                        self.listen_reconnect_max,
                    )
            finally:
                if self._listening:
                    self._listening = False
                    self._read_unheard = True
                if conn is not None:
                    await self._close_connection(conn)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.listen_reconnect_max)

    async def _hold(self, conn: Any, lost: asyncio.Event) -> None:
        """Return (by raising) only when the listener connection is gone: at once when
        the server closes it, within a health interval plus a timeout when it silently
        stops answering."""
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), timeout=LISTEN_HEALTH_INTERVAL)
            except asyncio.TimeoutError:
                await conn.execute("SELECT 1", timeout=self.command_timeout)
        raise ConnectionResetError("the listener connection was closed")

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._bus.publish(payload)

    @staticmethod
    async def _close_connection(conn: Any) -> None:
        """Close politely when it answers soon, otherwise abort the socket; shielded so
        that it also completes while the watcher is being cancelled."""
        with anyio.CancelScope(shield=True):
            try:
                if not conn.is_closed():
                    await asyncio.wait_for(conn.close(), timeout=1.0)
            except asyncio.CancelledError:
                conn.terminate()
                raise
            except _DB_ERRORS:
                conn.terminate()
