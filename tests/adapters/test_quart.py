"""Quart behind keystile: ``app.asgi_app = APIKeyMiddleware(app.asgi_app, ...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from quart import Quart, websocket
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError

from apps import client, load_example
from docblocks import INTEGRATION, block_under, mint, run_block
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager

pytestmark = pytest.mark.anyio


async def make_key(database_url: str, *scopes: str) -> str:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name="bot", scopes=list(scopes))
    return created.key


def example_app(database_url: str, **options: Any) -> Quart:
    app: Quart = load_example("quart_app").create_app(
        database_url, argon2=CHEAPEST_PARAMETERS, **options
    )
    return app


async def test_handler_reads_the_key_from_request_scope(sqlite_database_url: str) -> None:
    """A Quart handler finds the verified key in request.scope["user"] and its scopes."""
    key = await make_key(sqlite_database_url, "items:read")
    app = example_app(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/whoami", headers={"Authorization": f"Bearer {key}"})
    await app.asgi_app.aclose()
    assert answer.json() == {"key": "apikey:bot", "scopes": ["authenticated", "items:read"]}


async def test_request_without_a_key_is_refused_before_quart(sqlite_database_url: str) -> None:
    """Without a key keystile answers its 401; an exempt path still answers without one."""
    app = example_app(sqlite_database_url)
    async with client(app) as c:
        refused = await c.get("/whoami")
        health = await c.get("/health")
    await app.asgi_app.aclose()
    assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


async def test_handler_checks_a_scope(sqlite_database_url: str) -> None:
    """The example's scope check: a key without items:write gets 403, one with it 201."""
    reader = await make_key(sqlite_database_url, "items:read")
    async with KeyManager.from_url(sqlite_database_url, argon2=CHEAPEST_PARAMETERS) as keys:
        writer = (await keys.create(owner="acme", name="w", scopes=["items:write"])).key
    app = example_app(sqlite_database_url)
    async with client(app) as c:
        refused = await c.post("/items", json={"name": "tea"}, headers={"X-API-Key": reader})
        created = await c.post("/items", json={"name": "tea"}, headers={"X-API-Key": writer})
    await app.asgi_app.aclose()
    assert refused.status_code == 403
    assert (created.status_code, created.json()) == (201, {"created": "tea"})


async def test_websocket_reads_the_key_from_its_scope(sqlite_database_url: str) -> None:
    """A Quart WebSocket handler finds the key in websocket.scope["user"]."""
    key = await make_key(sqlite_database_url)
    app = example_app(sqlite_database_url)
    async with (
        app.test_app() as running,
        running.test_client().websocket("/ws", headers={"X-API-Key": key}) as ws,
    ):
        message = await ws.receive_json()
    assert message == {"key": "apikey:bot"}


async def test_websocket_without_a_key_is_closed_1008(sqlite_database_url: str) -> None:
    """A WebSocket handshake without a key is closed with 1008 before Quart accepts it."""
    app = example_app(sqlite_database_url)
    async with app.test_app() as running:
        with pytest.raises(WebsocketDisconnectError) as closed:
            async with running.test_client().websocket("/ws") as ws:
                await ws.receive_json()
    assert closed.value.args[0] == 1008


async def test_quart_lifespan_flushes_last_used_at(sqlite_database_url: str) -> None:
    """Quart passes the lifespan through the middleware: shutdown writes last_used_at."""
    key = await make_key(sqlite_database_url)
    app = example_app(sqlite_database_url, flush_interval=3600)
    async with app.test_app() as running:  # lifespan startup ... shutdown
        answer = await running.test_client().get("/whoami", headers={"X-API-Key": key})
        pending = app.asgi_app.stats().pending_touches
    async with KeyManager.from_url(sqlite_database_url) as keys:
        record = (await keys.list("acme"))[0]
    assert (answer.status_code, pending) == (200, 1)
    assert record.last_used_at is not None


async def test_docs_quart_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Quart section's app: the key in request.scope, 401 without one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    key = await mint(scopes=["items:read"])
    app = run_block(block_under(INTEGRATION, "Quart"))["app"]
    async with client(app) as c:
        me = await c.get("/whoami", headers={"X-API-Key": key})
        anonymous = await c.get("/whoami")
    await app.asgi_app.aclose()
    assert me.json() == {"key": "apikey:laptop", "scopes": ["authenticated", "items:read"]}
    assert anonymous.status_code == 401


# -- keystile.quart: current_key() and require_scopes ---------------------------------


