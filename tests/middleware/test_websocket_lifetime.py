"""An open WebSocket lives only as long as its key: checked at every message, either way.

Each socket here is driven over raw ASGI in the test's own event loop, as a server does,
so the verifier's clocks can be moved instead of waiting, and the store is the same object
the middleware reads (memory, SQLite and Postgres through ``database_url``). The same
behaviour under a real uvicorn and a real WebSocket client is in
``test_websocket_uvicorn.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from apps import client
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    CreatedKey,
    KeyManager,
    KeyStore,
    MemoryKeyStore,
    StoreError,
)
from keystile.stores import store_from_url
from socket_apps import Clocks, Inner, listening

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


class Socket:
    """The client end of one WebSocket over ASGI."""

    def __init__(
        self, to_app: MemoryObjectSendStream[Any], from_app: MemoryObjectReceiveStream[Any]
    ) -> None:
        self._to_app = to_app
        self._from_app = from_app

    async def send(self, text: str) -> None:
        await self._to_app.send({"type": "websocket.receive", "text": text})

    async def receive(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            message: dict[str, Any] = await self._from_app.receive()
        return message

    async def echo(self, text: str) -> dict[str, Any]:
        await self.send(text)
        return await self.receive()


@asynccontextmanager
async def open_socket(
    app: APIKeyMiddleware, key: str, path: str = "/echo"
) -> AsyncIterator[Socket]:
    """An accepted WebSocket to ``path`` with ``key`` as ``X-API-Key``."""
    to_app, app_in = anyio.create_memory_object_stream[Any](100)
    app_out, from_app = anyio.create_memory_object_stream[Any](100)
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "subprotocols": [],
    }

    async def serve() -> None:
        await app(scope, app_in.receive, app_out.send)
        await app_out.send({"type": "app ended"})

    async with to_app, app_in, app_out, from_app, anyio.create_task_group() as tg:
        tg.start_soon(serve)
        socket = Socket(to_app, from_app)
        await to_app.send({"type": "websocket.connect"})
        accepted = await socket.receive()
        assert accepted["type"] == "websocket.accept", accepted
        yield socket
        await to_app.send({"type": "websocket.disconnect", "code": 1000})
        with anyio.fail_after(10):
            while (await from_app.receive())["type"] != "app ended":
                pass


def assert_closed(message: dict[str, Any], code: int, reason: str) -> None:
    assert message == {"type": "websocket.close", "code": code, "reason": reason}


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[KeyStore]:
    store = store_from_url(database_url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def manager(store: KeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS)


@pytest.fixture
async def key(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="socket")


@pytest.fixture
def inner() -> Iterator[Inner]:
    inner = Inner()
    yield inner
    inner.feed_in.close()
    inner.feed.close()


@pytest.fixture
async def app(store: KeyStore, inner: Inner) -> AsyncIterator[APIKeyMiddleware]:
    middleware = APIKeyMiddleware(
        inner.app, store=store, argon2=CHEAPEST_PARAMETERS, exempt_paths=["/public/*"]
    )
    yield middleware
    await middleware.aclose()


# -- a healthy socket -------------------------------------------------------------------


async def test_healthy_socket_keeps_working_without_store_reads(
    store: KeyStore, key: CreatedKey, inner: Inner, hit_path: str
) -> None:
    """A socket whose key stays valid answers message after message, opened on a cache
    miss or a cache hit, and its checks read no store."""
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS)
    assert app.verifier.cache.compiled == (hit_path == "compiled")
    try:
        async with open_socket(app, key.key) as first, open_socket(app, key.key) as second:
            await listening(app)
            for socket in (first, second):
                assert (await socket.echo("warm"))["text"] == "warm"
            reads = app.stats().state_refreshes
            for i in range(200):
                for socket in (first, second):
                    answer = await socket.echo(f"m{i}")
                    assert answer == {"type": "websocket.send", "text": f"m{i}"}
            assert app.stats().state_refreshes == reads
    finally:
        await app.aclose()
    assert inner.ended == [("disconnect", 1000), ("disconnect", 1000)]
    assert app.stats().cache_hits >= 1


# -- state changes in this process ------------------------------------------------------


async def test_revoked_key_closes_its_socket_at_the_next_message(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager, inner: Inner
) -> None:
    """Revoking the key closes its open socket with 1008 at the next message; the message
    never reaches the app, which sees a disconnect."""
    async with open_socket(app, key.key) as socket:
        assert (await socket.echo("before"))["text"] == "before"
        assert await manager.revoke(key.id, owner="acme")
        assert_closed(await socket.echo("after"), POLICY_VIOLATION, "invalid_token")
    assert inner.ended == [("disconnect", POLICY_VIOLATION)]
    assert app.stats().rejects == {"revoked": 1}


async def test_disabled_key_closes_its_socket(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager, inner: Inner
) -> None:
    """Disabling the key closes its open socket with 1008 at the next message."""
    async with open_socket(app, key.key) as socket:
        assert (await socket.echo("before"))["text"] == "before"
        await manager.disable(key.id, owner="acme")
        assert_closed(await socket.echo("after"), POLICY_VIOLATION, "invalid_token")
    assert inner.ended == [("disconnect", POLICY_VIOLATION)]
    assert app.stats().rejects == {"disabled": 1}


async def test_evict_alone_keeps_the_socket(
    app: APIKeyMiddleware, key: CreatedKey, inner: Inner
) -> None:
    """A change that leaves the key valid (an operator's evict) costs one store read and
    the socket stays open."""
    async with open_socket(app, key.key) as socket:
        await listening(app)
        assert (await socket.echo("warm"))["text"] == "warm"
        app.evict(key.id)
        reads = app.stats().state_refreshes
        for i in range(20):
            assert (await socket.echo(f"m{i}"))["text"] == f"m{i}"
        assert app.stats().state_refreshes == reads + 1
    assert inner.ended == [("disconnect", 1000)]


async def test_after_a_reset_one_store_read_serves_every_socket_of_the_key(
    app: APIKeyMiddleware, key: CreatedKey, inner: Inner
) -> None:
    """When every cached state is made stale (a listener reconnect), the first socket of a
    key to get a message reads the key and puts the state back in the cache: its other
    sockets, and its HTTP requests, read nothing more."""
    async with open_socket(app, key.key) as first, open_socket(app, key.key) as second:
        await listening(app)
        for socket in (first, second):
            assert (await socket.echo("warm"))["text"] == "warm"
        reads = app.stats().state_refreshes
        app.verifier.on_change(None)
        for socket in (first, second, first, second):
            assert (await socket.echo("again"))["text"] == "again"
        async with client(app) as c:
            assert (await c.get("/whoami", headers={"X-API-Key": key.key})).is_success
        assert app.stats().state_refreshes == reads + 1


async def test_push_only_socket_is_closed_at_its_next_send(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager, inner: Inner
) -> None:
    """A socket the app only sends on is closed at the app's next send after the key is
    revoked: the client gets 1008, the app a WebSocketDisconnect, the data never leaves."""
    async with open_socket(app, key.key, "/push") as socket:
        await inner.feed_in.send("first")
        assert await socket.receive() == {"type": "websocket.send", "text": "first"}
        await manager.revoke(key.id, owner="acme")
        await inner.feed_in.send("secret")
        assert_closed(await socket.receive(), POLICY_VIOLATION, "invalid_token")
    assert inner.ended == [("send refused", 1006)]


async def test_socket_on_an_exempt_path_closes_when_its_key_is_revoked(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager, inner: Inner
) -> None:
    """A socket opened with a key on an exempt path (the app saw the key) closes too."""
    async with open_socket(app, key.key, "/public/echo") as socket:
        assert (await socket.echo("before"))["text"] == "before"
        await manager.revoke(key.id, owner="acme")
        assert_closed(await socket.echo("after"), POLICY_VIOLATION, "invalid_token")
    assert inner.ended == [("disconnect", POLICY_VIOLATION)]


# -- expiry -----------------------------------------------------------------------------


async def test_socket_closes_at_the_first_message_after_expiry(
    app: APIKeyMiddleware, manager: KeyManager, inner: Inner
) -> None:
    """A key's ``expires_at`` is checked at each message: the first one after it closes."""
    clocks = Clocks(app)
    expiring = await manager.create(owner="acme", name="short", expires_in=timedelta(hours=1))
    async with open_socket(app, expiring.key) as socket:
        clocks.advance(3590)
        assert (await socket.echo("still"))["text"] == "still"
        clocks.advance(20)
        assert_closed(await socket.echo("late"), POLICY_VIOLATION, "invalid_token")
    assert inner.ended == [("disconnect", POLICY_VIOLATION)]
    assert app.stats().rejects == {"expired": 1}


async def test_expiry_set_while_open_is_kept(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager, inner: Inner
) -> None:
    """An expiry given to the key while its socket is open (an update, a rotation's grace)
    is read at the next message and closes the socket once it has passed."""
    clocks = Clocks(app)
    async with open_socket(app, key.key) as socket:
        soon = datetime.now(timezone.utc) + timedelta(minutes=5)
        await manager.update(key.id, owner="acme", expires_at=soon)
        assert (await socket.echo("still"))["text"] == "still"
        clocks.advance(301)
        assert_closed(await socket.echo("late"), POLICY_VIOLATION, "invalid_token")
    assert inner.ended == [("disconnect", POLICY_VIOLATION)]


# -- eviction and outages -----------------------------------------------------------------


async def test_key_evicted_for_room_keeps_its_socket(
    store: KeyStore, key: CreatedKey, manager: KeyManager, inner: Inner
) -> None:
    """A key pushed out of a full cache (not a state change) keeps its socket: after
    ``cache_ttl`` one store read confirms it; a revocation still closes it."""
    app = APIKeyMiddleware(
        inner.app, store=store, argon2=CHEAPEST_PARAMETERS, cache_max_size=1, cache_ttl=60
    )
    clocks = Clocks(app)
    other = await manager.create(owner="acme", name="other")
    try:
        async with open_socket(app, key.key) as socket:
            await listening(app)
            assert (await socket.echo("warm"))["text"] == "warm"
            async with client(app) as c:
                assert (await c.get("/whoami", headers={"X-API-Key": other.key})).is_success
            assert key.id not in {entry.key_id for entry in app.verifier.cache}
            reads = app.stats().state_refreshes
            assert (await socket.echo("fresh"))["text"] == "fresh"
            assert app.stats().state_refreshes == reads
            clocks.advance(61)
            for i in range(5):
                assert (await socket.echo(f"m{i}"))["text"] == f"m{i}"
            assert app.stats().state_refreshes == reads + 1
            await manager.revoke(key.id, owner="acme")
            assert_closed(await socket.echo("after"), POLICY_VIOLATION, "invalid_token")
    finally:
        await app.aclose()


class FailingStore(MemoryKeyStore):
    """A memory store whose reads fail while ``down``."""

    down = False

    async def get(self, key_id: str) -> Any:
        if self.down:
            raise StoreError("connection refused")
        return await super().get(key_id)

    async def get_many(self, key_ids: Any) -> Any:
        if self.down:
            raise StoreError("connection refused")
        return await super().get_many(key_ids)


async def test_store_outage_keeps_the_socket_within_stale_if_error_then_closes_1013(
    inner: Inner,
) -> None:
    """With the store down, a socket stays open while its key's state is within
    ``cache_ttl + stale_if_error``, as a cached key works over HTTP; past that it closes
    with 1013 (try again later), not 1008."""
    store = FailingStore()
    key = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="k")
    app = APIKeyMiddleware(
        inner.app, store=store, argon2=CHEAPEST_PARAMETERS, cache_ttl=60, stale_if_error=300
    )
    clocks = Clocks(app)
    try:
        async with open_socket(app, key.key) as socket:
            store.down = True
            clocks.advance(61)
            assert (await socket.echo("stale"))["text"] == "stale"
            clocks.advance(200)
            assert (await socket.echo("stale"))["text"] == "stale"
            clocks.advance(100)
            closed = await socket.echo("too stale")
            assert_closed(closed, TRY_AGAIN_LATER, "temporarily_unavailable")
    finally:
        await app.aclose()
    assert inner.ended == [("disconnect", TRY_AGAIN_LATER)]
    assert app.stats().stale_served >= 2


async def test_change_heard_while_the_store_is_down_closes_1013(inner: Inner) -> None:
    """A change of the key heard while its state cannot be read closes the socket with
    1013: keystile cannot tell that the key is still valid."""
    store = FailingStore()
    key = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="k")
    app = APIKeyMiddleware(inner.app, store=store, argon2=CHEAPEST_PARAMETERS)
    try:
        async with open_socket(app, key.key) as socket:
            store.down = True
            app.evict(key.id)
            closed = await socket.echo("after")
            assert_closed(closed, TRY_AGAIN_LATER, "temporarily_unavailable")
    finally:
        await app.aclose()
