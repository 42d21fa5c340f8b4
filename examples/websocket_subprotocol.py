"""A WebSocket whose key travels in the subprotocol, verified with ``runtime.verify``.

A browser's ``new WebSocket(url, protocols)`` cannot set an ``Authorization`` header; the
one thing it can send is the ``Sec-WebSocket-Protocol`` list. The page offers two
protocols, the app's (``chat.v1``) and the key as ``key.<key>``::

    new WebSocket("wss://api.example.com/chat", ["chat.v1", "key." + apiKey])

The socket's path is exempt from the middleware (it would look for a header), and the
route verifies the key itself with the middleware's runtime: the same cache, limits and
usage as a request's. It accepts with ``chat.v1`` only, so the key is never echoed back,
and checks the key again at every message (a cache hit: no argon2), so a revoked key's
socket is closed at its next message, as the middleware's own WebSockets are.

    uvicorn examples.websocket_subprotocol:app
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from keystile import APIKeyMiddleware, AuthenticationError
from keystile.errors import MissingCredentials
from keystile.responses import error_code

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")
APP_PROTOCOL = "chat.v1"
KEY_PROTOCOL = "key."
#: "Policy Violation": the close code of a refused key, as the middleware sends it.
POLICY_VIOLATION = 1008


def key_from_protocols(websocket: WebSocket) -> str | None:
    """The key offered as ``key.<key>`` in ``Sec-WebSocket-Protocol``, if any."""
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_PROTOCOL):
            return str(protocol[len(KEY_PROTOCOL) :])
    return None


async def chat(websocket: WebSocket) -> None:
    runtime = websocket.scope["keystile"].runtime
    token = key_from_protocols(websocket)
    try:
        if token is None:
            raise MissingCredentials()
        user = await runtime.verify(token, client=websocket.scope.get("client"))
    except AuthenticationError as exc:
        await websocket.close(code=POLICY_VIOLATION, reason=error_code(exc))
        return
    await websocket.accept(subprotocol=APP_PROTOCOL)
    try:
        while True:
            text = await websocket.receive_text()
            try:
                user = await runtime.verify(token, client=websocket.scope.get("client"))
            except AuthenticationError as exc:
                await websocket.close(code=POLICY_VIOLATION, reason=error_code(exc))
                return
            await websocket.send_json({"from": user.display_name, "echo": text})
    except WebSocketDisconnect:
        return


def create_app(database_url: str = DATABASE_URL, **options: Any) -> Starlette:
    app = Starlette(routes=[WebSocketRoute("/chat", chat)])
    app.add_middleware(
        APIKeyMiddleware, database_url=database_url, exempt_paths=["/chat"], **options
    )
    return app


app = create_app()
