"""A Litestar app behind keystile: public, authenticated and scoped routes, stats, OpenAPI.

``KeystilePlugin`` installs the middleware, documents the bearer and ``X-API-Key``
schemes in the OpenAPI schema (``/schema``, which needs no key), and writes the pending
``last_used_at`` at shutdown. Guards read the key the middleware verified. From the
repository root, either::

    python examples/litestar_app.py      # mints a demo key on the first run and prints it
    uvicorn examples.litestar_app:app    # serves keys made with the keystile CLI

then ``curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/whoami``. The database
is ``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``, the ``keystile`` CLI's default,
so keys made with ``keystile create`` work here.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from litestar import Litestar, Request, get, post

from keystile import APIKeyUser, KeyManager
from keystile.litestar import KeystilePlugin, require_scopes

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")
DEMO_OWNER, DEMO_NAME = "demo", "demo"
DEMO_SCOPES = ["items:read", "items:write", "admin"]

KeyRequest = Request[APIKeyUser, Any, Any]


def create_app(database_url: str = DATABASE_URL, **options: Any) -> Litestar:
    items: dict[str, list[dict[str, str]]] = {}

    @get("/public")
    async def public() -> dict[str, str]:
        return {"hello": "world", "try": "GET /whoami with 'Authorization: Bearer <key>'"}

    @get("/whoami")
    async def whoami(request: KeyRequest) -> dict[str, Any]:
        key = request.user
        return {"id": key.key_id, "owner": key.owner, "name": key.name, "scopes": key.scopes}

    @get("/items", guards=[require_scopes("items:read")])
    async def list_items(request: KeyRequest) -> list[dict[str, str]]:
        return items.get(request.user.owner, [])

    @post("/items", guards=[require_scopes("items:write")])
    async def create_item(request: KeyRequest) -> dict[str, str]:
        body = await request.json()
        item = {"name": str(body["name"])}
        items.setdefault(request.user.owner, []).append(item)
        return item

    @get("/stats", guards=[require_scopes("admin")])
    async def stats(request: KeyRequest) -> dict[str, Any]:
        return request.scope["keystile"].stats().as_dict()

    return Litestar(
        route_handlers=[public, whoami, list_items, create_item, stats],
        plugins=[KeystilePlugin(database_url=database_url, exempt_paths=["/public"], **options)],
    )


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
