"""The minimal apps every section measures, bare and protected, and a direct ASGI caller.

Protected apps are ``APIKeyMiddleware(app, store=MemoryKeyStore(), ...)`` with N keys put
straight into the verified-key cache (``fill_cache``: no store rows, no argon2), so every
measured request is a cache hit. ``cache_ttl`` and ``cache_idle`` are an hour, so no state
refresh (which would not find these synthetic keys in the store) happens mid-run.
"""

from __future__ import annotations

from typing import Any

from common import fill_cache
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, MemoryKeyStore
from keystile.cache import VerifiedKeyCache

__all__ = [
    "BENCH_HEADERS",
    "FloorMiddleware",
    "call_once",
    "fastapi_app",
    "http_scope",
    "protect",
    "starlette_app",
]

#: What a typical HTTP/1.1 client sends besides the key.
BENCH_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"keystile-bench/1.0"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
]


async def _ping(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/ping", _ping)])


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


def protect(app: ASGIApp, n_keys: int) -> tuple[APIKeyMiddleware, bytes]:
    """``app`` behind keystile with ``n_keys`` cached keys; returns it and the middle token."""
    middleware = APIKeyMiddleware(
        app,
        store=MemoryKeyStore(),
        argon2=CHEAPEST_PARAMETERS,
        cache_ttl=3600.0,
        cache_idle=3600.0,
        cache_max_size=max(n_keys, 1),
    )
    tokens = fill_cache(middleware.verifier.cache, n_keys)
    return middleware, tokens[len(tokens) // 2]


class FloorMiddleware:
    """The least any middleware with keystile's cache can do on a hit, as a yardstick:
    find the ``Authorization`` header, digest + constant-time scan, set the user. No
    validation, no failure handling, no usage recording, no header stripping: not a
    usable middleware, only the floor under keystile's overhead."""

    def __init__(self, app: ASGIApp, cache: VerifiedKeyCache) -> None:
        self.app = app
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    token = value[7:]
            entry = self.cache.lookup(self.cache.digest(token), 0.0)
            if entry is None:
                raise RuntimeError("the floor middleware only measures hits")
            scope["user"] = entry.user
            scope["auth"] = AuthCredentials(entry.auth_scopes)
        await self.app(scope, receive, send)


def http_scope(path: str, token: bytes) -> dict[str, Any]:
    """A fresh-able HTTP scope template (copy it per call: the middleware writes to it)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [*BENCH_HEADERS, (b"authorization", b"Bearer " + token)],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def call_once(app: ASGIApp, scope: dict[str, Any]) -> tuple[int, bytes]:
    """One request, checked: the status and body."""
    status = 0
    body = b""

    async def send(message: Message) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(dict(scope), _receive, send)
    return status, body