def adapter_app(database_url: str) -> Quart:
    """A Quart app using keystile.quart's helpers, /open exempt."""
    from keystile.quart import current_key, require_scopes

    app = Quart(__name__)

    @app.get("/me")
    async def me() -> dict[str, str]:
        return {"key": current_key().display_name}

    @app.get("/open/me")
    async def open_me() -> dict[str, str]:
        return {"key": current_key().display_name}

    @app.post("/items")
    @require_scopes("items:write")
    async def create_item() -> tuple[dict[str, str], int]:
        return {"by": current_key().display_name}, 201

    @app.get("/sync")
    @require_scopes("items:read")
    def sync_handler() -> str:
        return "sync"

    @app.websocket("/ws")
    @require_scopes("items:write")
    async def ws() -> None:
        await websocket.send_json({"key": current_key().display_name})

    @app.websocket("/open/ws")
    async def open_ws() -> None:
        await websocket.send_json({"key": current_key().display_name})

    app.asgi_app = APIKeyMiddleware(  # type: ignore[method-assign]
        app.asgi_app,
        database_url=database_url,
        argon2=CHEAPEST_PARAMETERS,
        exempt_paths=["/open/me", "/open/ws"],
    )
    return app


async def test_current_key_returns_the_verified_key(sqlite_database_url: str) -> None:
    """current_key() is the key the middleware verified for the request."""
    key = await make_key(sqlite_database_url, "items:read")
    app = adapter_app(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/me", headers={"X-API-Key": key})
        synced = await c.get("/sync", headers={"X-API-Key": key})
    await app.asgi_app.aclose()
    assert answer.json() == {"key": "apikey:bot"}
    assert (synced.status_code, synced.text) == (200, "sync")


async def test_require_scopes_refuses_as_the_middleware(sqlite_database_url: str) -> None:
    """A key without the scope gets 403 insufficient_scope with the middleware's body,
    challenge and Cache-Control, and the refusal is counted."""
    key = await make_key(sqlite_database_url, "items:read")
    app = adapter_app(sqlite_database_url)
    async with client(app) as c:
        refused = await c.post("/items", headers={"X-API-Key": key})
    stats = app.asgi_app.stats()
    await app.asgi_app.aclose()
    assert refused.status_code == 403
    assert refused.json() == {
        "error": "insufficient_scope",
        "detail": "Missing scope: items:write.",
        "required_scopes": ["items:write"],
        "missing_scopes": ["items:write"],
    }
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["cache-control"] == "no-store"
    assert refused.headers["www-authenticate"].endswith('scope="items:write"')
    assert stats.rejects["insufficient_scope"] == 1


async def test_current_key_without_a_key_is_the_middlewares_401(sqlite_database_url: str) -> None:
    """On an exempt path, current_key() without a key answers what the middleware
    answers a request without a key."""
    app = adapter_app(sqlite_database_url)
    async with client(app) as c:
        middleware = await c.get("/me")
        adapter = await c.get("/open/me")
    await app.asgi_app.aclose()
    assert adapter.status_code == middleware.status_code == 401
    assert adapter.json() == middleware.json()
    assert adapter.headers["www-authenticate"] == middleware.headers["www-authenticate"]


async def test_require_scopes_closes_a_websocket_1008(sqlite_database_url: str) -> None:
    """On a WebSocket, a key without the scope has its handshake closed with 1008."""
    key = await make_key(sqlite_database_url, "items:read")
    app = adapter_app(sqlite_database_url)
    async with app.test_app() as running:
        with pytest.raises(WebsocketDisconnectError) as closed:
            async with running.test_client().websocket("/ws", headers={"X-API-Key": key}) as ws:
                await ws.receive_json()
    assert closed.value.args[0] == 1008


async def test_current_key_refuses_a_websocket_without_a_key(sqlite_database_url: str) -> None:
    """On an exempt WebSocket path, current_key() without a key rejects the handshake
    with the middleware's 401."""
    app = adapter_app(sqlite_database_url)
    async with app.test_app() as running:
        with pytest.raises(WebsocketResponseError) as rejected:
            async with running.test_client().websocket("/open/ws") as ws:
                await ws.receive_json()
    assert rejected.value.response.status_code == 401


async def test_helpers_without_the_middleware_fail_closed() -> None:
    """Without APIKeyMiddleware in front, the helpers raise (a 500), never pass."""
    from keystile.quart import require_scopes

    app = Quart(__name__)

    @app.get("/items")
    @require_scopes("items:read")
    async def items() -> str:
        return "never"

    async with client(app) as c:
        answer = await c.get("/items")
    assert answer.status_code == 500


def test_require_scopes_needs_a_scope() -> None:
    """A decorator that requires nothing is a mistake, refused when the app is written."""
    from keystile.quart import require_scopes

    with pytest.raises(ValueError, match="at least one scope"):
        require_scopes()


def test_import_without_quart_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing keystile.quart without Quart says which extra to install."""
    import importlib
    import sys

    for name in [m for m in sys.modules if m == "quart" or m.startswith("quart.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "quart", None)
    monkeypatch.delitem(sys.modules, "keystile.quart", raising=False)
    with pytest.raises(ImportError, match=r'pip install "keystile\[quart\]"'):
        importlib.import_module("keystile.quart")
