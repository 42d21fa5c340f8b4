"""APIKeyMiddleware on a real PostgreSQL, through real ASGI requests.

Batched ``last_used_at`` writes counted by Postgres itself (a statement-level trigger),
revocation reaching another middleware by NOTIFY from another OS process, the listener
reconnecting after ``pg_terminate_backend``, a store outage simulated by cutting a TCP
proxy (``tests/pgproxy.py``), the final flush at shutdown, and a store that is down at
startup. Every test has a schema of its own (``postgres_database_url``).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from starlette.types import Message

import keystile
from apps import client, protect
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager
from keystile.stores.postgres import LISTENER_APPLICATION_NAME, PostgresKeyStore
from keystile.tokens import generate_key
from pgproxy import running_proxy
from pgtools import count_update_statements, split_url, until_listening, update_statements

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]

#: µs: Postgres keeps microseconds; ``datetime.fromtimestamp`` rounds to the nearest one.
ROUNDING = 1e-6


@pytest.fixture
def schema(postgres_database_url: str) -> str:
    return split_url(postgres_database_url)[1]


@pytest.fixture
async def raw(postgres_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database, for looking behind the middleware."""
    conn = await asyncpg.connect(split_url(postgres_database_url)[0])
    try:
        yield conn
    finally:
        await conn.close()


async def make_keys(url: str, n: int, owner: str = "acme") -> list[CreatedKey]:
    """``n`` fresh keys of ``owner``, minted by a store of their own (as the CLI would)."""
    async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
        return [await manager.create(owner=owner, name=f"key-{i}") for i in range(n)]


@asynccontextmanager
async def middleware(store: PostgresKeyStore, **options: Any) -> AsyncIterator[APIKeyMiddleware]:
    """``protect(store)``; on exit its background work stops and the store closes."""
    app = protect(store, **options)
    try:
        yield app
    finally:
        await app.aclose()
        await store.close()


async def get(c: httpx.AsyncClient, key: CreatedKey | str) -> httpx.Response:
    token = key.key if isinstance(key, CreatedKey) else key
    return await c.get("/whoami", headers={"Authorization": f"Bearer {token}"})


async def timed_get(c: httpx.AsyncClient, key: CreatedKey) -> tuple[float, float]:
    """One authenticated request that must succeed; its wall-clock bounds."""
    before = time.time()
    r = await get(c, key)
    after = time.time()
    assert r.status_code == 200, r.text
    return before, after


async def last_used(
    raw: asyncpg.Connection, schema: str, keys: Sequence[CreatedKey]
) -> dict[str, datetime | None]:
    rows = await raw.fetch(
        f'SELECT id, last_used_at FROM "{schema}".keystile_keys WHERE id = ANY($1::text[])',  # noqa: S608
        [k.id for k in keys],
    )
    return {row["id"]: row["last_used_at"] for row in rows}


def assert_within(at: datetime | None, bounds: tuple[float, float]) -> None:
    """``at`` was taken during the request whose wall-clock bounds are ``bounds``."""
    assert at is not None
    before, after = bounds
    assert before - ROUNDING <= at.timestamp() <= after + ROUNDING, (at, bounds)


async def listener_pids(raw: asyncpg.Connection, store: PostgresKeyStore) -> list[int]:
    rows = await raw.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        store.application_name(LISTENER_APPLICATION_NAME),
    )
    return [row["pid"] for row in rows]


_REVOKER = """
import asyncio, json, sys, time
from keystile import KeyManager

async def main():
    async with KeyManager.from_url(sys.argv[1]) as manager:
        print("ready", flush=True)
        for line in sys.stdin:
            owner, key_id = line.split()
            t0 = time.time()
            ok = await manager.revoke(key_id, owner=owner)
            print(json.dumps({"ok": ok, "t0": t0, "t1": time.time()}), flush=True)

asyncio.run(main())
"""


