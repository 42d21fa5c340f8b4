"""revoke_presented (logout) when the store cannot record it: a clear 503, the key evicted.

Every store is made to fail for real on revoke alone, while reads keep working: the
memory store through a subclass, SQLite and Postgres through a trigger that refuses to
set ``revoked_at`` (so ``last_used_at`` flushes still pass).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from apps import client, inner_app
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    CreatedKey,
    KeyManager,
    KeyStore,
    MemoryKeyStore,
    StoreError,
    revoke_presented,
    store_from_url,
)
from keystile.stores.postgres import PostgresKeyStore
from keystile.stores.sqlite import SQLiteKeyStore

pytestmark = pytest.mark.anyio


class RevokeFailingMemoryStore(MemoryKeyStore):
    """A memory store whose revoke fails as an unreachable database would; reads work."""

    async def revoke(self, key_id: str, owner: str, *, at: datetime, **audit: str) -> bool:
        raise StoreError("memory://: revoke failed (connection refused)")


SQLITE_REFUSE = """
CREATE TRIGGER refuse_revoke BEFORE UPDATE OF revoked_at ON keystile_keys
BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END
"""
POSTGRES_REFUSE = """
CREATE FUNCTION {schema}.refuse_revoke() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'could not write to file: No space left on device'; END $$;
CREATE TRIGGER refuse_revoke BEFORE UPDATE OF revoked_at ON {schema}.keystile_keys
FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_revoke();
"""


async def refuse_revocations(store: KeyStore, request: pytest.FixtureRequest) -> None:
    if isinstance(store, SQLiteKeyStore):
        conn = sqlite3.connect(store.path)
        try:
            conn.executescript(SQLITE_REFUSE)
        finally:
            conn.close()
    elif isinstance(store, PostgresKeyStore):
        pg = await asyncpg.connect(request.getfixturevalue("postgres_url"))
        try:
            await pg.execute(POSTGRES_REFUSE.format(schema=f'"{store.schema}"'))
        finally:
            await pg.close()


@pytest.fixture
async def failing_store(
    database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[KeyStore]:
    """A store of each kind whose revoke fails while everything else works."""
    if database_url.startswith("memory://"):
        store: KeyStore = RevokeFailingMemoryStore(database_url.split("://", 1)[1])
    else:
        store = store_from_url(database_url)
    await store.open()
    await refuse_revocations(store, request)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def key(failing_store: KeyStore) -> CreatedKey:
    manager = KeyManager(failing_store, argon2=CHEAPEST_PARAMETERS)
    return await manager.create(owner="acme", name="session")


async def logout(request: Request) -> JSONResponse:
    return JSONResponse({"revoked": await revoke_presented(request)})


def logout_app(store: KeyStore) -> APIKeyMiddleware:
    inner = inner_app()
    inner.add_route("/logout", logout, methods=["POST"])
    return APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS)


async def test_store_refuses_the_revocation(failing_store: KeyStore, key: CreatedKey) -> None:
    """The fixture is sound: revoke raises StoreError, and the key stays active."""
    with pytest.raises(StoreError):
        await failing_store.revoke(key.id, "acme", at=key.record.created_at)
    record = await failing_store.get(key.id)
    assert record is not None and record.is_active()


async def test_logout_during_outage_is_503(failing_store: KeyStore, key: CreatedKey) -> None:
    """A logout the store cannot record answers 503 with Retry-After and the middleware's
    JSON body, saying the logout was not recorded."""
    app = logout_app(failing_store)
    headers = {"Authorization": f"Bearer {key.key}"}
    async with client(app) as c:
        assert (await c.get("/whoami", headers=headers)).status_code == 200
        r = await c.post("/logout", headers=headers)
    await app.aclose()
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"] == "application/json"
    assert "www-authenticate" not in r.headers
    body = r.json()
    assert body["error"] == "temporarily_unavailable"
    assert body["retry_after"] == 1
    assert "logout could not be recorded" in body["detail"]
    assert key.key not in r.text


async def test_logout_during_outage_evicts_the_key(
    failing_store: KeyStore, key: CreatedKey
) -> None:
    """After a failed logout the key is no longer served from the cache: its next request
    is a miss that reaches the store (and, as the key is still active, succeeds)."""
    app = logout_app(failing_store)
    headers = {"Authorization": f"Bearer {key.key}"}
    async with client(app) as c:
        await c.get("/whoami", headers=headers)
        assert (await c.post("/logout", headers=headers)).status_code == 503
        before = app.stats()
        after_logout = await c.get("/whoami", headers=headers)
        after = app.stats()
    await app.aclose()
    assert after.cache_misses == before.cache_misses + 1
    assert after.cache_hits == before.cache_hits
    assert after.argon2_verifications == before.argon2_verifications + 1
    assert after_logout.status_code == 200


async def test_logout_outage_on_websocket_closes_1013() -> None:
    """On a WebSocket, a logout the store cannot record closes with 1013 (try again later)."""
    store = RevokeFailingMemoryStore()
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="a", name="ws")

    async def ws_logout(websocket: WebSocket) -> None:
        await websocket.accept()
        await revoke_presented(websocket)

    app = APIKeyMiddleware(
        Starlette(routes=[WebSocketRoute("/logout", ws_logout)]),
        store=store,
        argon2=CHEAPEST_PARAMETERS,
    )
    with (
        TestClient(app) as c,
        c.websocket_connect("/logout", headers={"X-API-Key": created.key}) as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_json()
    assert closed.value.code == 1013
    assert closed.value.reason == "temporarily_unavailable"
