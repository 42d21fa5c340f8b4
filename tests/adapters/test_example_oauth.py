"""examples/oauth_side_by_side.py over ASGI: an API key or an OAuth token on the same route."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from apps import client, installed_middleware, load_example
from keystile import CHEAPEST_PARAMETERS, CreatedKey, KeyManager, MemoryKeyStore
from keystile.tokens import generate_key

pytestmark = pytest.mark.anyio

OAUTH_TOKEN = "oauth-token-ada"
#: A JWT as an OAuth provider would issue it, but one the example's validator does not know.
UNKNOWN_JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib2JAZXhhbXBsZS5jb20ifQ"
    ".c2lnbmF0dXJlLW5vYm9keS1pc3N1ZWQ"
)


@pytest.fixture
def database_url() -> str:
    return f"memory://oauth-example-{uuid.uuid4().hex}"


@pytest.fixture
async def key(database_url: str) -> CreatedKey:
    store = MemoryKeyStore(database_url.removeprefix("memory://"))
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    return await manager.create(owner="acme", name="reports-bot")


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[FastAPI]:
    """The example's app, plus a route that shows what the app received."""
    example = load_example("oauth_side_by_side")
    app: FastAPI = example.create_app(database_url, argon2=CHEAPEST_PARAMETERS)

    @app.get("/seen")
    async def seen(request: Request) -> dict[str, Any]:
        return {
            "user": type(request.user).__name__,
            "scopes": request.auth.scopes,
            "authorization": request.headers.get("authorization"),
        }

    yield app
    if app.middleware_stack is not None:
        await installed_middleware(app).aclose()


async def get(app: FastAPI, path: str, headers: dict[str, str]) -> httpx.Response:
    async with client(app) as c:
        return await c.get(path, headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_api_key_caller_is_the_key(app: FastAPI, key: CreatedKey) -> None:
    """A keystile key, in either header, is the caller: audit name apikey:<name>."""
    for headers in (bearer(key.key), {"X-API-Key": key.key}):
        r = await get(app, "/reports", headers)
        assert r.status_code == 200
        assert r.json() == {"caller": "apikey:reports-bot", "via": "apikey"}


async def test_oauth_token_caller_is_the_person(app: FastAPI) -> None:
    """A known OAuth token reaches the app's validator: audit name the person's e-mail."""
    r = await get(app, "/reports", bearer(OAUTH_TOKEN))
    assert r.status_code == 200
    assert r.json() == {"caller": "ada@example.com", "via": "oauth"}


async def test_oauth_request_reaches_the_app_untouched(app: FastAPI) -> None:
    """keystile passes an OAuth token on as an anonymous request, Authorization intact."""
    r = await get(app, "/seen", bearer(OAUTH_TOKEN))
    assert r.json() == {
        "user": "UnauthenticatedUser",
        "scopes": [],
        "authorization": f"Bearer {OAUTH_TOKEN}",
    }


async def test_verified_key_is_stripped_from_the_app_view(app: FastAPI, key: CreatedKey) -> None:
    """A verified key is the request's user, and its header never reaches the app."""
    r = await get(app, "/seen", bearer(key.key))
    assert r.json() == {
        "user": "APIKeyUser",
        "scopes": ["authenticated"],
        "authorization": None,
    }


async def test_unknown_oauth_token_is_refused_by_the_app(app: FastAPI) -> None:
    """A non-keystile bearer token the validator does not know: 401 from the app, not keystile."""
    r = await get(app, "/reports", bearer(UNKNOWN_JWT))
    assert r.status_code == 401
    assert r.json() == {"detail": "The OAuth access token is not valid."}
    assert r.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'


async def test_no_credential_is_refused_by_the_app(app: FastAPI) -> None:
    """Neither a key nor a token: the caller dependency answers 401 with a bare challenge."""
    r = await get(app, "/reports", {})
    assert r.status_code == 401
    assert r.json() == {"detail": "Send an API key or an OAuth access token."}
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize(
    "token",
    ["ks_garbage", "ks_", "ks_AAAAAAAAAAAA_" + "B" * 49],
    ids=["garbage", "prefix-only", "bad-checksum"],
)
async def test_malformed_keystile_key_is_refused_by_keystile(app: FastAPI, token: str) -> None:
    """A token starting with ks_ is keystile's: a malformed one gets keystile's 401."""
    r = await get(app, "/reports", bearer(token))
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"
    assert r.json()["credential_source"] == "authorization"
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


@pytest.mark.parametrize("prefix", ["ks", "zz"])
async def test_unknown_key_in_full_shape_is_refused_by_keystile(app: FastAPI, prefix: str) -> None:
    """A well-formed key unknown to the store, whatever its prefix, is keystile's to refuse."""
    unknown, _ = generate_key(prefix)
    r = await get(app, "/reports", bearer(unknown))
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"


async def test_wrong_secret_is_refused_by_keystile(app: FastAPI, key: CreatedKey) -> None:
    """A real key id with another secret is refused by keystile."""
    wrong, _ = generate_key("ks", key.id)
    r = await get(app, "/reports", bearer(wrong))
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"


async def test_x_api_key_is_always_keystiles(app: FastAPI) -> None:
    """The X-API-Key header is verified as a key even when it holds an OAuth token."""
    r = await get(app, "/reports", {"X-API-Key": OAUTH_TOKEN})
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"
    assert r.json()["credential_source"] == "x-api-key"