class Revoker:
    """Another OS process revoking keys with ``KeyManager``: only NOTIFY can tell us."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._proc: anyio.abc.Process | None = None
        self._lines: BufferedByteReceiveStream | None = None

    async def __aenter__(self) -> Revoker:
        src = str(Path(keystile.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        self._proc = await anyio.open_process([sys.executable, "-c", _REVOKER, self.url], env=env)
        assert self._proc.stdout is not None
        self._lines = BufferedByteReceiveStream(self._proc.stdout)
        with anyio.fail_after(30):
            assert await self._lines.receive_until(b"\n", 4096) == b"ready"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        await self._proc.stdin.aclose()
        with anyio.fail_after(10):
            code = await self._proc.wait()
        await self._proc.aclose()
        assert code == 0

    async def send(self, key: CreatedKey) -> None:
        """Ask for ``key`` to be revoked (returns before the revoke happens)."""
        assert self._proc is not None and self._proc.stdin is not None
        await self._proc.stdin.send(f"{key.record.owner} {key.id}\n".encode())

    async def reply(self) -> dict[str, Any]:
        """``{"ok": revoked?, "t0": revoke() called, "t1": revoke() returned}``."""
        assert self._lines is not None
        with anyio.fail_after(5):
            reply: dict[str, Any] = json.loads(await self._lines.receive_until(b"\n", 4096))
        return reply


async def until_refused(c: httpx.AsyncClient, key: CreatedKey, timeout: float) -> float:
    """Poll with ``key`` until it answers 401; the time of that first 401."""
    with anyio.fail_after(timeout):
        while True:
            r = await get(c, key)
            if r.status_code == 401:
                assert r.json()["error"] == "invalid_token"
                return time.time()
            assert r.status_code == 200, r.text
            await anyio.sleep(0.001)


@asynccontextmanager
async def lifespan(app: APIKeyMiddleware) -> AsyncIterator[None]:
    """Drive the ASGI lifespan protocol as a server does: startup, the block, shutdown."""
    to_app, app_receives = anyio.create_memory_object_stream[Message](4)
    app_sends, from_app = anyio.create_memory_object_stream[Message](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with anyio.create_task_group() as tg, to_app, app_receives, app_sends, from_app:
        tg.start_soon(app, scope, app_receives.receive, app_sends.send)
        await to_app.send({"type": "lifespan.startup"})
        with anyio.fail_after(10):
            assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        yield
        await to_app.send({"type": "lifespan.shutdown"})
        with anyio.fail_after(15):
            assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"


# -- batched last_used_at -------------------------------------------------------------


async def test_requests_over_many_keys_are_written_in_one_update_statement(
    postgres_database_url: str, schema: str, raw: asyncpg.Connection
) -> None:
    """1000 requests over 20 keys: one UPDATE statement per flush, latest time per key."""
    keys = await make_keys(postgres_database_url, 20)
    await count_update_statements(raw, schema)
    rng = random.Random(3)
    latest: dict[str, tuple[float, float]] = {}
    async with middleware(PostgresKeyStore(postgres_database_url), flush_interval=3600) as app:
        async with client(app) as c:
            for i in range(1000):
                key = keys[i] if i < len(keys) else rng.choice(keys)
                latest[key.id] = await timed_get(c, key)
        assert app.stats().pending_touches == 20
        assert await update_statements(raw, schema) == 0  # nothing on the request path

        await app.recorder.flush()

        assert app.stats().flushes == 1
        assert app.stats().touches_written == 20
        assert await update_statements(raw, schema) == 1
    assert await update_statements(raw, schema) == 1  # the shutdown flush had nothing left
    written = await last_used(raw, schema, keys)
    for key in keys:
        assert_within(written[key.id], latest[key.id])


# -- revocation across processes --------------------------------------------------------


async def test_revocation_in_another_process_reaches_two_middlewares_by_notify(
    postgres_database_url: str, raw: asyncpg.Connection
) -> None:
    """20 revokes from another process each turn both middlewares' cache hits into 401 fast."""
    keys = await make_keys(postgres_database_url, 20)
    stores = [PostgresKeyStore(postgres_database_url) for _ in range(2)]
    # A TTL no test outlives: only an eviction (NOTIFY) can make a cached key fail.
    async with (
        middleware(stores[0], cache_ttl=3600) as first,
        middleware(stores[1], cache_ttl=3600) as second,
        client(first) as c1,
        client(second) as c2,
    ):
        for c in (c1, c2):  # the first request starts each middleware's listener
            assert (await get(c, keys[0])).status_code == 200
        await until_listening(raw, stores[0], first, second)
        with anyio.fail_after(5):
            while len(await listener_pids(raw, stores[0])) != 2:
                await anyio.sleep(0.01)
        for c in (c1, c2):
            for key in keys:
                assert (await get(c, key)).status_code == 200
        assert first.stats().cache_size == second.stats().cache_size == 20
        hits = second.stats().cache_hits

        called: list[float] = []  # revoke() called there -> both answer 401 here
        returned: list[float] = []  # revoke() returned there -> both answer 401 here
        async with Revoker(postgres_database_url) as revoker:
            for key in keys:
                await revoker.send(key)
                flipped = max(
                    await until_refused(c2, key, timeout=10.0),
                    await until_refused(c1, key, timeout=10.0),
                )
                reply = await revoker.reply()
                assert reply["ok"] is True
                called.append(flipped - reply["t0"])
                returned.append(flipped - reply["t1"])
        assert second.stats().cache_hits > hits  # it answered from the cache until evicted
    ms = sorted(x * 1000 for x in called)
    ms_after = sorted(x * 1000 for x in returned)
    print(
        f"\nrevocation across processes, n={len(ms)}: revoke() called -> both middlewares 401"
        f" median {statistics.median(ms):.1f} ms, worst {ms[-1]:.1f} ms;"
        f" revoke() returned -> 401 median {statistics.median(ms_after):.1f} ms,"
        f" worst {ms_after[-1]:.1f} ms"
    )


