"""Two (or more) uvicorn workers behind one Postgres: a revoked key stops everywhere at once.

Every worker process builds this app, so every worker has its own ``APIKeyMiddleware``,
its own verified-key cache and its own ``LISTEN`` connection. A revoke from anywhere (the
CLI, another host) commits with a ``NOTIFY``; each worker evicts the key on hearing it.
See ``README.md`` next to this file; from the repository root::

    export KEYSTILE_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test
    uvicorn examples.multiworker.app:app --workers 2 --port 8001

``/whoami`` answers with the pid of the worker that served it, and every response, a
401 from the middleware included, carries that pid in ``X-Worker-Pid``.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystile import APIKeyMiddleware

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


class WorkerPidHeader:
    """Outermost layer: ``X-Worker-Pid`` on every HTTP response, so a 401 (answered by
    the middleware, never reaching a route) still says which worker sent it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-worker-pid", self.pid)]
            await send(message)

        await self.app(scope, receive, send_with_pid)


async def whoami(request: Request) -> JSONResponse:
    key = request.user
    return JSONResponse(
        {"worker_pid": os.getpid(), "key_id": key.key_id, "owner": key.owner, "name": key.name}
    )


app = Starlette(routes=[Route("/whoami", whoami)])
app.add_middleware(APIKeyMiddleware, database_url=DATABASE_URL)
app.add_middleware(WorkerPidHeader)  # added last: the outermost layer
