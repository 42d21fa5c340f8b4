"""A plain ASGI app behind keystile: the key in the scope, nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apps import client, load_example
from docblocks import INTEGRATION, block_under, mint, run_block
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from lifespans import lifespan

pytestmark = pytest.mark.anyio


async def make_key(database_url: str, *scopes: str) -> str:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name="bot", scopes=list(scopes))
    return created.key


def protected(database_url: str, **options: Any) -> APIKeyMiddleware:
    """The example's app behind a middleware of the test's own database."""
    app = load_example("plain_asgi").app
    return APIKeyMiddleware(
        app,
        database_url=database_url,
        argon2=CHEAPEST_PARAMETERS,
        exempt_paths=["/health"],
        **options,
    )


async def test_app_reads_the_key_from_the_scope(sqlite_database_url: str) -> None:
    """scope["user"] is the verified key and scope["auth"].scopes its scopes."""
    key = await make_key(sqlite_database_url, "items:read")
    app = protected(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/anything", headers={"Authorization": f"Bearer {key}"})
    await app.aclose()
    assert answer.json() == {
        "key": "apikey:bot",
        "owner": "acme",
        "scopes": ["authenticated", "items:read"],
    }


async def test_request_without_a_key_never_reaches_the_app(sqlite_database_url: str) -> None:
    """Without a key the answer is keystile's 401, not the app's JSON."""
    app = protected(sqlite_database_url)
    async with client(app) as c:
        refused = await c.get("/anything")
    await app.aclose()
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"


async def test_exempt_path_reaches_the_app_anonymous(sqlite_database_url: str) -> None:
    """On an exempt path without a key the app runs, with an unauthenticated user."""
    app = protected(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/health")
    await app.aclose()
    assert (answer.status_code, answer.json()) == (200, {"key": None})


async def test_lifespan_shutdown_flushes_last_used_at(sqlite_database_url: str) -> None:
    """An app that answers the lifespan lets the middleware write last_used_at at shutdown."""
    key = await make_key(sqlite_database_url)
    app = protected(sqlite_database_url, flush_interval=3600)
    async with lifespan(app):
        async with client(app) as c:
            answer = await c.get("/anything", headers={"X-API-Key": key})
        pending = app.stats().pending_touches
    async with KeyManager.from_url(sqlite_database_url) as keys:
        record = (await keys.list("acme"))[0]
    assert (answer.status_code, pending) == (200, 1)
    assert record.last_used_at is not None


async def test_docs_plain_asgi_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain ASGI section's app: the key from the scope, 401 without one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    key = await mint(scopes=["items:read"])
    app = run_block(block_under(INTEGRATION, "Plain ASGI"))["application"]
    async with client(app) as c:
        me = await c.get("/whoami", headers={"X-API-Key": key})
        anonymous = await c.get("/whoami")
    await app.aclose()
    assert me.json() == {"key": "apikey:laptop", "scopes": ["authenticated", "items:read"]}
    assert anonymous.status_code == 401
