"""A Quart app behind keystile: public, authenticated and scoped routes, and a WebSocket.

Quart has no authentication layer of its own to plug into, so handlers read what the
middleware verified from the ASGI scope: ``request.scope["user"]`` is the
``APIKeyUser`` (``websocket.scope["user"]`` on a WebSocket) and
``request.scope["auth"].scopes`` its scopes, ``"authenticated"`` first. From the
repository root, either::

    python examples/quart_app.py       # mints a demo key on the first run and prints it
    uvicorn examples.quart_app:app     # serves keys made with the keystile CLI

The database is ``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``, the
``keystile`` CLI's default, so keys made with ``keystile create`` work here.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from quart import Quart, abort, request, websocket

from keystile import APIKeyMiddleware, APIKeyUser, KeyManager

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")
DEMO_OWNER, DEMO_NAME = "demo", "demo"
DEMO_SCOPES = ["items:read", "items:write"]


def current_key() -> APIKeyUser:
    """The key the middleware verified for this request."""
    key: APIKeyUser = request.scope["user"]
    return key


def create_app(database_url: str = DATABASE_URL, **options: Any) -> Quart:
    app = Quart(__name__)
    items: dict[str, list[str]] = {}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/whoami")
    async def whoami() -> dict[str, Any]:
        key = current_key()
        return {"key": key.display_name, "scopes": request.scope["auth"].scopes}

    @app.post("/items")
    async def create_item() -> tuple[dict[str, str], int]:
        key = current_key()
        if not key.has_scopes("items:write"):
            abort(403)
        name = str((await request.get_json())["name"])
        items.setdefault(key.owner, []).append(name)
        return {"created": name}, 201

    @app.websocket("/ws")
    async def ws() -> None:
        key: APIKeyUser = websocket.scope["user"]
        await websocket.send_json({"key": key.display_name})

    # The middleware wraps Quart's ASGI app; `app` stays the Quart object. It also sees
    # the lifespan, so shutdown writes the pending last_used_at updates.
    app.asgi_app = APIKeyMiddleware(  # type: ignore[method-assign]
        app.asgi_app, database_url=database_url, exempt_paths=["/health"], **options
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
