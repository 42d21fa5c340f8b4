"""An open WebSocket closes when its key stops being valid: real uvicorn on 127.0.0.1, a
real WebSocket client (the ``websockets`` package), both of uvicorn's WebSocket stacks.

uvicorn serves in the test's event loop, so a change made here goes through the store's
in-process bus as in an app that revokes its own keys; a change made by the ``keystile``
CLI in a child process arrives by SQLite's change log or Postgres ``NOTIFY``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager, KeyStore
from keystile.stores import store_from_url
from socket_apps import Clocks, Inner, listening

pytestmark = pytest.mark.anyio

WS_STACKS = ["websockets-sansio", "wsproto"]


@asynccontextmanager
async def serving(app: APIKeyMiddleware, ws: str = "auto") -> AsyncIterator[str]:
    """uvicorn serving ``app`` on 127.0.0.1 in this event loop; its ``ws://`` base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, ws=ws, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(15):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await anyio.sleep(0.01)
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        with anyio.fail_after(15):
            await task
        sock.close()


@asynccontextmanager
async def socket_to(
    base: str, key: CreatedKey, path: str = "/echo"
) -> AsyncIterator[ClientConnection]:
    async with connect(base + path, additional_headers={"X-API-Key": key.key}) as ws:
        yield ws


async def echo(ws: ClientConnection, text: str) -> str:
    await ws.send(text)
    with anyio.fail_after(10):
        answer = await ws.recv()
    assert isinstance(answer, str)
    return answer


async def closed_by_keystile(ws: ClientConnection, send: str | None = "after") -> tuple[int, str]:
    """Send ``send`` (if any) and return the close code and reason the server sent."""
    if send is not None:
        await ws.send(send)
    with anyio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None, "the server sent no close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.fixture
def inner() -> Iterator[Inner]:
    inner = Inner()
    yield inner
    inner.feed_in.close()
    inner.feed.close()


@pytest.fixture
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing logged at ERROR by uvicorn or keystile while the test runs."""
    with caplog.at_level(logging.WARNING):
        yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def open_store(url: str) -> KeyStore:
    store = store_from_url(url)
    await store.open()
    return store


@pytest.mark.parametrize("ws_stack", WS_STACKS)
async def test_healthy_socket_keeps_working_under_uvicorn(
    sqlite_database_url: str, inner: Inner, ws_stack: str, no_server_errors: None
) -> None:
    """Many messages on a socket whose key stays valid all come back, with no store read."""
    store = await open_store(sqlite_database_url)
    key = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="k")
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS)
    try:
        async with serving(app, ws_stack) as base, socket_to(base, key) as ws:
            assert await echo(ws, "warm") == "warm"
            reads = app.stats().state_refreshes
            for i in range(300):
                assert await echo(ws, f"m{i}") == f"m{i}"
            assert app.stats().state_refreshes == reads
    finally:
        await store.close()


@pytest.mark.parametrize("ws_stack", WS_STACKS)
async def test_revoke_in_process_closes_the_socket_with_1008(
    sqlite_database_url: str, inner: Inner, ws_stack: str, no_server_errors: None
) -> None:
    """A revoke made in the serving process closes the key's open socket with 1008
    ``invalid_token`` at its next message; the app never gets that message."""
    store = await open_store(sqlite_database_url)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    key = await manager.create(owner="acme", name="k")
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS)
    try:
        async with serving(app, ws_stack) as base, socket_to(base, key) as ws:
            assert await echo(ws, "before") == "before"
            await manager.revoke(key.id, owner="acme")
            assert await closed_by_keystile(ws) == (1008, "invalid_token")
    finally:
        await store.close()
    assert inner.ended == [("disconnect", 1008)]


@pytest.mark.parametrize("ws_stack", WS_STACKS)
async def test_push_only_socket_is_closed_with_1008_under_uvicorn(
    sqlite_database_url: str, inner: Inner, ws_stack: str, no_server_errors: None
) -> None:
    """A socket the app only pushes on closes with 1008 at the app's next send after the
    key is disabled; what the app sent then never arrives."""
    store = await open_store(sqlite_database_url)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    key = await manager.create(owner="acme", name="k")
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS)
    try:
        async with serving(app, ws_stack) as base, socket_to(base, key, "/push") as ws:
            await inner.feed_in.send("first")
            with anyio.fail_after(10):
                assert await ws.recv() == "first"
            await manager.disable(key.id, owner="acme")
            await inner.feed_in.send("secret")
            assert await closed_by_keystile(ws, send=None) == (1008, "invalid_token")
    finally:
        await store.close()
    assert inner.ended == [("send refused", 1006)]


async def test_expiry_closes_the_socket_under_uvicorn(
    sqlite_database_url: str, inner: Inner, no_server_errors: None
) -> None:
    """The first message after the key's ``expires_at`` closes its socket with 1008."""
    store = await open_store(sqlite_database_url)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    key = await manager.create(owner="acme", name="k", expires_in=timedelta(minutes=10))
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS)
    clocks = Clocks(app)
    try:
        async with serving(app) as base, socket_to(base, key) as ws:
            clocks.advance(590)
            assert await echo(ws, "still") == "still"
            clocks.advance(20)
            assert await closed_by_keystile(ws) == (1008, "invalid_token")
    finally:
        await store.close()
    assert app.stats().rejects == {"expired": 1}


async def revoked_by_another_process(url: str, inner: Inner) -> None:
    """The ``keystile revoke`` CLI in a child process; the socket open here closes with
    1008 at its first message after the change reached this process."""
    store = await open_store(url)
    key = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="k")
    # A TTL no test outlives: only the change arriving from the other process can count.
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS, cache_ttl=3600)
    heard = anyio.Event()
    unsubscribe = store.subscribe(lambda key_id: heard.set() if key_id == key.id else None)
    try:
        async with serving(app) as base, socket_to(base, key) as ws:
            assert await echo(ws, "before") == "before"
            await listening(app)
            cli = [sys.executable, "-m", "keystile.cli", "--database-url", url]
            done = await anyio.run_process([*cli, "revoke", key.id, "--owner", "acme"], check=False)
            assert done.returncode == 0, done.stderr
            with anyio.fail_after(30):
                await heard.wait()
            assert await closed_by_keystile(ws) == (1008, "invalid_token")
    finally:
        unsubscribe()
        await store.close()
    assert inner.ended == [("disconnect", 1008)]


async def test_revoke_in_another_process_arrives_by_the_sqlite_change_log(
    sqlite_database_url: str, inner: Inner, no_server_errors: None
) -> None:
    """SQLite: a revoke by another process closes the socket once the change log relays it."""
    await revoked_by_another_process(sqlite_database_url, inner)


@pytest.mark.postgres
async def test_revoke_in_another_process_arrives_by_notify(
    postgres_database_url: str, inner: Inner, no_server_errors: None
) -> None:
    """Postgres: a revoke by another process closes the socket once its NOTIFY arrives."""
    await revoked_by_another_process(postgres_database_url, inner)
