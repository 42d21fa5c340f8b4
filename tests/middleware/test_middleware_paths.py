"""Exempt paths behind a proxy, credential stripping on every path, and API keys beside OAuth."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from apps import client, protect
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager, MemoryKeyStore
from servers import uvicorn_server

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]

#: A JWT as an OAuth provider would issue it: not in keystile's key format.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSJ9"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
async def key(store: MemoryKeyStore) -> CreatedKey:
    return await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="ci")


@pytest.fixture
async def app(store: MemoryKeyStore) -> AsyncIterator[APIKeyMiddleware]:
    middleware = protect(store, exempt_paths=["/public", "/static/*"])
    yield middleware
    await middleware.aclose()


@pytest.fixture
async def optional_app(store: MemoryKeyStore) -> AsyncIterator[APIKeyMiddleware]:
    middleware = protect(store, required=False)
    yield middleware
    await middleware.aclose()


def proxied(app: APIKeyMiddleware, root_path: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


# -- exempt paths behind a proxy ------------------------------------------------------------


async def test_exempt_path_matches_without_root_path(app: APIKeyMiddleware) -> None:
    """Exempt paths match the path the app routes on, with the proxy's root_path removed."""
    async with proxied(app, "/api") as c:
        exempt = await c.get("/api/public")
        prefixed = await c.get("/api/static/logo")
        protected = await c.get("/api/whoami")
    assert (exempt.status_code, prefixed.status_code) == (200, 200)
    assert protected.status_code == 401


async def test_root_path_is_not_a_way_around_the_key(app: APIKeyMiddleware) -> None:
    """A path that only looks like root_path + an exempt path is still protected."""
    async with proxied(app, "/api") as c:
        lookalike = await c.get("/apipublic")
        other = await c.get("/other/public")
    assert (lookalike.status_code, other.status_code) == (401, 401)


def test_exempt_path_under_uvicorn_root_path(tmp_path: Path) -> None:
    """Under ``uvicorn --root-path /api`` the exempt health route answers without a key."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def mint() -> CreatedKey:
        async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
            return await manager.create(owner="acme", name="proxy")

    created = anyio.run(mint)
    with uvicorn_server(url, tmp_path / "server.log", root_path="/api", startup_timeout=15) as s:
        stats = httpx.get(f"{s.base_url}/stats", timeout=10)
        anonymous = httpx.get(f"{s.base_url}/whoami", timeout=10)
        keyed = httpx.get(f"{s.base_url}/whoami", headers={"X-API-Key": created.key}, timeout=10)
    assert stats.status_code == 200
    assert anonymous.status_code == 401
    assert keyed.status_code == 200
    assert keyed.json()["key_id"] == created.id


# -- credentials never reach the app ------------------------------------------------------


async def test_exempt_path_strips_keystile_credentials(
    app: APIKeyMiddleware, key: CreatedKey
) -> None:
    """A key sent to an exempt path is removed before the app (and its access log) sees it."""
    async with client(app) as c:
        header = await c.get("/public", headers={"X-API-Key": key.key})
        bearer = await c.get("/public", headers={"Authorization": f"Bearer {key.key}"})
        garbage = await c.get("/public", headers={"X-API-Key": "not a key"})
    for r in (header, bearer, garbage):
        assert r.status_code == 200
        assert "x-api-key" not in r.json()["headers"]
        assert "authorization" not in r.json()["headers"]


async def test_exempt_path_keeps_other_credentials(app: APIKeyMiddleware) -> None:
    """A non-keystile Authorization header on an exempt path reaches the app untouched."""
    async with client(app) as c:
        r = await c.get("/public", headers={"Authorization": f"Bearer {JWT}"})
        basic = await c.get("/public", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert "authorization" in r.json()["headers"]
    assert "authorization" in basic.json()["headers"]


async def test_other_authorization_scheme_kept_beside_a_key(
    app: APIKeyMiddleware, key: CreatedKey
) -> None:
    """With a valid X-API-Key, an Authorization header of another scheme is left for the app."""
    async with client(app) as c:
        r = await c.get(
            "/whoami", headers={"X-API-Key": key.key, "Authorization": "Basic dXNlcjpwYXNz"}
        )
    assert r.status_code == 200
    assert "authorization" in r.json()["headers"]
    assert "x-api-key" not in r.json()["headers"]


# -- API keys beside OAuth ----------------------------------------------------------------


async def test_foreign_bearer_passes_as_anonymous_when_optional(
    optional_app: APIKeyMiddleware,
) -> None:
    """With required=False, a bearer token not in keystile's format goes on untouched."""
    async with client(optional_app) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {JWT}"})
    assert r.status_code == 200
    assert r.json()["authenticated"] is False
    assert "authorization" in r.json()["headers"]


