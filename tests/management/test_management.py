"""keystile.management over real HTTP (ASGI): the owner-scoped API on every store, its
policy caps, bad input, and the threats it answers (another owner, CSRF, oversized bodies)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from apps import client, keys_page_app
from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.management import KeyPolicy, management_app

pytestmark = pytest.mark.anyio

POLICY = KeyPolicy(
    grantable_scopes={"items:read", "items:write"},
    max_keys=5,
    max_lifetime="366d",
    default_expires_in="90d",
    rate_limit="100/minute",
)
JSON = {"content-type": "application/json"}


def owner_of(request: Request) -> str | None:
    """The app's own idea of who is signed in: here a header the test sets."""
    return request.headers.get("x-signed-in")


def build(database_url: str, **options: Any) -> Starlette:
    """An app with the management API at /account/keys and a route protected by keystile."""
    keys = management_app(
        database_url=database_url,
        owner=owner_of,
        policy=options.pop("policy", POLICY),
        argon2=CHEAPEST_PARAMETERS,
        **options,
    )
    return keys_page_app(database_url, "/account/keys", keys)


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client(build(database_url)) as c:
        yield c


def as_(owner: str) -> dict[str, str]:
    return {"x-signed-in": owner, **JSON}


async def create(http: httpx.AsyncClient, owner: str = "acme", **body: Any) -> httpx.Response:
    return await http.post("/account/keys/", json={"name": "ci", **body}, headers=as_(owner))


async def events_of(database_url: str, owner: str) -> list[str]:
    async with KeyManager.from_url(database_url) as manager:
        return [e.action for e in await manager.events(owner=owner)]


async def test_create_shows_the_secret_once(http: httpx.AsyncClient) -> None:
    """201 with the key and no-store; reading the key later never shows the secret."""
    made = await create(http, scopes=["items:read"])
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    body = made.json()
    assert body["key"].startswith(f"ks_{body['id']}_")
    assert body["scopes"] == ["items:read"] and body["status"] == "active"
    again = await http.get(f"/account/keys/{body['id']}", headers=as_("acme"))
    assert again.status_code == 200
    assert "key" not in again.json() and body["key"] not in again.text
    listed = await http.get("/account/keys/", headers=as_("acme"))
    assert body["key"] not in listed.text


async def test_created_key_works_and_revoking_it_stops_it(http: httpx.AsyncClient) -> None:
    """A key made through the API authenticates at once; DELETE revokes it (401 after)."""
    body = (await create(http)).json()
    bearer = {"authorization": f"Bearer {body['key']}"}
    assert (await http.get("/whoami", headers=bearer)).json() == {"key": "apikey:ci"}
    revoked = await http.delete(f"/account/keys/{body['id']}", headers=as_("acme"))
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_now"] is True
    assert (await http.get("/whoami", headers=bearer)).status_code == 401
    again = await http.delete(f"/account/keys/{body['id']}", headers=as_("acme"))
    assert again.json()["revoked_now"] is False


async def test_list_filters(http: httpx.AsyncClient) -> None:
    """state, name_prefix and expiring_within each narrow the list."""
    soon = (await create(http, name="ci-soon", expires_in="2d")).json()
    later = (await create(http, name="ci-later", expires_in="30d")).json()
    other = (await create(http, name="deploy")).json()
    await http.delete(f"/account/keys/{other['id']}", headers=as_("acme"))

    async def ids(query: str) -> list[str]:
        response = await http.get(f"/account/keys/?{query}", headers=as_("acme"))
        assert response.status_code == 200, response.text
        return [key["id"] for key in response.json()["keys"]]

    assert await ids("") == [soon["id"], later["id"], other["id"]]
    assert await ids("state=revoked") == [other["id"]]
    assert await ids("state=active&name_prefix=ci-") == [soon["id"], later["id"]]
    assert await ids("expiring_within=7d") == [soon["id"]]
    bad = await http.get("/account/keys/?state=lost", headers=as_("acme"))
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid_field")


async def test_another_owners_key_is_404(http: httpx.AsyncClient, database_url: str) -> None:
    """Every endpoint answers another owner's key as one that does not exist, and
    changes nothing."""
    theirs = (await create(http, owner="globex")).json()
    before = await events_of(database_url, "globex")
    path = f"/account/keys/{theirs['id']}"
    attempts = [
        http.get(path, headers=as_("acme")),
        http.patch(path, json={"name": "mine"}, headers=as_("acme")),
        http.delete(path, headers=as_("acme")),
        http.post(f"{path}/rotate", json={}, headers=as_("acme")),
        http.get(f"{path}/usage", headers=as_("acme")),
        http.get(f"{path}/events", headers=as_("acme")),
    ]
    unknown = await http.get("/account/keys/AAAAAAAAAAAA", headers=as_("acme"))
    for response in [await attempt for attempt in attempts]:
        assert response.status_code == 404, response.text
        assert response.json() == unknown.json() == {"error": "not_found", "detail": "No such key."}
    assert await events_of(database_url, "globex") == before
    mine = await http.get(path, headers=as_("globex"))
    assert (mine.json()["name"], mine.json()["status"]) == ("ci", "active")


