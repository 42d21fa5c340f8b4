"""APIKeyMiddleware through real HTTP requests over ASGI: every response code and header."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from apps import client, protect
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    CreatedKey,
    KeyManager,
    MemoryKeyStore,
)

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
def manager(store: MemoryKeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS)


@pytest.fixture
async def key(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="laptop", scopes=["read"])


@pytest.fixture
async def app(store: MemoryKeyStore) -> AsyncIterator[APIKeyMiddleware]:
    middleware = protect(store, exempt_paths=["/public", "/static/*"])
    yield middleware
    await middleware.aclose()


async def test_bearer_key_authenticates(app: APIKeyMiddleware, key: CreatedKey) -> None:
    """A valid key as Authorization: Bearer reaches the route with request.user set."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {key.key}"})
    assert r.status_code == 200
    body = r.json()
    assert body["display_name"] == "apikey:laptop"
    assert body["key_id"] == key.id
    assert body["owner"] == "acme"
    assert body["scopes"] == ["authenticated", "read"]


async def test_x_api_key_authenticates(app: APIKeyMiddleware, key: CreatedKey) -> None:
    """A valid key as X-API-Key reaches the route."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": key.key})
    assert r.status_code == 200
    assert r.json()["key_id"] == key.id


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
async def test_bearer_scheme_is_case_insensitive(
    app: APIKeyMiddleware, key: CreatedKey, scheme: str
) -> None:
    """The Bearer scheme matches in any case."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"Authorization": f"{scheme} {key.key}"})
    assert r.status_code == 200


async def test_custom_header_name(store: MemoryKeyStore, key: CreatedKey) -> None:
    """header_name renames the API-key header, and the error hint names it."""
    app = protect(store, header_name="X-Token")
    async with client(app) as c:
        ok = await c.get("/whoami", headers={"X-Token": key.key})
        old = await c.get("/whoami", headers={"X-API-Key": key.key})
    await app.aclose()
    assert ok.status_code == 200
    assert old.status_code == 401
    assert "X-Token: <key>" in old.json()["hint"]


async def test_missing_key_gets_bare_challenge(app: APIKeyMiddleware) -> None:
    """No credential: 401 with a bare Bearer challenge and a body naming both headers."""
    async with client(app) as c:
        r = await c.get("/whoami")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert "error_description" not in r.headers["www-authenticate"]
    assert "Authorization: Bearer <key>" in body["hint"]
    assert "X-API-Key: <key>" in body["hint"]


async def test_other_authorization_scheme_counts_as_missing(app: APIKeyMiddleware) -> None:
    """Only a non-Bearer Authorization scheme: the bare 401 challenge."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a_b_c",
        "ks_AAAAAAAAAAAA_" + "A" * 49,
        "x" * 10_000,
        "ks_Ä_ö",
    ],
    ids=["garbage", "three-part", "bad-checksum", "10KB", "non-ascii"],
)
async def test_invalid_keys_get_invalid_token(app: APIKeyMiddleware, token: str) -> None:
    """Malformed, bad-checksum, huge and non-ASCII keys: 401 invalid_token, never 500."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": token.encode("utf-8")})
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json()["credential_source"] == "x-api-key"
    assert token not in r.text


async def test_unknown_and_wrong_secret_look_the_same(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager
) -> None:
    """An unknown key id and a wrong secret for a real id get the same answer."""
    from keystile.tokens import generate_key

    unknown, _ = generate_key()
    wrong_secret, _ = generate_key(key_id=key.id)
    async with client(app) as c:
        a = await c.get("/whoami", headers={"X-API-Key": unknown})
        b = await c.get("/whoami", headers={"X-API-Key": wrong_secret})
    assert a.status_code == b.status_code == 401
    assert a.json() == b.json()
    assert a.headers["www-authenticate"] == b.headers["www-authenticate"]
    assert app.stats().rejects == {"unknown": 1, "wrong_secret": 1}


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Bearer ")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer "), ("x-api-key", "")],
    ],
    ids=["bearer-space", "bearer-alone", "bearer-space-and-empty-x-api-key"],
)
async def test_empty_token_is_invalid_request(
    app: APIKeyMiddleware, headers: list[tuple[str, str]]
) -> None:
    """Bearer with no token: 400 invalid_request."""
    async with client(app) as c:
        r = await c.get("/whoami", headers=headers)
    assert r.status_code == 400
    assert 'error="invalid_request"' in r.headers["www-authenticate"]


