"""How Postgres stores in other processes hear of a change: every change's transaction
runs ``pg_notify`` on the schema's channel, so the notification is delivered exactly when
(and only if) the change commits. ``watch`` holds one dedicated ``LISTEN`` connection per
process and relays each notified key id to the local change bus; when that connection
drops it reconnects with capped backoff and publishes ``None`` ("events may have been
missed"), because NOTIFY is fire-and-forget: what was sent while nobody listened is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import asyncpg

from .connection import DB_ERRORS, LISTENER_APPLICATION_NAME, Connection

__all__ = ["LISTEN_HEALTH_INTERVAL", "LISTEN_RECONNECT_MIN", "Watch", "notify"]

logger = logging.getLogger("keystile.postgres")

#: First reconnect delay of the listener; doubled on every failed attempt.
LISTEN_RECONNECT_MIN = 0.1
#: How often the listener proves its connection is alive. A killed backend is noticed at
#: once (termination listener); this catches silent drops (a partition, a dead NAT entry).
LISTEN_HEALTH_INTERVAL = 1.0


async def notify(conn: Any, channel: str, key_ids: Sequence[str]) -> None:
    """Queue one NOTIFY per changed key inside the caller's transaction, so other
    processes hear of the change exactly when it commits."""
    if key_ids:
        await conn.execute(
            "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS t(id)", channel, list(key_ids)
        )


class Watch(Connection):
    """The LISTEN watcher of ``PostgresKeyStore``."""

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
            except DB_ERRORS:
                conn.terminate()