async def test_key_still_verified_when_optional(
    optional_app: APIKeyMiddleware, key: CreatedKey
) -> None:
    """With required=False a keystile key as a bearer token is verified and stripped."""
    async with client(optional_app) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {key.key}"})
    assert r.status_code == 200
    assert r.json()["display_name"] == "apikey:ci"
    assert "authorization" not in r.json()["headers"]


@pytest.mark.parametrize(
    "token",
    [
        "ks_garbage",
        "ks_",
        "ks_AAAAAAAAAAAA_" + "B" * 49,
        "acme_AAAAAAAAAAAA_" + "B" * 49,
    ],
)
async def test_malformed_keystile_key_refused_when_optional(
    optional_app: APIKeyMiddleware, token: str
) -> None:
    """With required=False a malformed or wrong keystile key is still refused."""
    async with client(optional_app) as c:
        bearer = await c.get("/whoami", headers={"Authorization": f"Bearer {token}"})
        header = await c.get("/whoami", headers={"X-API-Key": token})
    assert (bearer.status_code, header.status_code) == (401, 401)
    assert bearer.json()["error"] == "invalid_token"


async def test_wrong_secret_refused_when_optional(
    optional_app: APIKeyMiddleware, key: CreatedKey
) -> None:
    """With required=False a real key id with a wrong secret is refused."""
    from keystile.tokens import generate_key

    wrong, _ = generate_key("ks", key.id)
    async with client(optional_app) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401


async def test_foreign_bearer_refused_when_required(app: APIKeyMiddleware) -> None:
    """With required=True (the default) any bearer token must be a valid key."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {JWT}"})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"


async def test_custom_key_prefix_is_recognised(store: MemoryKeyStore) -> None:
    """A prefix named in key_prefixes marks a truncated token as a keystile key."""
    middleware = protect(store, required=False, key_prefixes=["acme"])
    async with client(middleware) as c:
        r = await c.get("/whoami", headers={"Authorization": "Bearer acme_truncated"})
        jwt = await c.get("/whoami", headers={"Authorization": f"Bearer {JWT}"})
    await middleware.aclose()
    assert r.status_code == 401
    assert jwt.status_code == 200


# -- keys on exempt paths -----------------------------------------------------------------


async def test_valid_key_on_exempt_path_is_seen_by_the_route(
    app: APIKeyMiddleware, key: CreatedKey
) -> None:
    """A valid key sent to an exempt path is verified: the route sees it, without the header."""
    async with client(app) as c:
        r = await c.get("/public", headers={"Authorization": f"Bearer {key.key}"})
    assert r.status_code == 200
    assert r.json()["display_name"] == "apikey:ci"
    assert "authorization" not in r.json()["headers"]


@pytest.mark.parametrize("token", ["ks_garbage", "ks_AAAAAAAAAAAA_" + "B" * 49])
async def test_invalid_key_on_exempt_path_goes_on_anonymous(
    app: APIKeyMiddleware, token: str
) -> None:
    """An exempt path never refuses: an invalid key is dropped and counted."""
    async with client(app) as c:
        r = await c.get("/public", headers={"X-API-Key": token})
        conflict = await c.get("/public", headers={"X-API-Key": token, "Authorization": "Bearer x"})
    assert r.status_code == conflict.status_code == 200
    assert r.json()["authenticated"] is False
    assert "x-api-key" not in r.json()["headers"]
    assert sum(app.stats().rejects.values()) == 2