async def test_nobody_signed_in_is_401(http: httpx.AsyncClient) -> None:
    """The owner callable returned None (or an owner that is not valid): 401, the body."""
    for headers in (JSON, {"x-signed-in": " spaced ", **JSON}):
        for response in (
            await http.get("/account/keys/", headers=headers),
            await http.post("/account/keys/", json={"name": "x"}, headers=headers),
        ):
            assert response.status_code == 401
            assert response.json()["error"] == "unauthorized"


async def test_policy_scopes(http: httpx.AsyncClient, database_url: str) -> None:
    """A scope the policy does not grant: 403 on create and update, nothing changed."""
    refused = await create(http, scopes=["items:read", "admin"])
    assert refused.status_code == 403
    assert refused.json()["error"] == "scope_not_grantable" and "admin" in refused.json()["detail"]
    made = (await create(http, scopes=["items:read"])).json()
    patched = await http.patch(
        f"/account/keys/{made['id']}", json={"scopes": ["admin"]}, headers=as_("acme")
    )
    assert patched.status_code == 403
    assert await events_of(database_url, "acme") == ["created"]


async def test_policy_lifetime_and_default(http: httpx.AsyncClient) -> None:
    """No expiry asked: the default (90 days). Past the maximum, or no expiry at all on
    update: 403 lifetime_exceeded."""
    made = (await create(http)).json()
    created = datetime.fromisoformat(made["created_at"])
    expires = datetime.fromisoformat(made["expires_at"])
    assert abs(expires - created - timedelta(days=90)) < timedelta(seconds=5)
    too_long = await create(http, name="long", expires_in="400d")
    assert (too_long.status_code, too_long.json()["error"]) == (403, "lifetime_exceeded")
    far = (datetime.now(timezone.utc) + timedelta(days=367)).isoformat()
    for change in ({"expires_at": None}, {"expires_at": far}):
        patched = await http.patch(f"/account/keys/{made['id']}", json=change, headers=as_("acme"))
        assert (patched.status_code, patched.json()["error"]) == (403, "lifetime_exceeded")
    fine = await http.patch(
        f"/account/keys/{made['id']}", json={"expires_in": "10d"}, headers=as_("acme")
    )
    assert fine.status_code == 200


async def test_customer_cannot_set_limits(http: httpx.AsyncClient) -> None:
    """The plan comes from the policy; a body that sets limits or a quota is refused."""
    made = (await create(http)).json()
    assert made["rate_limit"] == "100/minute"
    for field, value in (("rate_limit", "1000/second"), ("quota", 10**9), ("quota_refill", "1s")):
        response = await create(http, name=f"x-{field}", **{field: value})
        assert (response.status_code, response.json()["error"]) == (422, "unknown_field")
        patched = await http.patch(
            f"/account/keys/{made['id']}", json={field: value}, headers=as_("acme")
        )
        assert (patched.status_code, patched.json()["error"]) == (422, "unknown_field")


async def test_max_keys(http: httpx.AsyncClient) -> None:
    """At most max_keys live keys; a revoked one frees its place."""
    made = [(await create(http, name=f"k{i}")).json() for i in range(5)]
    refused = await create(http, name="k5")
    assert (refused.status_code, refused.json()["error"]) == (403, "key_limit_reached")
    await http.delete(f"/account/keys/{made[0]['id']}", headers=as_("acme"))
    assert (await create(http, name="k5")).status_code == 201


