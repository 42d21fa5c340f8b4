"""CORS preflights: without a key, only a CORS preflight answer ever reaches the client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from apps import client
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager, MemoryKeyStore

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example.com"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}


class Calls:
    """What the app's handlers were asked to do, so a test can prove none of them ran."""

    def __init__(self) -> None:
        self.handled: list[str] = []


def build_app(calls: Calls, store: MemoryKeyStore, *, cors: str | None) -> Starlette:
    """A Starlette app with the handlers a preflight must never reach without a key:
    a mounted raw ASGI app (a metrics exporter), a raw ASGI route, and a route that
    accepts OPTIONS itself. ``cors`` puts CORSMiddleware ``outside`` or ``inside``."""

    async def metrics(scope: Scope, receive: Receive, send: Send) -> None:
        calls.handled.append("metrics")
        await PlainTextResponse("secret_metric 42")(scope, receive, send)

    async def items(request: Request) -> JSONResponse:
        calls.handled.append(f"items:{request.method}")
        return JSONResponse({"items": ["private"]})

    keystile = Middleware(APIKeyMiddleware, store=store, argon2=CHEAPEST_PARAMETERS)
    cors_mw = Middleware(
        CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["*"], allow_headers=["*"]
    )
    middleware = {
        None: [keystile],
        "outside": [cors_mw, keystile],
        "inside": [keystile, cors_mw],
    }[cors]
    return Starlette(
        routes=[
            Route("/items", items, methods=["GET", "POST", "OPTIONS"]),
            Mount("/metrics", app=metrics),
        ],
        middleware=middleware,
    )


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
async def key(store: MemoryKeyStore) -> CreatedKey:
    return await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="web")


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
async def plain_app(calls: Calls, store: MemoryKeyStore) -> AsyncIterator[Starlette]:
    yield build_app(calls, store, cors=None)


@pytest.mark.parametrize("path", ["/metrics", "/metrics/anything", "/items"])
async def test_preflight_without_cors_middleware_is_refused(
    plain_app: Starlette, calls: Calls, path: str
) -> None:
    """With no CORS responder inside, a preflight without a key gets the 401 and runs no handler."""
    async with client(plain_app) as c:
        r = await c.options(path, headers=PREFLIGHT)
    assert r.status_code == 401
    assert "secret_metric" not in r.text and "private" not in r.text
    assert calls.handled == []


@pytest.mark.parametrize("cors", ["outside", "inside"])
async def test_options_without_origin_is_not_a_preflight(
    calls: Calls, store: MemoryKeyStore, cors: str
) -> None:
    """OPTIONS with Access-Control-Request-Method but no Origin needs a key, in either order."""
    app = build_app(calls, store, cors=cors)
    async with client(app) as c:
        mounted = await c.options("/metrics", headers={"Access-Control-Request-Method": "GET"})
        route = await c.options("/items", headers={"Access-Control-Request-Method": "POST"})
    assert (mounted.status_code, route.status_code) == (401, 401)
    assert "secret_metric" not in mounted.text and "private" not in route.text
    assert calls.handled == []


@pytest.mark.parametrize("cors", ["outside", "inside"])
async def test_real_preflight_is_answered_by_cors_middleware(
    calls: Calls, store: MemoryKeyStore, cors: str
) -> None:
    """A real preflight gets CORSMiddleware's answer with CORSMiddleware in either order."""
    app = build_app(calls, store, cors=cors)
    async with client(app) as c:
        r = await c.options("/items", headers=PREFLIGHT)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert calls.handled == []


@pytest.mark.parametrize("cors", ["outside", "inside"])
async def test_cross_origin_request_with_key_works(
    calls: Calls, store: MemoryKeyStore, key: CreatedKey, cors: str
) -> None:
    """After the preflight, the real request with a key reaches the route with CORS headers."""
    app = build_app(calls, store, cors=cors)
    async with client(app) as c:
        r = await c.post("/items", headers={"Origin": ORIGIN, "X-API-Key": key.key})
        anonymous = await c.post("/items", headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert anonymous.status_code == 401
    assert calls.handled == ["items:POST"]


async def test_non_cors_answer_to_a_preflight_is_replaced(
    calls: Calls, store: MemoryKeyStore
) -> None:
    """A CORS responder that lets a preflight through to the app: the app's answer, which
    carries no CORS preflight headers, becomes the 401 and its body is discarded."""

    class PassThroughCORS(CORSMiddleware):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await self.app(scope, receive, send)

    async def metrics(scope: Scope, receive: Receive, send: Send) -> None:
        calls.handled.append("metrics")
        await PlainTextResponse("secret_metric 42")(scope, receive, send)

    inner = PassThroughCORS(metrics, allow_origins=[ORIGIN])
    app = APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS)
    async with client(app) as c:
        r = await c.options("/metrics", headers=PREFLIGHT)
    await app.aclose()
    assert r.status_code == 401
    assert "secret_metric" not in r.text
    assert r.json()["error"] == "unauthorized"


async def test_preflight_refused_when_disabled(calls: Calls, store: MemoryKeyStore) -> None:
    """allow_preflight=False refuses even a real preflight without a key."""
    inner = CORSMiddleware(PlainTextResponse("app"), allow_origins=[ORIGIN], allow_methods=["*"])
    app = APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS, allow_preflight=False)
    async with client(app) as c:
        r = await c.options("/anything", headers=PREFLIGHT)
    await app.aclose()
    assert r.status_code == 401
