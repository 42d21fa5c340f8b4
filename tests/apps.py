"""A small protected Starlette app for the tests, and a client that drives it over ASGI."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyStore


async def whoami(request: Request) -> JSONResponse:
    user = request.user
    return JSONResponse(
        {
            "authenticated": user.is_authenticated,
            "display_name": user.display_name,
            "key_id": getattr(user, "key_id", None),
            "owner": getattr(user, "owner", None),
            "scopes": request.auth.scopes,
            "headers": sorted(request.headers.keys()),
        }
    )


@requires("write")
async def write(request: Request) -> JSONResponse:
    return JSONResponse({"written": True})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"display_name": websocket.user.display_name})
    await websocket.close()


def inner_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/public", whoami),
            Route("/static/logo", whoami),
            Route("/write", write, methods=["GET", "POST", "OPTIONS"]),
            WebSocketRoute("/ws", ws),
        ]
    )


def protect(store: KeyStore, **options: Any) -> APIKeyMiddleware:
    """The test app wrapped directly, so tests hold the middleware instance."""
    options.setdefault("argon2", CHEAPEST_PARAMETERS)
    return APIKeyMiddleware(inner_app(), store=store, **options)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"keystile_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_middleware(app: Any) -> APIKeyMiddleware:
    """The APIKeyMiddleware instance inside an app built with ``add_middleware``."""
    node = app.middleware_stack
    while not isinstance(node, APIKeyMiddleware):
        node = node.app
    return node


def keys_page_app(database_url: str, path: str, pages: Any, **options: Any) -> Starlette:
    """``pages`` (the management API or the admin page) mounted at ``path``, exempt from
    the middleware, beside ``GET /whoami`` (the display name of the key that called it)."""

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"key": request.user.display_name})

    app = Starlette(routes=[Mount(path, pages), Route("/whoami", whoami)])
    app.add_middleware(
        APIKeyMiddleware,
        database_url=database_url,
        exempt_paths=[f"{path}/*", *options.pop("exempt_paths", [])],
        argon2=CHEAPEST_PARAMETERS,
        **options,
    )
    return app
