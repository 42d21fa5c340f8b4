"""A FastAPI app protected in one line: public, authenticated and scoped routes, logout, stats.

From the repository root, either::

    python examples/fastapi_app.py     # mints a demo key on the first run and prints it
    uvicorn examples.fastapi_app:app   # serves keys made with the keystile CLI

then ``curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/whoami``, or open
http://127.0.0.1:8000/docs, paste the key under *Authorize* (either field) and try any
route: ``protect()`` leaves the docs open and declares the key on every other route. The database is
``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``, the ``keystile`` CLI's default, so
keys made with ``keystile create`` work here.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

from keystile import KeyManager, revoke_presented
from keystile.fastapi import APIKey, CurrentKey, OptionalKey, protect, require_scopes

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")
DEMO_OWNER, DEMO_NAME = "demo", "demo"
DEMO_SCOPES = ["items:read", "items:write", "admin"]


class Item(BaseModel):
    name: str


def create_app(database_url: str = DATABASE_URL, **options: Any) -> FastAPI:
    app = FastAPI(title="keystile FastAPI example")
    protect(app, database_url=database_url, exempt_paths=["/public"], **options)
    items: dict[str, list[Item]] = {}

    @app.get("/public")
    async def public(key: OptionalKey) -> dict[str, str]:
        """No key needed; a valid key sent here is recognised all the same."""
        hello = key.display_name if key else "world"
        return {"hello": hello, "try": "GET /whoami with 'Authorization: Bearer <key>'"}

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, Any]:
        return {"id": key.key_id, "owner": key.owner, "name": key.name, "scopes": key.scopes}

    @app.get("/items")
    async def list_items(
        key: Annotated[APIKey, Depends(require_scopes("items:read"))],
    ) -> list[Item]:
        return items.get(key.owner, [])

    @app.post("/items", status_code=201)
    async def create_item(
        item: Item, key: Annotated[APIKey, Depends(require_scopes("items:write"))]
    ) -> Item:
        items.setdefault(key.owner, []).append(item)
        return item

    @app.post("/logout")
    async def logout(request: Request, key: CurrentKey) -> dict[str, bool]:
        return {"revoked": await revoke_presented(request)}

    @app.get("/stats", dependencies=[Depends(require_scopes("admin"))])
    async def stats(request: Request) -> dict[str, Any]:
        return request.scope["keystile"].stats().as_dict()  # type: ignore[no-any-return]

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
