"""The middleware's background work: it outlives an early end of the lifespan protocol,
restarts a duty that failed, and leaves nothing un-awaited behind."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from starlette.types import Message, Receive, Scope, Send

from apps import client, inner_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, KeyRecord, MemoryKeyStore
from keystile.stores import SQLiteKeyStore

pytestmark = pytest.mark.anyio


class EarlyEndingApp:
    """An app that answers lifespan startup and then returns, as some frameworks and
    hand-written ASGI apps do; other requests go to the usual test app."""

    def __init__(self) -> None:
        self.routes = inner_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            return
        await self.routes(scope, receive, send)


async def run_lifespan_startup(app: APIKeyMiddleware) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


async def test_background_work_survives_an_early_lifespan_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the app ends the lifespan after startup, last_used_at is still written, and a
    warning says what happened."""
    store = SQLiteKeyStore(tmp_path / "keys.db")
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="ci")
    app = APIKeyMiddleware(
        EarlyEndingApp(), store=store, argon2=CHEAPEST_PARAMETERS, flush_interval=0.05
    )
    try:
        with caplog.at_level(logging.WARNING, logger="keystile"):
            sent = await run_lifespan_startup(app)
        assert sent == [{"type": "lifespan.startup.complete"}]
        assert "ended the lifespan protocol before shutdown" in caplog.text
        async with client(app) as c:
            r = await c.get("/whoami", headers={"X-API-Key": created.key})
        assert r.status_code == 200
        with anyio.fail_after(5):
            while (record := await store.get(created.id)) and record.last_used_at is None:
                await anyio.sleep(0.02)
    finally:
        await app.aclose()


class FailingOnceStore(MemoryKeyStore):
    """A memory store whose first batched read fails with an unexpected error."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_reads = 0

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        self.batch_reads += 1
        if self.batch_reads == 1:
            raise RuntimeError("unexpected failure in the store driver")
        return await super().get_many(key_ids)


async def test_failed_duty_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    """A background duty that raises is logged and runs again; the others keep running."""
    store = FailingOnceStore()
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="ci")
    app = APIKeyMiddleware(
        inner_app(), store=store, argon2=CHEAPEST_PARAMETERS, cache_ttl=0.5, flush_interval=0.05
    )
    try:
        with caplog.at_level(logging.ERROR, logger="keystile"):
            async with client(app) as c:
                assert (await c.get("/whoami", headers={"X-API-Key": created.key})).is_success
                with anyio.fail_after(10):
                    while store.batch_reads < 2:
                        await anyio.sleep(0.05)
                assert (await c.get("/whoami", headers={"X-API-Key": created.key})).is_success
            with anyio.fail_after(5):
                while app.stats().flushes < 1 or app.stats().pending_touches:
                    await anyio.sleep(0.02)
        assert "cache upkeep failed (RuntimeError" in caplog.text
        assert created.key not in caplog.text
    finally:
        await app.aclose()


SCRIPT = """
import asyncio, sys
import anyio, httpx
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

URL = sys.argv[1]

async def mint():
    async with KeyManager.from_url(URL, argon2=CHEAPEST_PARAMETERS) as manager:
        return await manager.create(owner="acme", name="ci", replace=True)

key = asyncio.run(mint()).key
app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
app.add_middleware(APIKeyMiddleware, database_url=URL, argon2=CHEAPEST_PARAMETERS)

async def one_request():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/", headers={"X-API-Key": key})).status_code == 200

asyncio.run(one_request())           # a miss on a fresh loop
asyncio.run(one_request())           # a cache hit on another loop
anyio.run(one_request)
loop = asyncio.new_event_loop()      # a loop closed without cancelling its tasks
loop.run_until_complete(one_request())
loop.close()
print("done")
"""


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_no_unawaited_coroutines_without_lifespan(tmp_path: Path, kind: str) -> None:
    """An app used through httpx's ASGITransport without lifespan, on several event loops,
    leaves no 'never awaited' coroutine and no destroyed pending task at exit."""
    url = "memory://warnings" if kind == "memory" else f"sqlite:///{tmp_path / 'keys.db'}"
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", textwrap.dedent(SCRIPT), url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert "never awaited" not in result.stderr
    assert "Task was destroyed" not in result.stderr
