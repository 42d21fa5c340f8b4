"""One error body: the same failure answered by any adapter (FastAPI, Litestar, DRF,
Quart) has the status, JSON body and headers the middleware sends for it.

Each framework's app has the same three routes: ``/scoped`` needs items:write (the key
sent holds items:read), ``/open/scoped`` is exempt and needs items:write, ``/open/me`` is
exempt and needs a key. The middleware's own 401 is its answer on ``/scoped`` without a
key; its 403 ``insufficient_scope`` is what it renders for that failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from starlette.requests import HTTPConnection

from apps import client, installed_middleware
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    AuthenticationError,
    KeyManager,
    KeyStore,
    MemoryKeyStore,
)
from keystile.errors import InsufficientScope
from keystile.fastapi import CurrentKey  # imported here: FastAPI resolves annotations here
from openapi_conformance import KEYSTILE_HEADERS

pytestmark = pytest.mark.anyio

EXEMPT = ["/open/scoped", "/open/me"]
OPTIONS: dict[str, Any] = {"argon2": CHEAPEST_PARAMETERS, "exempt_paths": EXEMPT}

Built = tuple[Any, Callable[[], APIKeyMiddleware]]


def fastapi_app(store: KeyStore) -> Built:
    from fastapi import Depends, FastAPI

    from keystile.fastapi import protect, require_scopes

    app = FastAPI()

    @app.get("/scoped", dependencies=[Depends(require_scopes("items:write"))])
    async def scoped() -> str:
        return "ok"

    @app.get("/open/scoped", dependencies=[Depends(require_scopes("items:write"))])
    async def open_scoped() -> str:
        return "ok"

    @app.get("/open/me")
    async def me(key: CurrentKey) -> str:
        return key.key_id

    protect(app, store=store, **OPTIONS)
    return app, lambda: installed_middleware(app)


def litestar_app(store: KeyStore) -> Built:
    from litestar import Litestar, get

    from keystile.litestar import KeystilePlugin, require_scopes

    @get("/scoped", guards=[require_scopes("items:write")], sync_to_thread=False)
    def scoped() -> str:
        return "ok"

    @get("/open/scoped", guards=[require_scopes("items:write")], sync_to_thread=False)
    def open_scoped() -> str:
        return "ok"

    @get("/open/me", guards=[require_scopes("authenticated")], sync_to_thread=False)
    def me() -> str:
        return "me"

    plugin = KeystilePlugin(store=store, **OPTIONS)
    app = Litestar([scoped, open_scoped, me], plugins=[plugin], logging_config=None)
    return app, lambda: plugin.middleware


def drf_app(store: KeyStore) -> Built:
    import django_settings

    django_settings.configure()
    from django.core.asgi import get_asgi_application

    middleware = APIKeyMiddleware(get_asgi_application(), store=store, **OPTIONS)
    return middleware, lambda: middleware


def quart_app(store: KeyStore) -> Built:
    from quart import Quart

    from keystile.quart import current_key, require_scopes

    app = Quart(__name__)

    @app.get("/scoped")
    @require_scopes("items:write")
    async def scoped() -> str:
        return "ok"

    @app.get("/open/scoped")
    @require_scopes("items:write")
    async def open_scoped() -> str:
        return "ok"

    @app.get("/open/me")
    async def me() -> str:
        return current_key().key_id

    middleware = APIKeyMiddleware(app.asgi_app, store=store, **OPTIONS)
    app.asgi_app = middleware  # type: ignore[method-assign]
    return app, lambda: middleware


FRAMEWORKS: dict[str, Callable[[KeyStore], Built]] = {
    "fastapi": fastapi_app,
    "litestar": litestar_app,
    "drf": drf_app,
    "quart": quart_app,
}


def seen(response: Any) -> tuple[int, Any, dict[str, str]]:
    """What a client sees of a refusal: status, JSON body, keystile's headers."""
    headers = {
        name: response.headers[name] for name in KEYSTILE_HEADERS if name in response.headers
    }
    return response.status_code, response.json(), headers


class Framework:
    """One framework's app over a store holding a key with items:read only."""

    def __init__(self, built: Built, reader: str) -> None:
        self.app, self._middleware = built
        self.reader = reader

    async def get(self, path: str, *, key: bool = False) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {self.reader}"} if key else {}
        async with client(self.app) as c:
            return seen(await c.get(path, headers=headers))

    def middleware_renders(self, refusal: AuthenticationError) -> tuple[int, Any, dict[str, str]]:
        """What the app's middleware sends for ``refusal``."""
        conn = HTTPConnection({"type": "http", "headers": []})
        rendered = self._middleware().default_on_error(conn, refusal)
        headers = {k: v for k, v in rendered.headers.items() if k in KEYSTILE_HEADERS}
        return rendered.status_code, json.loads(bytes(rendered.body)), headers

    async def aclose(self) -> None:
        await self._middleware().aclose()


@pytest.fixture(params=sorted(FRAMEWORKS))
async def framework(request: pytest.FixtureRequest) -> AsyncIterator[Framework]:
    store = MemoryKeyStore()
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    reader = (await manager.create(owner="acme", name="r", scopes=["items:read"])).key
    built = Framework(FRAMEWORKS[request.param](store), reader)
    yield built
    await built.aclose()


async def test_missing_scope_is_the_middlewares_403(framework: Framework) -> None:
    """A key without the scope gets the middleware's 403 insufficient_scope: same status,
    same body, same challenge and Cache-Control."""
    answer = await framework.get("/scoped", key=True)
    refusal = InsufficientScope(("items:write",), ("items:write",))
    assert answer == framework.middleware_renders(refusal)


async def test_scope_check_without_a_key_is_the_middlewares_401(framework: Framework) -> None:
    """A scope check reached without a key (an exempt path) answers as the middleware does
    to a request without a key."""
    expected = await framework.get("/scoped")
    assert expected[0] == 401
    assert await framework.get("/open/scoped") == expected


async def test_key_needed_without_a_key_is_the_middlewares_401(framework: Framework) -> None:
    """What the framework offers to need a key (CurrentKey, a guard, DRF's IsAuthenticated,
    current_key()) answers as the middleware does to a request without a key."""
    expected = await framework.get("/scoped")
    assert expected[0] == 401
    assert await framework.get("/open/me") == expected
