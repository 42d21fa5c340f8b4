"""Faults against real stores.

* SIGTERM to a real uvicorn with ``last_used_at`` touches pending: all are written
  (SQLite and Postgres);
* a flush that fails again and again on a real Postgres (its table renamed away: every
  UPDATE is an SQL error), then succeeds: no touch lost, the newest time per key wins;
* the store failing on a miss, on a real SQLite file (its table renamed away by another
  connection): misses 503 with ``Retry-After``, cached keys still 200;
* a wall clock that jumps: expiry follows the wall clock, both on a hit and on a miss;
  cache TTL and idle eviction follow the monotonic clock; ``last_used_at`` never moves
  backwards.

Listener loss and reconnect, a Postgres outage through a cut TCP proxy (hits 200, misses
503, touches kept) and the lifespan shutdown flush are in ``test_postgres_integration.py``
(``test_listener_reconnect_rereads_cached_state_and_keeps_hearing_revocations``,
``test_outage_serves_cached_keys_refuses_misses_and_keeps_touches``,
``test_shutdown_while_postgres_is_up_writes_every_pending_touch``).
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from apps import client, protect
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager
from keystile.stores import store_from_url
from keystile.tokens import generate_key
from pgtools import until_listening
from servers import uvicorn_server

pytestmark = pytest.mark.anyio

#: Stores keep microseconds; a timestamp may round by one.
ROUNDING = 1e-6


async def mint(url: str, n: int, **options: Any) -> list[CreatedKey]:
    async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
        return [await manager.create(owner="acme", name=f"k{i}", **options) for i in range(n)]


async def last_used(url: str, keys: Sequence[CreatedKey]) -> dict[str, datetime | None]:
    """``last_used_at`` per key, read by a store of its own (as an operator would)."""
    async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
        return {k.id: (await manager.get(k.id, owner="acme")).last_used_at for k in keys}


def assert_within(at: datetime | None, bounds: tuple[float, float]) -> None:
    """``at`` was taken during the request whose wall-clock bounds are ``bounds``."""
    assert at is not None
    assert bounds[0] - ROUNDING <= at.timestamp() <= bounds[1] + ROUNDING, (at, bounds)


async def timed_get(c: httpx.AsyncClient, key: CreatedKey) -> tuple[float, float]:
    """One request that must succeed; its wall-clock bounds."""
    before = time.time()
    r = await c.get("/whoami", headers={"X-API-Key": key.key})
    after = time.time()
    assert r.status_code == 200, r.text
    return before, after


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Poll ``condition()`` (bounded), for background work to reach a state."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def real_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    url: str = request.getfixturevalue("postgres_database_url")
    return url


# -- shutdown -------------------------------------------------------------------------------


async def test_sigterm_to_uvicorn_writes_every_pending_touch(
    real_database_url: str, tmp_path: Path
) -> None:
    """SIGTERM to uvicorn with an hour-long flush interval: every key's latest use is written."""
    keys = await mint(real_database_url, 8)
    latest: dict[str, tuple[float, float]] = {}
    with uvicorn_server(real_database_url, tmp_path / "server.log", flush_interval=3600) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as c:
            for _ in range(3):
                for key in keys:
                    latest[key.id] = await timed_get(c, key)
        stats = server.stats()
        assert (stats["pending_touches"], stats["flushes"]) == (len(keys), 0)
        assert set((await last_used(real_database_url, keys)).values()) == {None}

        code = server.terminate()

    # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit.
    assert code in (0, -signal.SIGTERM), server.output()
    written = await last_used(real_database_url, keys)
    for key in keys:
        assert_within(written[key.id], latest[key.id])


# -- a flush that keeps failing ------------------------------------------------------------


@pytest.mark.postgres
async def test_flush_failing_repeatedly_then_succeeding_loses_no_touch(
    postgres_database_url: str,
) -> None:
    """Every UPDATE fails (table renamed away) for several retries; once back, the newest
    use of every key is written, including uses made while it was failing."""
    from keystile.stores.postgres import PostgresKeyStore

    keys = await mint(postgres_database_url, 3)
    store = PostgresKeyStore(postgres_database_url)
    dsn, _, schema = postgres_database_url.partition("?schema=")
    table = f'"{schema}".keystile_keys'
    raw = await asyncpg.connect(dsn)
    app = protect(store, flush_interval=0.05)
    latest: dict[str, tuple[float, float]] = {}
    try:
        async with client(app) as c:
            await timed_get(c, keys[0])  # starts the listener
            await until_listening(raw, store, app)
            for key in keys:
                latest[key.id] = await timed_get(c, key)
            await raw.execute(f"ALTER TABLE {table} RENAME TO keystile_keys_away")
            failures = app.stats().flush_failures
            for round_ in range(1, 4):  # keep using two keys between failed retries
                await until(lambda n=round_: app.stats().flush_failures >= failures + n)
                for key in keys[:2]:
                    latest[key.id] = await timed_get(c, key)
            assert app.stats().pending_touches >= 2  # kept, merged with newer uses
            flushes = app.stats().flushes

            await raw.execute(f'ALTER TABLE "{schema}".keystile_keys_away RENAME TO keystile_keys')

            await until(lambda: app.stats().flushes > flushes and not app.stats().pending_touches)
    finally:
        await app.aclose()
        await store.close()
        await raw.close()
    written = await last_used(postgres_database_url, keys)
    for key in keys:
        assert_within(written[key.id], latest[key.id])


