"""A lean HTTP/1.1 load generator for the warm-ups (``coldstart.py``, ``fleet.py``).

Each of ``clients`` tasks sends GETs with one ``Authorization`` header over keep-alive
connections of its own (one per server), and reads the status line, the headers and a
``Content-Length`` body: about 30 µs of client CPU a request, against 1-6 ms for an
httpx ``AsyncClient`` with 64 connections. The warm-ups measure what the servers spend;
with httpx the one core of the load generator was the bottleneck, so the servers saw
their misses one at a time (a fleet after a deploy sees them in bursts). Never imports
keystile.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

__all__ = ["MAX_RETRIES", "RETRY_PAUSE", "send_all"]

#: Tries per request before the run gives up (503s and dropped connections).
MAX_RETRIES = 1_000
#: Seconds a client waits after a 503 before it asks again.
RETRY_PAUSE = 0.05

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Client:
    """One client: a keep-alive connection per server, opened on first use."""

    def __init__(self) -> None:
        self.conns: dict[tuple[str, int], _Conn] = {}

    async def get(self, url: str, token: str) -> int:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        conn = self.conns.get((host, port))
        if conn is None:
            conn = self.conns[host, port] = await asyncio.open_connection(host, port)
        reader, writer = conn
        writer.write(
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
        except BaseException:
            self.drop(host, port)
            raise
        if close:
            self.drop(host, port)
        return status

    def drop(self, host: str, port: int) -> None:
        conn = self.conns.pop((host, port), None)
        if conn is not None:
            conn[1].close()

    def close(self) -> None:
        for _, writer in self.conns.values():
            writer.close()
        self.conns.clear()


async def send_all(order: list[tuple[str, str]], clients: int) -> tuple[float, int]:
    """GET every ``(url, token)`` of ``order``, ``clients`` at a time, until it answers
    200 (a 503 or a dropped connection is retried, ``MAX_RETRIES`` times at most); the
    wall time and the retries. Any other status is an error."""
    queue = list(reversed(order))
    retried = 0

    async def client() -> None:
        nonlocal retried
        me = _Client()
        try:
            while queue:
                url, token = queue.pop()
                for _ in range(MAX_RETRIES):
                    try:
                        status = await me.get(url, token)
                    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                        retried += 1
                        continue
                    if status == 200:
                        break
                    if status != 503:
                        raise RuntimeError(f"a key answered {status} at {url}")
                    retried += 1
                    await asyncio.sleep(RETRY_PAUSE)
                else:
                    raise RuntimeError(f"no 200 from {url} after {MAX_RETRIES} tries")
        finally:
            me.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, retried
