"""A TCP proxy in front of Postgres that a test can cut and restore: a simulated outage.

``cut()`` aborts every proxied connection (both sides) and stops listening, so new
connections are refused exactly as with a stopped server; ``restore()`` listens again on
the same port. Point a store at ``proxy.url(real_url)`` and the store cannot tell the
difference from a database that went away and came back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["PostgresProxy", "running_proxy"]


class PostgresProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def url(self, real_url: str) -> str:
        """``real_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(real_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def restore(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Abort every open connection and refuse new ones until ``restore()``."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._transports.add(writer.transport)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._transports.add(up_writer.transport)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._transports.discard(w.transport)
                    w.transport.abort()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


@asynccontextmanager
async def running_proxy(real_url: str) -> AsyncIterator[PostgresProxy]:
    """A listening proxy to the server ``real_url`` names; cut when the block ends."""
    parts = urlsplit(real_url)
    proxy = PostgresProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.restore()
    try:
        yield proxy
    finally:
        await proxy.cut()
