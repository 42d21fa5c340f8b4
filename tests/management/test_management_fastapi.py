"""keystile.fastapi.key_management_router: the management endpoints on a FastAPI app, in
its own OpenAPI document, answering as ``management_app`` does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from apps import client
from keystile import CHEAPEST_PARAMETERS
from keystile.fastapi import CurrentKey, key_management_router, protect
from keystile.management import KeyPolicy

pytestmark = pytest.mark.anyio


def build(database_url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, str]:
        return {"key": key.display_name}

    app.include_router(
        key_management_router(
            database_url=database_url,
            owner=lambda request: request.headers.get("x-signed-in"),
            policy=KeyPolicy(grantable_scopes={"items:read"}, max_keys=2),
            argon2=CHEAPEST_PARAMETERS,
            prefix="/account/keys",
        )
    )
    protect(app, database_url=database_url, exempt_paths=["/account/*"], argon2=CHEAPEST_PARAMETERS)
    return app


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client(build(database_url)) as c:
        yield c


async def test_router_creates_keys_that_work(http: httpx.AsyncClient) -> None:
    """POST through the router: 201 with the secret once; the key passes the middleware;
    another owner's key is 404; a third key is past max_keys."""
    signed_in = {"x-signed-in": "acme"}
    made = await http.post("/account/keys/", json={"name": "ci"}, headers=signed_in)
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    key = made.json()["key"]
    assert (await http.get("/whoami", headers={"x-api-key": key})).json() == {"key": "apikey:ci"}
    other = await http.get(f"/account/keys/{made.json()['id']}", headers={"x-signed-in": "globex"})
    assert other.status_code == 404 and other.json() == {
        "error": "not_found",
        "detail": "No such key.",
    }
    await http.post("/account/keys/", json={"name": "two"}, headers=signed_in)
    third = await http.post("/account/keys/", json={"name": "three"}, headers=signed_in)
    assert (third.status_code, third.json()["error"]) == (403, "key_limit_reached")
    form = await http.post("/account/keys/", data={"name": "x"}, headers=signed_in)
    assert form.status_code == 415


async def test_router_in_the_apps_openapi(http: httpx.AsyncClient) -> None:
    """The app's /openapi.json lists every management operation with its body schema and
    refusals, and the key id as a path parameter."""
    document = (await http.get("/openapi.json")).json()
    paths = document["paths"]
    assert set(paths["/account/keys/"]) == {"get", "post"}
    assert set(paths["/account/keys/{key_id}"]) == {"get", "patch", "delete"}
    assert "post" in paths["/account/keys/{key_id}/rotate"]
    create = paths["/account/keys/"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["name"] and body["additionalProperties"] is False
    assert {"201", "401", "403", "413", "415", "422"} <= set(create["responses"])
    assert "200" not in create["responses"]
    revoke = paths["/account/keys/{key_id}"]["delete"]
    assert [p["name"] for p in revoke["parameters"]] == ["key_id"]
    assert "$ref" not in str(create)


def test_request_is_what_the_endpoint_takes() -> None:
    """The endpoints take the request alone (FastAPI declares nothing from the body)."""
    router = key_management_router(owner=lambda request: None, database_url="memory://r")
    for route in router.routes:
        assert list(route.dependant.query_params) == []  # type: ignore[attr-defined]
        assert route.dependant.request_param_name == "request"  # type: ignore[attr-defined]
