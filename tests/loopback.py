"""A small ASGI app served by uvicorn on 127.0.0.1 inside the test's own event loop: a
real HTTP peer (GitHub's public-keys document, a webhook receiver) without any network
beyond loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn


def reserved_port() -> socket.socket:
    """A loopback port bound and not listening: connections to it are refused (a receiver
    that is down) until ``serving(app, sock=...)`` serves on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serving(
    app: Any, *, sock: socket.socket | None = None, startup_timeout: float = 30.0
) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port (or on ``sock``); yields its base URL
    (``http://127.0.0.1:N``)."""
    sock = sock or reserved_port()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve, [sock])
        with anyio.fail_after(startup_timeout):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()
