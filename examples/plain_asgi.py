"""A plain ASGI app behind keystile: no framework, only the scope.

The middleware puts the verified key in ``scope["user"]`` (an ``APIKeyUser``) and its
scopes in ``scope["auth"].scopes``; on an exempt path without a key ``scope["user"]`` is
Starlette's ``UnauthenticatedUser``. The app answers the lifespan protocol, so the
middleware in front of it hears startup and shutdown, and shutdown writes the pending
``last_used_at`` updates. From the repository root::

    uvicorn examples.plain_asgi:application

The database is ``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``, the
``keystile`` CLI's default, so keys made with ``keystile create`` work here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from keystile import APIKeyMiddleware

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    user = scope["user"]
    if user.is_authenticated:
        answer = {"key": user.display_name, "owner": user.owner, "scopes": scope["auth"].scopes}
    else:
        answer = {"key": None}
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


application = APIKeyMiddleware(app, database_url=DATABASE_URL, exempt_paths=["/health"])
