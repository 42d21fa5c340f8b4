"""The app ``keystile demo`` serves: one public route and one protected by a key."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .middleware import APIKeyMiddleware

__all__ = ["create_demo_app"]


async def index(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "service": "keystile demo",
            "try": "GET /whoami with 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        }
    )


async def whoami(request: Request) -> JSONResponse:
    user = request.user
    return JSONResponse(
        {
            "key_id": user.identity,
            "display_name": user.display_name,
            "owner": getattr(user, "owner", None),
            "scopes": request.auth.scopes,
        }
    )


def create_demo_app(database_url: str, **options: Any) -> Starlette:
    app = Starlette(routes=[Route("/", index), Route("/whoami", whoami)])
    app.add_middleware(APIKeyMiddleware, database_url=database_url, exempt_paths=["/"], **options)
    return app