async def test_concurrent_creates_cannot_pass_max_keys(database_url: str) -> None:
    """Twelve creates at once with max_keys=3: exactly three keys, counted in the insert's
    transaction."""
    policy = KeyPolicy(grantable_scopes=(), max_keys=3)
    async with client(build(database_url, policy=policy)) as http:
        responses = await asyncio.gather(*(create(http, name=f"n{i}") for i in range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] * 3 + [403] * 9
        listed = await http.get("/account/keys/", headers=as_("acme"))
        assert len(listed.json()["keys"]) == 3


async def test_rotate(http: httpx.AsyncClient) -> None:
    """A successor with a new secret, once; the old key works for the grace; a grace past
    the policy's maximum is 403; rotating twice is 409."""
    old = (await create(http, scopes=["items:read"])).json()
    path = f"/account/keys/{old['id']}/rotate"
    too_long = await http.post(path, json={"grace": "30d"}, headers=as_("acme"))
    assert (too_long.status_code, too_long.json()["error"]) == (403, "grace_exceeded")
    rotated = await http.post(path, json={"grace": "1h"}, headers=as_("acme"))
    assert rotated.status_code == 201 and rotated.headers["cache-control"] == "no-store"
    new = rotated.json()
    assert new["replaces"] == old["id"] and new["scopes"] == ["items:read"]
    for key in (old["key"], new["key"]):
        assert (await http.get("/whoami", headers={"x-api-key": key})).status_code == 200
    again = await http.post(path, headers=as_("acme"))
    assert (again.status_code, again.json()["error"]) == (409, "already_rotated")


async def test_usage_and_events(database_url: str) -> None:
    """Usage counts the key's requests; events name the actor (owner:<owner>, or actor=)."""
    app = build(database_url, actor=lambda request: request.headers.get("x-person"))
    async with client(app) as http:
        made = (await create(http)).json()
        await http.patch(
            f"/account/keys/{made['id']}",
            json={"name": "renamed"},
            headers={**as_("acme"), "x-person": "ada@acme.test"},
        )
        await http.get("/whoami", headers={"x-api-key": made["key"]})
        await app.middleware_stack.app.recorder.flush()  # type: ignore[union-attr]
        usage = await http.get(f"/account/keys/{made['id']}/usage?by=minute", headers=as_("acme"))
        assert usage.status_code == 200
        assert sum(b["requests"] for b in usage.json()["buckets"]) == 1
        events = await http.get(f"/account/keys/{made['id']}/events", headers=as_("acme"))
        actions = [(e["action"], e["actor"]) for e in events.json()["events"]]
        assert actions == [("created", "owner:acme"), ("updated", "ada@acme.test")]


# -- bad input and threats ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "status", "error"),
    [
        (b'{"name": ', JSON, 400, "malformed_json"),
        (b'{"name": NaN}', JSON, 400, "malformed_json"),
        (b'["name"]', JSON, 422, "invalid_body"),
        (b'{"name": "x", "owner": "globex"}', JSON, 422, "unknown_field"),
        (b'{"name": 7}', JSON, 422, "invalid_field"),
        (b'{"name": "x", "scopes": "items:read"}', JSON, 422, "invalid_field"),
        (b'{"name": "x", "expires_in": "soon"}', JSON, 422, "invalid_field"),
        (b'{"name": "x", "expires_at": "2030-01-01T00:00:00"}', JSON, 422, "invalid_field"),
        (
            b'{"name": "x", "metadata": {"a": "' + b"x" * 20_000 + b'"}}',
            JSON,
            413,
            "body_too_large",
        ),
        # A cross-site HTML form can send these three types, and only these: refused.
        (b"name=x", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
        (b'{"name": "x"}', {"content-type": "text/plain"}, 415, None),
        (b"--b\r\n\r\nx\r\n--b--", {"content-type": "multipart/form-data; boundary=b"}, 415, None),
        (b'{"name": "x"}', {}, 415, "unsupported_media_type"),
    ],
)
async def test_bad_bodies_change_nothing(
    http: httpx.AsyncClient,
    database_url: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    error: str | None,
) -> None:
    """Malformed, unknown, mistyped, oversized or non-JSON bodies: a 4xx with the error
    body, and no key made."""
    response = await http.post(
        "/account/keys/", content=content, headers={"x-signed-in": "acme", **headers}
    )
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "detail"}
    assert response.json()["error"] == (error or "unsupported_media_type")
    assert await events_of(database_url, "acme") == []


async def test_oversized_body_without_length_is_refused(http: httpx.AsyncClient) -> None:
    """A chunked body (no Content-Length) is cut off at the cap too."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "x", "metadata": {"a": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}}'

    response = await http.post("/account/keys/", content=chunks(), headers=as_("acme"))
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")


@pytest.mark.parametrize(
    "key_id", ["short", "ks_AbC123def456", "A" * 13, "AAAAAAAAAAA%21", "..%2F.."]
)
async def test_ids_in_the_wrong_form_are_404(http: httpx.AsyncClient, key_id: str) -> None:
    """An id that cannot be a key id: 404, as an unknown one."""
    for method in ("GET", "PATCH", "DELETE"):
        response = await http.request(
            method, f"/account/keys/{key_id}", headers=as_("acme"), content=b"{}"
        )
        assert response.status_code == 404, (method, key_id, response.text)


async def test_markup_in_a_name_is_data(http: httpx.AsyncClient) -> None:
    """A name with markup is stored and returned as JSON text: the API renders no HTML."""
    name = "<script>alert(1)</script>"
    made = await create(http, name=name)
    assert made.headers["content-type"] == "application/json"
    assert made.json()["name"] == name


async def test_openapi_document(http: httpx.AsyncClient) -> None:
    """An OpenAPI 3.1 document of every endpoint, served beside them."""
    response = await http.get("/account/keys/openapi.json")
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "/account/keys"}]
    operations = {(m, p) for p, item in document["paths"].items() for m in item}
    assert operations == {
        ("get", "/"),
        ("post", "/"),
        ("get", "/{key_id}"),
        ("patch", "/{key_id}"),
        ("delete", "/{key_id}"),
        ("post", "/{key_id}/rotate"),
        ("get", "/{key_id}/usage"),
        ("get", "/{key_id}/events"),
    }
    create_op = document["paths"]["/"]["post"]
    assert create_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeyCreate"
    }
    json.dumps(document)