# -- the store failing on a miss ---------------------------------------------------------


async def test_sqlite_store_failing_on_a_miss_is_503_while_hits_stay_200(
    sqlite_database_url: str,
) -> None:
    """With the key table gone from under a real SQLite store: misses 503, hits 200."""
    cached, uncached = await mint(sqlite_database_url, 2)
    path = sqlite_database_url.removeprefix("sqlite:///")
    store = store_from_url(sqlite_database_url)
    app = protect(store)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        async with client(app) as c:
            await timed_get(c, cached)
            other.execute("ALTER TABLE keystile_keys RENAME TO keystile_keys_away")

            misses = [
                await c.get("/whoami", headers={"X-API-Key": token})
                for token in (uncached.key, generate_key()[0])
            ]
            hits = [await c.get("/whoami", headers={"X-API-Key": cached.key}) for _ in range(5)]
            malformed = await c.get("/whoami", headers={"X-API-Key": cached.key[:-1] + "!"})

            other.execute("ALTER TABLE keystile_keys_away RENAME TO keystile_keys")
            after = await c.get("/whoami", headers={"X-API-Key": uncached.key})
    finally:
        other.close()
        await app.aclose()
        await store.close()
    for r in misses:
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "temporarily_unavailable"
        assert "key_id" not in r.json()  # the app never ran
    assert [r.status_code for r in hits] == [200] * 5
    assert all(r.json()["key_id"] == cached.id for r in hits)
    assert malformed.status_code == 401  # no store needed to refuse it
    assert after.status_code == 200
    assert app.stats().rejects["store_unavailable"] == 2


# -- clocks that jump ------------------------------------------------------------------------


class WallClock:
    """The wall clock as keystile reads it, with an offset a test can jump."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


class Monotonic:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall() -> WallClock:
    """The wall clock of the request path (expiry on a hit and a miss, touches) via the
    verifier's ``clock`` seam."""
    return WallClock()


@pytest.fixture
async def clocked(
    sqlite_database_url: str, wall: WallClock
) -> AsyncIterator[tuple[APIKeyMiddleware, Monotonic]]:
    store = store_from_url(sqlite_database_url)
    app = protect(store, cache_ttl=60, cache_idle=600, flush_interval=3600)
    monotonic = Monotonic()
    app.verifier.clock = wall.time
    app.verifier.monotonic = monotonic
    yield app, monotonic
    await app.aclose()
    await store.close()


async def test_wall_clock_jump_past_expiry_refuses_cached_and_uncached_keys(
    sqlite_database_url: str, clocked: tuple[APIKeyMiddleware, Monotonic], wall: WallClock
) -> None:
    """Jumping the wall clock past expires_at refuses the key, cached or not; back, it works."""
    app, _ = clocked
    cached, uncached = await mint(sqlite_database_url, 2, expires_in=timedelta(hours=1))
    async with client(app) as c:
        await timed_get(c, cached)
        wall.offset = 2 * 3600.0
        hit = await c.get("/whoami", headers={"X-API-Key": cached.key})
        miss = await c.get("/whoami", headers={"X-API-Key": uncached.key})
        wall.offset = 0.0
        back = await c.get("/whoami", headers={"X-API-Key": cached.key})
    for r in (hit, miss):
        assert r.status_code == 401
        assert r.json()["detail"] == "The API key has expired."
    assert back.status_code == 200
    assert app.stats().cache_hits == 2


@pytest.mark.parametrize("jump", [-86_400.0, 86_400.0])
async def test_wall_clock_jump_does_not_move_ttl_or_idle_eviction(
    sqlite_database_url: str,
    clocked: tuple[APIKeyMiddleware, Monotonic],
    wall: WallClock,
    jump: float,
) -> None:
    """A day's wall-clock jump either way: still a hit, no state re-read, nothing idle."""
    app, monotonic = clocked
    [key] = await mint(sqlite_database_url, 1)
    async with client(app) as c:
        await timed_get(c, key)
        before = app.stats()
        wall.offset = jump
        monotonic.now += 1.0
        await timed_get(c, key)
        assert app.verifier.evict_idle() == 0
        after = app.stats()
        monotonic.now += 601.0  # the monotonic clock is the one that ages entries
        assert app.verifier.evict_idle() == 1
    assert after.cache_hits == before.cache_hits + 1
    assert after.state_refreshes == before.state_refreshes
    assert after.argon2_verifications == before.argon2_verifications


async def test_wall_clock_jump_back_never_moves_last_used_at_backwards(
    sqlite_database_url: str, clocked: tuple[APIKeyMiddleware, Monotonic], wall: WallClock
) -> None:
    """A use written at T, then a use stamped a day earlier: the store keeps T."""
    app, _ = clocked
    [key] = await mint(sqlite_database_url, 1)
    async with client(app) as c:
        first = await timed_get(c, key)
        assert await app.recorder.flush() == 1
        wall.offset = -86_400.0
        await timed_get(c, key)
        assert await app.recorder.flush() == 1
    assert_within((await last_used(sqlite_database_url, [key]))[key.id], first)
