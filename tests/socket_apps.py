"""The app behind keystile in the WebSocket tests, and clocks a test can move."""

from __future__ import annotations

import time

import anyio
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from apps import whoami
from keystile import APIKeyMiddleware


class Clocks:
    """The verifier's wall and monotonic clocks, moved forward by the test."""

    def __init__(self, middleware: APIKeyMiddleware) -> None:
        self.ahead = 0.0
        middleware.verifier.clock = lambda: time.time() + self.ahead
        middleware.verifier.monotonic = lambda: time.monotonic() + self.ahead

    def advance(self, seconds: float) -> None:
        self.ahead += seconds


class Inner:
    """The app behind keystile: an echo socket, a push-only socket fed by the test, and
    what each saw when its socket ended."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, int]] = []
        self.feed_in, self.feed = anyio.create_memory_object_stream[str](10)
        self.app = Starlette(
            routes=[
                Route("/whoami", whoami),
                WebSocketRoute("/echo", self.echo),
                WebSocketRoute("/public/echo", self.echo),
                WebSocketRoute("/push", self.push),
            ]
        )

    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect as exc:
            self.ended.append(("disconnect", exc.code))

    async def push(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            async for item in self.feed:
                await websocket.send_text(item)
        except WebSocketDisconnect as exc:
            self.ended.append(("send refused", exc.code))


async def listening(app: APIKeyMiddleware) -> None:
    """Wait until the store hears other processes (Postgres: its LISTEN is up). Keys read
    before then have their state read again once it is: counting store reads starts
    after."""
    with anyio.fail_after(10):
        while getattr(app.store, "_listening", True) is False:
            await anyio.sleep(0.01)
