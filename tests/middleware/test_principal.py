"""The principal a request gets: its own ``request.auth``, and an immutable ``request.user``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apps import client
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, APIKeyUser, KeyManager, MemoryKeyStore

pytestmark = pytest.mark.anyio


async def escalate(request: Request) -> JSONResponse:
    """A careless handler: it changes what the request was granted."""
    request.auth.scopes.append("admin")
    refused = []
    for attribute, value in (("scopes", ("admin",)), ("owner", "someone-else")):
        try:
            setattr(request.user, attribute, value)
        except AttributeError:
            refused.append(attribute)
    try:
        request.user.metadata["plan"] = "enterprise"  # type: ignore[index]
    except TypeError:
        refused.append("metadata")
    try:
        request.user.metadata["tags"].append("admin")
    except AttributeError:
        refused.append("nested metadata")
    return JSONResponse({"refused": refused})


@requires("admin")
async def admin(request: Request) -> JSONResponse:
    return JSONResponse({"admin": True, "scopes": request.auth.scopes})


@pytest.fixture
async def app() -> AsyncIterator[tuple[Starlette, str]]:
    store = MemoryKeyStore()
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(
        owner="acme", name="ci", scopes=["read"], metadata={"plan": "free", "tags": ["ci"]}
    )
    inner = Starlette(routes=[Route("/escalate", escalate), Route("/admin", admin)])
    middleware = APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS)
    yield middleware, created.key  # type: ignore[misc]
    await middleware.aclose()


async def test_each_request_gets_its_own_auth_credentials(app: tuple[Starlette, str]) -> None:
    """A scope appended to request.auth in one request is not granted to the next one."""
    middleware, key = app
    async with client(middleware) as c:
        await c.get("/escalate", headers={"X-API-Key": key})
        later = await c.get("/admin", headers={"X-API-Key": key})
        again = await c.get("/escalate", headers={"X-API-Key": key})
    assert later.status_code == 403
    assert again.status_code == 200


async def test_request_user_is_immutable(app: tuple[Starlette, str]) -> None:
    """Attributes and metadata (nested values too) of request.user cannot be changed."""
    middleware, key = app
    async with client(middleware) as c:
        r = await c.get("/escalate", headers={"X-API-Key": key})
    assert r.json()["refused"] == ["scopes", "owner", "metadata", "nested metadata"]


def test_api_key_user_rejects_assignment() -> None:
    """APIKeyUser has no setter and no deleter, and its metadata is a read-only copy."""
    source = {"team": "infra", "limits": {"rps": 10}}
    user = APIKeyUser(key_id="AbC123def456", owner="acme", name="ci", metadata=source)
    with pytest.raises(AttributeError):
        user.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del user.owner
    source["team"] = "changed"
    assert user.metadata["team"] == "infra"
    assert user.metadata["limits"]["rps"] == 10


def test_every_key_holds_the_authenticated_scope() -> None:
    """has_scopes agrees with request.auth: "authenticated" is held by every key."""
    user = APIKeyUser(key_id="AbC123def456", owner="acme", name="ci", scopes=("read",))
    assert user.has_scopes("authenticated", "read")
    assert not user.has_scopes("write")


def test_cached_principals_share_what_they_can() -> None:
    """Keys with the same scopes share one tuple, keys without metadata one empty mapping."""
    first = APIKeyUser(key_id="AbC123def456", owner="acme", name="a", scopes=["read"])
    second = APIKeyUser(key_id="AbC123def457", owner="acme", name="b", scopes=("read",))
    assert first.scopes is second.scopes
    assert first.metadata is second.metadata
    assert dict(first.metadata) == {}