async def test_listener_reconnect_rereads_cached_state_and_keeps_hearing_revocations(
    postgres_database_url: str, raw: asyncpg.Connection
) -> None:
    """A terminated LISTEN backend is replaced, cached state is re-read, later revokes land."""
    first, second = await make_keys(postgres_database_url, 2)
    store = PostgresKeyStore(postgres_database_url, listen_reconnect_max=0.5)
    async with middleware(store, cache_ttl=3600) as app, client(app) as c:
        assert (await get(c, first)).status_code == 200
        await until_listening(raw, store, app)
        assert (await get(c, first)).status_code == 200
        assert (await get(c, second)).status_code == 200
        [old] = await listener_pids(raw, store)
        resets = app.stats().cache_resets
        assert app.stats().cache_size == 2

        assert await raw.fetchval("SELECT pg_terminate_backend($1, 5000)", old)

        with anyio.fail_after(5):
            while app.stats().cache_resets == resets:
                await anyio.sleep(0.01)
        refreshes = app.stats().state_refreshes
        assert (await listener_pids(raw, store)) not in ([], [old])
        assert (await get(c, second)).status_code == 200
        # State may have changed while nobody listened: it was read again, argon2 was not.
        assert app.stats().state_refreshes > refreshes
        assert app.stats().argon2_verifications == 2
        async with Revoker(postgres_database_url) as revoker:
            await revoker.send(second)
            await until_refused(c, second, timeout=1.0)
            assert (await revoker.reply())["ok"] is True
        assert (await get(c, first)).status_code == 200


# -- outages ----------------------------------------------------------------------------


async def test_outage_serves_cached_keys_refuses_misses_and_keeps_touches(
    postgres_url: str, postgres_database_url: str, schema: str, raw: asyncpg.Connection
) -> None:
    """With Postgres cut off: hits 200, misses 503 + Retry-After, touches written on return."""
    cached, uncached = await make_keys(postgres_database_url, 2)
    async with running_proxy(postgres_url) as proxy:
        store = PostgresKeyStore(
            proxy.url(postgres_database_url),
            connect_timeout=1.0,
            command_timeout=1.0,
            listen_reconnect_max=0.2,
        )
        async with middleware(store, flush_interval=0.2) as app, client(app) as c:
            await timed_get(c, cached)  # starts the listener
            await until_listening(raw, store, app)
            await timed_get(c, cached)  # cached while the listener is up

            await proxy.cut()

            for _ in range(5):
                last = await timed_get(c, cached)
            for _ in range(3):
                r = await get(c, uncached)
                assert r.status_code == 503, r.text
                assert r.headers["Retry-After"] == "1"
                assert r.json()["error"] == "temporarily_unavailable"
                assert "authenticated" not in r.json()  # the app never ran
            with anyio.fail_after(5):
                while app.stats().flush_failures == 0:
                    await anyio.sleep(0.01)
            # Read with no await since the failure was counted: the batch was put back.
            assert app.stats().pending_touches == 1
            outage_value = (await last_used(raw, schema, [cached]))[cached.id]
            assert outage_value is None or outage_value.timestamp() < last[0]
            flushes = app.stats().flushes

            await proxy.restore()

            with anyio.fail_after(10):
                while app.stats().flushes == flushes:
                    await anyio.sleep(0.01)
            assert app.stats().pending_touches == 0
            assert_within((await last_used(raw, schema, [cached]))[cached.id], last)
            assert (await get(c, uncached)).status_code == 200
            assert app.stats().rejects.get("store_unavailable", 0) == 3


async def test_shutdown_while_postgres_is_up_writes_every_pending_touch(
    postgres_database_url: str, schema: str, raw: asyncpg.Connection
) -> None:
    """Lifespan shutdown flushes what is pending: every used key gets its latest time."""
    keys = await make_keys(postgres_database_url, 5)
    store = PostgresKeyStore(postgres_database_url)
    latest: dict[str, tuple[float, float]] = {}
    try:
        app = protect(store, flush_interval=3600)
        async with lifespan(app):
            async with client(app) as c:
                for _ in range(3):
                    for key in keys:
                        latest[key.id] = await timed_get(c, key)
            assert app.stats().pending_touches == len(keys)
            assert set((await last_used(raw, schema, keys)).values()) == {None}
    finally:
        await store.close()
    assert app.stats().pending_touches == 0
    written = await last_used(raw, schema, keys)
    for key in keys:
        assert_within(written[key.id], latest[key.id])


async def test_store_unreachable_at_startup_answers_503_never_500_or_pass() -> None:
    """With no database at all, presented keys get 503 with Retry-After, never the app."""
    store = PostgresKeyStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=0.5)
    key, _ = generate_key("ks")
    async with middleware(store) as app, client(app) as c:
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            r = await c.get("/whoami", headers=headers)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"] == "temporarily_unavailable"
            assert "authenticated" not in r.json()
        assert app.stats().rejects == {"store_unavailable": 2}