@pytest.mark.parametrize("empty", ["", "   ", "\t"], ids=["empty", "spaces", "tab"])
async def test_empty_x_api_key_beside_a_bearer_key_is_absent(
    store: MemoryKeyStore, key: CreatedKey, hit_path: str, empty: str
) -> None:
    """An empty or blank X-API-Key beside a valid Bearer key is no credential: 200, on
    the miss and on the cache hit, and the app sees neither header."""
    app = protect(store)
    assert app.verifier.cache.compiled == (hit_path == "compiled")
    headers = [("x-api-key", empty), ("authorization", f"Bearer {key.key}")]
    try:
        async with client(app) as c:
            answers = [await c.get("/whoami", headers=headers) for _ in range(3)]
    finally:
        await app.aclose()
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(r.json()["key_id"] == key.id for r in answers)
    assert all("x-api-key" not in r.json()["headers"] for r in answers)
    assert app.stats().cache_hits == 2


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", "")],
        [("x-api-key", "   ")],
        [("x-api-key", ""), ("x-api-key", " ")],
        [("authorization", ""), ("x-api-key", "")],
    ],
    ids=["empty", "spaces", "two-empty", "empty-authorization-too"],
)
async def test_only_empty_headers_get_the_bare_challenge(
    app: APIKeyMiddleware, headers: list[tuple[str, str]]
) -> None:
    """Empty credential headers alone are nothing sent: 401 with the bare challenge."""
    async with client(app) as c:
        r = await c.get("/whoami", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'
    assert r.json()["error"] == "unauthorized"


async def test_two_different_keys_are_invalid_request(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager
) -> None:
    """Bearer and X-API-Key with different keys: 400, whichever is valid."""
    other = await manager.create(owner="acme", name="phone")
    async with client(app) as c:
        r = await c.get(
            "/whoami", headers={"Authorization": f"Bearer {key.key}", "X-API-Key": other.key}
        )
        repeated = await c.get(
            "/whoami",
            headers=[
                ("authorization", f"Bearer {key.key}"),
                ("authorization", f"Bearer {other.key}"),
            ],
        )
    assert r.status_code == repeated.status_code == 400
    assert r.json()["error"] == "invalid_request"


async def test_same_key_in_both_headers_is_one_credential(
    app: APIKeyMiddleware, key: CreatedKey
) -> None:
    """The same key in both headers is accepted and reported as read from authorization."""
    async with client(app) as c:
        r = await c.get(
            "/whoami", headers={"Authorization": f"Bearer {key.key}", "X-API-Key": key.key}
        )
    assert r.status_code == 200


async def test_revoked_key_rejected_at_once_in_process(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager
) -> None:
    """A revoke in this process evicts the cached key before the next request."""
    async with client(app) as c:
        assert (await c.get("/whoami", headers={"X-API-Key": key.key})).status_code == 200
        assert await manager.revoke(key.id, owner="acme")
        r = await c.get("/whoami", headers={"X-API-Key": key.key})
    assert r.status_code == 401
    assert r.json()["detail"] == "The API key has been revoked."


async def test_revocation_elsewhere_seen_after_ttl(store: MemoryKeyStore, key: CreatedKey) -> None:
    """A revocation the cache never heard of is seen once cache_ttl has passed."""
    import dataclasses

    app = protect(store, cache_ttl=30)
    now = [1000.0]
    app.verifier.monotonic = lambda: now[0]
    async with client(app) as c:
        assert (await c.get("/whoami", headers={"X-API-Key": key.key})).status_code == 200
        record = await store.get(key.id)
        assert record is not None
        store._rows[key.id] = dataclasses.replace(record, revoked_at=record.created_at)
        now[0] += 29
        still = await c.get("/whoami", headers={"X-API-Key": key.key})
        now[0] += 2
        after = await c.get("/whoami", headers={"X-API-Key": key.key})
    await app.aclose()
    assert still.status_code == 200
    assert after.status_code == 401
    assert after.json()["detail"] == "The API key has been revoked."


async def test_expiry_enforced_while_cached(store: MemoryKeyStore, manager: KeyManager) -> None:
    """A cached key stops working the moment it expires, without a store read."""
    created = await manager.create(owner="acme", name="short", expires_in=timedelta(hours=1))
    app = protect(store)
    async with client(app) as c:
        assert (await c.get("/whoami", headers={"X-API-Key": created.key})).status_code == 200
        assert created.record.expires_at is not None
        app.verifier.clock = lambda: created.record.expires_at.timestamp() + 1  # type: ignore[union-attr]
        r = await c.get("/whoami", headers={"X-API-Key": created.key})
    await app.aclose()
    assert r.status_code == 401
    assert r.json()["detail"] == "The API key has expired."
    assert app.stats().cache_hits == 1


async def test_scopes_work_with_starlette_requires(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager
) -> None:
    """starlette.authentication.requires sees the key's scopes."""
    writer = await manager.create(owner="acme", name="writer", scopes=["write"])
    async with client(app) as c:
        denied = await c.get("/write", headers={"X-API-Key": key.key})
        allowed = await c.get("/write", headers={"X-API-Key": writer.key})
    assert denied.status_code == 403
    assert allowed.status_code == 200


async def test_exempt_paths_need_no_key(app: APIKeyMiddleware) -> None:
    """Exact and prefix (trailing *) exempt paths pass without a key, as anonymous."""
    async with client(app) as c:
        exact = await c.get("/public")
        prefix = await c.get("/static/logo")
    assert exact.status_code == prefix.status_code == 200
    assert exact.json()["authenticated"] is False


async def test_optional_mode_lets_anonymous_through(store: MemoryKeyStore, key: CreatedKey) -> None:
    """required=False: no key passes as anonymous, a key authenticates, a bad key is 401."""
    app = protect(store, required=False)
    async with client(app) as c:
        anonymous = await c.get("/whoami")
        known = await c.get("/whoami", headers={"X-API-Key": key.key})
        bad = await c.get("/whoami", headers={"X-API-Key": "nonsense"})
    await app.aclose()
    assert anonymous.status_code == 200
    assert anonymous.json()["authenticated"] is False
    assert known.json()["authenticated"] is True
    assert bad.status_code == 401


async def test_credentials_stripped_downstream(app: APIKeyMiddleware, key: CreatedKey) -> None:
    """By default the app never sees the credential headers."""
    async with client(app) as c:
        r = await c.get(
            "/whoami", headers={"X-API-Key": key.key, "Authorization": f"Bearer {key.key}"}
        )
    assert "x-api-key" not in r.json()["headers"]
    assert "authorization" not in r.json()["headers"]


async def test_credentials_kept_when_asked(store: MemoryKeyStore, key: CreatedKey) -> None:
    """strip_credentials=False passes the headers through."""
    app = protect(store, strip_credentials=False)
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": key.key})
    await app.aclose()
    assert "x-api-key" in r.json()["headers"]


async def test_store_down_on_miss_is_503(key: CreatedKey, store: MemoryKeyStore) -> None:
    """A store failure on a miss: 503 with Retry-After, never 500, never a pass."""
    from keystile import StoreError

    class DownStore(MemoryKeyStore):
        async def get(self, key_id: str) -> None:
            raise StoreError("connection refused")

    down = DownStore()
    app = protect(down)
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": key.key})
    await app.aclose()
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "www-authenticate" not in r.headers


async def test_unexpected_error_fails_closed(key: CreatedKey) -> None:
    """A bug in a store (any exception) is a 503, not a 500 and not a pass."""

    class BrokenStore(MemoryKeyStore):
        async def get(self, key_id: str) -> None:
            raise RuntimeError("boom")

    app = protect(BrokenStore())
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": key.key})
    await app.aclose()
    assert r.status_code == 503


async def test_custom_on_error(store: MemoryKeyStore) -> None:
    """on_error replaces the default error response."""
    from starlette.responses import PlainTextResponse

    app = protect(store, on_error=lambda conn, exc: PlainTextResponse(exc.reason, status_code=418))
    async with client(app) as c:
        r = await c.get("/whoami")
    await app.aclose()
    assert (r.status_code, r.text) == (418, "missing")


async def test_no_plaintext_key_in_logs(
    app: APIKeyMiddleware, key: CreatedKey, manager: KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    """No log record at DEBUG carries the plaintext key or its secret."""
    caplog.set_level(logging.DEBUG)
    secret = key.key.split("_")[2]
    async with client(app) as c:
        await c.get("/whoami", headers={"X-API-Key": key.key})
        await c.get("/whoami", headers={"X-API-Key": key.key[:-1] + "0"})
        await manager.revoke(key.id, owner="acme")
        await c.get("/whoami", headers={"X-API-Key": key.key})
    text = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert secret[:20] not in text
    assert key.key not in repr(key)


def test_websocket_authenticated_and_refused(store: MemoryKeyStore) -> None:
    """A WebSocket with a key is accepted; without one it is closed with 1008."""
    import anyio

    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    created = anyio.run(lambda: manager.create(owner="acme", name="ws"))
    with TestClient(protect(store)) as tc:
        with tc.websocket_connect("/ws", headers={"X-API-Key": created.key}) as ws:
            assert ws.receive_json() == {"display_name": "apikey:ws"}
        with pytest.raises(WebSocketDisconnect) as refused, tc.websocket_connect("/ws"):
            pass
    assert refused.value.code == 1008


def test_add_middleware_one_line(tmp_path: object) -> None:
    """The README's one line works with a SQLite URL, under TestClient with lifespan."""
    import anyio

    url = f"sqlite:///{tmp_path}/keys.db"
    manager = KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS)

    async def mint() -> CreatedKey:
        async with manager:
            return await manager.create(owner="acme", name="one-line")

    created = anyio.run(mint)

    async def hello(request: object) -> object:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(APIKeyMiddleware, database_url=url, argon2=CHEAPEST_PARAMETERS)
    with TestClient(app) as tc:
        assert tc.get("/", headers={"X-API-Key": created.key}).text == "hello"
        assert tc.get("/").status_code == 401
    # Without lifespan (no `with`): started lazily on the first request.
    tc = TestClient(
        Starlette(
            routes=[Route("/", hello)],
            middleware=[Middleware(APIKeyMiddleware, database_url=url, argon2=CHEAPEST_PARAMETERS)],
        )
    )
    assert tc.get("/", headers={"Authorization": f"Bearer {created.key}"}).status_code == 200
