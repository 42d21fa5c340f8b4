"""The Postgres store's plumbing: its settings, the asyncpg pool, errors and retries.

Outages surface as ``StoreError`` within the connect/command timeouts, never as a hang or
an asyncpg exception. The pool is created lazily and per event loop, so a store that
could not connect at ``open()`` recovers when the database returns, and one used from a
fresh loop (``TestClient`` without ``with``) gets a pool of that loop. Reads and
idempotent writes are retried when their pooled connection turns out to be dead (after
a server restart every pooled connection is); other writes are not, since a lost commit
acknowledgement would make a retry report the wrong outcome.

Key reads (one statement each, no transaction) take the reader: one pooled connection
the store keeps checked out while it is free, so a cache miss pays its statement's round
trip and not the pool's checkout and reset (``_read``; about 110 µs of CPU saved per
miss, ``benchmarks/fleet.py``). A read that finds it busy uses the pool as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import asyncpg

from ...errors import ConfigurationError, StoreError
from ..bus import LocalChangeBus
from ..common import CommonStore
from ..sql import Statements
from .schema import (
    DEFAULT_SCHEMA,
    NAMEDATALEN,
    POSTGRES,
    channel_for,
    migrate,
    quoted,
    validate_schema,
)
from .url import PostgresURL

__all__ = [
    "DB_ERRORS",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LISTEN_RECONNECT_MAX",
    "DEFAULT_POOL_MAX_SIZE",
    "DEFAULT_POOL_MIN_SIZE",
    "LISTENER_APPLICATION_NAME",
    "POOL_APPLICATION_NAME",
    "Connection",
    "transaction_lock",
]

T = TypeVar("T")

DEFAULT_POOL_MIN_SIZE = 1
DEFAULT_POOL_MAX_SIZE = 10
#: Seconds any one statement may take before the operation fails with ``StoreError``.
DEFAULT_COMMAND_TIMEOUT = 5.0
#: Seconds to establish a connection; bounds how long an outage can stall a request.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Cap of the listener's exponential reconnect backoff, in seconds.
DEFAULT_LISTEN_RECONNECT_MAX = 5.0
#: ``application_name`` of the connections (followed by ``:<schema>``), so operators
#: (and tests) can tell them apart in ``pg_stat_activity``.
POOL_APPLICATION_NAME = "keystile"
LISTENER_APPLICATION_NAME = "keystile-listener"

#: What a failed operation can raise from asyncpg or the socket beneath it.
DB_ERRORS: tuple[type[BaseException], ...] = (
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


async def transaction_lock(conn: Any, schema: str, name: str, *, shared: bool = False) -> None:
    """Hold the advisory lock ``name`` of ``schema`` until the transaction ends: alone, or
    ``shared`` with others that take it shared."""
    lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    await conn.execute(f"SELECT {lock}(hashtext($1), hashtext($2))", schema, name)


@dataclass(slots=True, eq=False)
class _Reader:
    """The pooled connection key reads take first, and whether a read is on it."""

    pool: asyncpg.Pool
    loop: asyncio.AbstractEventLoop
    conn: Any
    busy: bool = False

    def gone(self) -> bool:
        """Whether its connection closed (the pool then takes it back on its own)."""
        try:
            return bool(self.conn.is_closed())
        except asyncpg.InterfaceError:  # "released back to the pool": it closed
            return True


class Connection(CommonStore):
    """The pool (one per event loop), errors as ``StoreError`` with the password
    redacted (``PostgresURL``), and the retry of reads: what every part of
    ``PostgresKeyStore`` runs its statements through."""

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
        target = PostgresURL.parse(url)
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

        self.schema = validate_schema(schema or target.schema or DEFAULT_SCHEMA)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.listen_reconnect_max = listen_reconnect_max
        self.channel = channel_for(self.schema)
        self._dsn = target.dsn
        self._url = target
        self.display_url = target.redact(url)
        self._bus = LocalChangeBus.for_identity(f"postgresql:{target.server}/{self.schema}")

        self._sql = Statements(POSTGRES, f"{quoted(self.schema)}.")
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._migrated = False
        self._guard: asyncio.Task[None] | None = None
        self._reader: _Reader | None = None
        #: Whether this store's LISTEN connection is up, and whether keys were read while
        #: it was not: their state may have changed unheard, so the next LISTEN must reset.
        self._listening = False
        self._read_unheard = False

    def __repr__(self) -> str:
        return f"PostgresKeyStore({self.display_url!r})"

    def _describe(self, exc: BaseException) -> str:
        detail = self._url.redact(str(exc))
        return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__

    def _error(self, action: str, exc: BaseException) -> StoreError:
        return StoreError(
            f"PostgreSQL at {self.display_url}: {action} failed ({self._describe(exc)})"
        )

    def application_name(self, role: str) -> str:
        """``role:schema``, cut to the 63 bytes Postgres keeps."""
        return f"{role}:{self.schema}"[:NAMEDATALEN]

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
                self._reader = None
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
            except DB_ERRORS as exc:
                raise self._error("connecting", exc) from exc
            try:
                if not self._migrated:
                    async with pool.acquire(timeout=self._acquire_timeout) as conn:
                        await migrate(conn, self.schema)
                    self._migrated = True
            except BaseException as exc:
                pool.terminate()
                if isinstance(exc, DB_ERRORS):
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
                await self._release_reader(pool)
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
        except DB_ERRORS as exc:
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

    async def _read(self, action: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``fn`` (one read statement) on the reader when it is free, else as
        ``_idempotent``. A reader that fails is closed and the read made on the pool."""
        reader = self._reader
        if (
            reader is None
            or reader.busy
            or reader.loop is not asyncio.get_running_loop()
            or reader.gone()
        ):
            reader = await self._take_reader()
            if reader is None:
                return await self._idempotent(action, fn)
        reader.busy = True
        try:
            return await fn(reader.conn)
        except BaseException as exc:
            # Whatever state it is left in (mid-statement, when cancelled, or told by a
            # server that ended its backend), it is dropped; the pool answers instead,
            # unless the read timed out (it would wait as long again).
            self._drop_reader(reader)
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                raise self._error(action, exc) from exc
            if isinstance(exc, DB_ERRORS):
                return await self._idempotent(action, fn)
            raise
        finally:
            reader.busy = False

    async def _take_reader(self) -> _Reader | None:
        """A free reader of the current pool: kept, or checked out now; ``None`` when
        the running one is busy or the pool is too small to spare a connection."""
        pool = await self._get_pool()
        current = self._reader
        if current is not None and current.pool is pool and not current.gone():
            return None if current.busy else current
        if current is not None:
            self._drop_reader(current)
        if self.max_size < 2:
            return None
        try:
            conn = await pool.acquire(timeout=self._acquire_timeout)
        except DB_ERRORS:
            return None
        if self._reader is not None or self._pool is not pool:
            await pool.release(conn)
            return None
        self._reader = _Reader(pool, asyncio.get_running_loop(), conn)
        return self._reader

    def _drop_reader(self, reader: _Reader) -> None:
        """Close ``reader``: its pool slot is free again at once."""
        if self._reader is reader:
            self._reader = None
        with contextlib.suppress(Exception):  # a closed loop refuses callbacks
            reader.conn.terminate()

    async def _release_reader(self, pool: asyncpg.Pool) -> None:
        """Give the reader of ``pool`` back before the pool closes (it waits for it)."""
        reader = self._reader
        if reader is None or reader.pool is not pool:
            return
        self._reader = None
        if reader.busy:
            self._drop_reader(reader)
            return
        try:
            await pool.release(reader.conn, timeout=self.command_timeout)
        except DB_ERRORS:
            self._drop_reader(reader)

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
            self._reader = None
            self._abandon_pool(pool)
            return
        await self._release_reader(pool)
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
            except DB_ERRORS:
                pool.terminate()
