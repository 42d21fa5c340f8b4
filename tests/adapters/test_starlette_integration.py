"""Starlette parity: request.user, request.auth and ``@requires`` over keystile's scopes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from apps import client, installed_middleware, load_example
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    APIKeyUser,
    CreatedKey,
    KeyManager,
    MemoryKeyStore,
)

pytestmark = pytest.mark.anyio


@requires("read")
async def read(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.user.key_id})


@requires(["read", "write"])
async def read_write(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "principal": type(request.user).__name__,
            "display_name": request.user.display_name,
            "authenticated": request.user.is_authenticated,
            "scopes": request.auth.scopes,
        }
    )


@requires("read")
async def read_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"id": websocket.user.key_id})
    await websocket.close()


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/read", read),
            Route("/read-write", read_write),
            Route("/whoami", whoami),
            WebSocketRoute("/ws", read_ws),
        ]
    )


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
def manager(store: MemoryKeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS)


@pytest.fixture
async def reader(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="reader", scopes=["read"])


@pytest.fixture
async def nobody(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="nobody", scopes=[])


@pytest.fixture
async def app(store: MemoryKeyStore) -> AsyncIterator[APIKeyMiddleware]:
    middleware = APIKeyMiddleware(starlette_app(), store=store, argon2=CHEAPEST_PARAMETERS)
    yield middleware
    await middleware.aclose()


@pytest.fixture
async def anonymous_app(store: MemoryKeyStore) -> AsyncIterator[APIKeyMiddleware]:
    middleware = APIKeyMiddleware(
        starlette_app(), store=store, argon2=CHEAPEST_PARAMETERS, required=False
    )
    yield middleware
    await middleware.aclose()


def bearer(created: CreatedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {created.key}"}


async def test_request_user_and_auth_are_starlettes(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """request.user is the APIKeyUser; request.auth.scopes are "authenticated" and the
    key's scopes, as Starlette's own backends set them."""
    async with client(app) as c:
        r = await c.get("/whoami", headers=bearer(reader))
    assert r.json() == {
        "principal": APIKeyUser.__name__,
        "display_name": "apikey:reader",
        "authenticated": True,
        "scopes": ["authenticated", "read"],
    }


async def test_requires_admits_a_key_with_the_scope(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """@requires("read") lets a key holding "read" through."""
    async with client(app) as c:
        r = await c.get("/read", headers=bearer(reader))
    assert r.status_code == 200
    assert r.json() == {"id": reader.id}


async def test_requires_refuses_a_key_without_the_scope(
    app: APIKeyMiddleware, nobody: CreatedKey
) -> None:
    """@requires("read") answers Starlette's own plain 403 to a key without "read"."""
    async with client(app) as c:
        r = await c.get("/read", headers=bearer(nobody))
    assert r.status_code == 403
    assert "www-authenticate" not in r.headers


async def test_requires_needs_every_scope(app: APIKeyMiddleware, reader: CreatedKey) -> None:
    """@requires(["read", "write"]) refuses a key holding only "read"."""
    async with client(app) as c:
        r = await c.get("/read-write", headers=bearer(reader))
    assert r.status_code == 403


async def test_requires_refuses_anonymous_requests(anonymous_app: APIKeyMiddleware) -> None:
    """With required=False an anonymous request reaches @requires and gets 403."""
    async with client(anonymous_app) as c:
        anonymous = await c.get("/whoami")
        refused = await c.get("/read")
    assert anonymous.json()["authenticated"] is False
    assert refused.status_code == 403


async def test_requires_admits_a_websocket_with_the_scope(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """@requires("read") on a websocket route accepts a key holding "read"."""
    with TestClient(app) as c, c.websocket_connect("/ws", headers=bearer(reader)) as ws:
        assert ws.receive_json() == {"id": reader.id}


async def test_requires_closes_a_websocket_without_the_scope(
    app: APIKeyMiddleware, nobody: CreatedKey
) -> None:
    """@requires("read") on a websocket route closes the connection for a key without it."""
    with (
        TestClient(app) as c,
        pytest.raises(WebSocketDisconnect),
        c.websocket_connect("/ws", headers=bearer(nobody)),
    ):
        pass  # pragma: no cover


# -- the example ------------------------------------------------------------------------


async def test_starlette_example_end_to_end() -> None:
    """The example app: public, whoami, scoped items, admin stats, logout."""
    example = load_example("starlette_app")
    database_url = f"memory://starlette-example-{uuid.uuid4().hex}"
    app = example.create_app(database_url, argon2=CHEAPEST_PARAMETERS)
    manager = KeyManager(MemoryKeyStore(database_url.split("://")[1]), argon2=CHEAPEST_PARAMETERS)
    scopes = ["items:read", "items:write", "admin"]
    key = (await manager.create(owner="demo", name="demo", scopes=scopes)).key
    reader = (await manager.create(owner="demo", name="reader", scopes=["items:read"])).key
    auth = {"Authorization": f"Bearer {key}"}
    async with client(app) as c:
        assert (await c.get("/public")).status_code == 200
        assert (await c.get("/whoami")).status_code == 401
        whoami = await c.get("/whoami", headers=auth)
        assert whoami.json()["scopes"] == scopes
        assert (await c.post("/items", json={"name": "apple"}, headers=auth)).status_code == 201
        items = await c.get("/items", headers={"X-API-Key": reader})
        assert items.json() == [{"name": "apple"}]
        denied = await c.post("/items", json={"name": "pear"}, headers={"X-API-Key": reader})
        assert denied.status_code == 403
        assert (await c.get("/stats", headers={"X-API-Key": reader})).status_code == 403
        stats = await c.get("/stats", headers=auth)
        assert stats.json()["cache_hits"] >= 1
        assert (await c.post("/logout", headers=auth)).json() == {"revoked": True}
        assert (await c.get("/whoami", headers=auth)).status_code == 401
    await installed_middleware(app).aclose()
