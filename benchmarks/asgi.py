"""Requests without a network and servers on 127.0.0.1: the plumbing sections share.

Direct ASGI calls (scope, receive and send built here: no HTTP client in the timing), the
same through httpx's ``ASGITransport`` (the full HTTP cycle without a socket), an app's
lifespan, and uvicorn processes on free ports. Never imports keystile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "BENCH_HEADERS",
    "call_once",
    "check_arms",
    "discard",
    "free_port",
    "http_scope",
    "measure_asgi",
    "ok_app",
    "receive",
    "run_lifespan",
    "time_asgi",
    "timed_arms",
    "uvicorn",
    "wait_http",
]

#: What a typical HTTP/1.1 client sends besides the key.
BENCH_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"keystile-bench/1.0"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
]


def http_scope(
    path: str, token: bytes = b"", *, headers: Sequence[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    """A GET scope template (copy it per call: a middleware writes to it). The headers are
    ``BENCH_HEADERS`` and ``Authorization: Bearer <token>`` unless given."""
    if headers is None:
        headers = [*BENCH_HEADERS, (b"authorization", b"Bearer " + token)]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def discard(message: Message) -> None:
    return None


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The cheapest app there is: 200 ``ok``."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call_once(app: ASGIApp, scope: dict[str, Any]) -> tuple[int, bytes]:
    """One request, checked: the status and body."""
    status = 0
    body = b""

    async def send(message: Message) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(dict(scope), receive, send)
    return status, body


async def time_asgi(
    app: ASGIApp, scopes: Iterable[dict[str, Any]], *, gc_off: bool = False
) -> float:
    """µs per call of direct ASGI calls, one per scope (pass ``itertools.repeat(scope, n)``
    for n calls of one request); the responses are dropped unread."""
    perf = time.perf_counter_ns
    calls = 0
    if gc_off:
        gc.disable()
    try:
        t0 = perf()
        for scope in scopes:
            await app(scope.copy(), receive, discard)
            calls += 1
        elapsed = perf() - t0
    finally:
        if gc_off:
            gc.enable()
    return elapsed / calls / 1_000


@contextlib.asynccontextmanager
async def run_lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan (startup before, shutdown after) around the block.

    httpx's ASGITransport sends no lifespan events. An app that does not speak the
    lifespan protocol (raises or returns at once) is used as is, as servers do.
    """
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def send(message: Message) -> None:
        await from_app.put(message)

    task = asyncio.create_task(app(scope, to_app.get, send))

    async def next_message() -> Message | None:
        getter = asyncio.ensure_future(from_app.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        with contextlib.suppress(Exception):
            task.result()  # lifespan unsupported: the app raised or returned
        return None

    await to_app.put({"type": "lifespan.startup"})
    started = await next_message()
    if started is not None and started["type"] == "lifespan.startup.failed":
        raise RuntimeError(f"lifespan startup failed: {started.get('message', '')}")
    try:
        yield
    finally:
        if started is not None:
            await to_app.put({"type": "lifespan.shutdown"})
            stopped = await next_message()
            if stopped is not None and stopped["type"] == "lifespan.shutdown.failed":
                raise RuntimeError(f"lifespan shutdown failed: {stopped.get('message', '')}")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)


async def measure_asgi(
    app: ASGIApp,
    headers: dict[str, str],
    *,
    requests: int,
    warmup: int = 50,
    path: str = "/ping",
) -> list[float]:
    """Per-request latency in µs of ``requests`` sequential GETs, after ``warmup`` ones.

    Requests go through httpx's ASGITransport (full HTTP request/response cycle, no
    socket). Raises ``AssertionError`` unless every response is 200 (``{"ok": true}``
    in the warm-up).
    """
    latencies: list[float] = []
    bad: list[tuple[int, str]] = []
    transport = httpx.ASGITransport(app=app)
    async with (
        run_lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        for _ in range(warmup):
            response = await client.get(path, headers=headers)
            if response.status_code != 200 or response.json() != {"ok": True}:
                raise AssertionError(f"warm-up got {response.status_code}: {response.text[:200]}")
        perf = time.perf_counter_ns
        for _ in range(requests):
            start = perf()
            response = await client.get(path, headers=headers)
            elapsed = perf() - start
            if response.status_code != 200:
                bad.append((response.status_code, response.text[:200]))
            latencies.append(elapsed / 1_000)
    if bad:
        raise AssertionError(f"{len(bad)}/{requests} responses were not 200, first: {bad[0]}")
    return latencies


# -- uvicorn on 127.0.0.1 ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn(
    app: str,
    *,
    app_dir: str | pathlib.Path,
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``uvicorn APP`` on a free port of 127.0.0.1 (``prefix``: e.g. ``taskset -c 1``),
    no access log; yields the process and its base URL, and stops it on the way out."""
    port = free_port()
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(app_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        *options,
    ]
    process = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_http(
    url: str,
    process: subprocess.Popen[bytes],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> httpx.Response:
    """The first response a starting server gives to ``GET url``, whatever its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            return httpx.get(url, headers=headers, timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"no answer from {url} after {timeout}s")


async def check_arms(
    arms: Mapping[str, tuple[ASGIApp, dict[str, Any]]],
    *,
    calls: int = 20,
    body: bytes | None = None,
) -> None:
    """Warm every arm up, and prove it answers 200 (with ``body``, if given)."""
    for name, (app, scope) in arms.items():
        for _ in range(calls):
            status, got = await call_once(app, scope)
            if status != 200 or (body is not None and got != body):
                raise AssertionError(f"{name}: got {status} {got[:200]!r}")


def timed_arms(
    arms: Mapping[str, tuple[ASGIApp, dict[str, Any]]], calls: int
) -> dict[str, Callable[[], Awaitable[float]]]:
    """Per arm, a sample for :func:`harness.interleave_async`: µs per call over ``calls``
    direct calls of its request."""

    def sample(app: ASGIApp, scope: dict[str, Any]) -> Callable[[], Awaitable[float]]:
        return lambda: time_asgi(app, itertools.repeat(scope, calls))

    return {name: sample(app, scope) for name, (app, scope) in arms.items()}
