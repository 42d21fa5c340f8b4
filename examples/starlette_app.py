"""A Starlette app behind keystile: public, authenticated and scoped routes, logout, stats.

The same shape as ``fastapi_app.py``, with Starlette's own ``request.user``,
``request.auth`` and ``@requires``. From the repository root, either::

    python examples/starlette_app.py     # mints a demo key on the first run and prints it
    uvicorn examples.starlette_app:app   # serves keys made with the keystile CLI

then ``curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/whoami``. The database
is ``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``, the ``keystile`` CLI's default,
so keys made with ``keystile create`` work here.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keystile import APIKeyMiddleware, KeyManager, revoke_presented

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")
DEMO_OWNER, DEMO_NAME = "demo", "demo"
DEMO_SCOPES = ["items:read", "items:write", "admin"]


def create_app(database_url: str = DATABASE_URL, **options: Any) -> Starlette:
    items: dict[str, list[dict[str, str]]] = {}

    async def public(request: Request) -> JSONResponse:
        return JSONResponse(
            {"hello": "world", "try": "GET /whoami with 'Authorization: Bearer <key>'"}
        )

    async def whoami(request: Request) -> JSONResponse:
        key = request.user
        return JSONResponse(
            {"id": key.key_id, "owner": key.owner, "name": key.name, "scopes": key.scopes}
        )

    @requires("items:read")
    async def list_items(request: Request) -> JSONResponse:
        return JSONResponse(items.get(request.user.owner, []))

    @requires("items:write")
    async def create_item(request: Request) -> JSONResponse:
        body = await request.json()
        item = {"name": str(body["name"])}
        items.setdefault(request.user.owner, []).append(item)
        return JSONResponse(item, status_code=201)

    async def logout(request: Request) -> JSONResponse:
        return JSONResponse({"revoked": await revoke_presented(request)})

    @requires("admin")
    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(request.scope["keystile"].stats().as_dict())

    app = Starlette(
        routes=[
            Route("/public", public),
            Route("/whoami", whoami),
            Route("/items", list_items, methods=["GET"]),
            Route("/items", create_item, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/stats", stats),
        ]
    )
    app.add_middleware(
        APIKeyMiddleware, database_url=database_url, exempt_paths=["/public"], **options
    )
    return app


app = create_app()


async def ensure_demo_key(database_url: str) -> str | None:
    """Mint the demo key on the first run and return it; ``None`` if it already exists."""
    async with KeyManager.from_url(database_url) as manager:
        keys = await manager.list(DEMO_OWNER)
        if any(k.name == DEMO_NAME and k.is_active() for k in keys):
            return None
        created = await manager.create(owner=DEMO_OWNER, name=DEMO_NAME, scopes=DEMO_SCOPES)
        return created.key


if __name__ == "__main__":
    import uvicorn

    demo_key = asyncio.run(ensure_demo_key(DATABASE_URL))
    if demo_key is None:
        print(f"Using the demo key printed when it was made ({DATABASE_URL}).")
    else:
        print(f"Demo key (shown once, scopes {' '.join(DEMO_SCOPES)}):\n\n    {demo_key}\n")
    uvicorn.run(app, host="127.0.0.1", port=8000)
