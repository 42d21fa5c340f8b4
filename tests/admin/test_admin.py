"""keystile.admin over real HTTP (ASGI) on every store: the guard asked on every request,
CSRF tokens on every form, escaping and the CSP, and each page and action."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from apps import client, keys_page_app
from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.admin import CSRFTokens, admin_app

pytestmark = pytest.mark.anyio

STAFF = {"x-staff": "ada@example.com"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
SECRET = b"s" * 32


def staff_actor(request: Request) -> str | None:
    """The app's decision: here a header the test sets stands for a staff session."""
    return request.headers.get("x-staff")


def build(database_url: str, **options: Any) -> Starlette:
    admin = admin_app(
        database_url=database_url,
        authorize=staff_actor,
        argon2=CHEAPEST_PARAMETERS,
        csrf_secret=SECRET,
        **options,
    )
    return keys_page_app(database_url, "/admin/keys", admin)


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client(build(database_url)) as c:
        yield c


@pytest.fixture
async def manager(database_url: str) -> AsyncIterator[KeyManager]:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as manager:
        yield manager


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


async def post(
    http: httpx.AsyncClient, path: str, data: dict[str, str], *, form_page: str | None = None
) -> httpx.Response:
    """Post a form the way a browser does: with the token of the page that holds it."""
    page = await http.get(form_page or path, headers=STAFF)
    return await http.post(path, data={"csrf": csrf_of(page), **data}, headers=STAFF)


async def test_unauthorized_is_403_everywhere(http: httpx.AsyncClient, manager: KeyManager) -> None:
    """authorize returns None: every page and action is 403, and nothing changes."""
    key = await manager.create(owner="acme", name="nightly-build")
    token = CSRFTokens(SECRET).make("ada@example.com")
    for response in (
        await http.get("/admin/keys/"),
        await http.get(f"/admin/keys/{key.id}"),
        await http.post(f"/admin/keys/{key.id}/revoke", data={"csrf": token, "confirm": key.id}),
        await http.post("/admin/keys/new", data={"csrf": token, "owner": "x", "name": "y"}),
    ):
        assert response.status_code == 403
        assert "nightly-build" not in response.text
    assert (await manager.get(key.id, owner="acme")).status() == "active"
    assert len(await manager.list_all()) == 1


async def test_create_shows_the_secret_once(http: httpx.AsyncClient) -> None:
    """The create form makes a key; its page shows the secret with a copy button, once;
    the key authenticates."""
    made = await post(
        http,
        "/admin/keys/new",
        {"owner": "acme", "name": "ci", "scopes": "items:read items:write", "expires": "30d"},
    )
    assert made.status_code == 200, made.text
    secret = re.search(r'<code id="secret">([^<]+)</code>', made.text)
    assert secret is not None
    assert 'data-copy="secret"' in made.text
    key = secret.group(1)
    assert (await http.get("/whoami", headers={"x-api-key": key})).json() == {"key": "apikey:ci"}
    listing = await http.get("/admin/keys/", headers=STAFF)
    assert key not in listing.text and ">ci<" in listing.text


async def test_post_without_a_valid_csrf_token_is_refused(
    http: httpx.AsyncClient, manager: KeyManager
) -> None:
    """No token, another actor's token, a forged or an expired one: 403, nothing changed."""
    key = await manager.create(owner="acme", name="ci")
    path = f"/admin/keys/{key.id}/revoke"
    now = CSRFTokens(SECRET)
    old = CSRFTokens(SECRET, clock=lambda: 1_000_000.0)
    for token in (
        None,
        now.make("mallory@example.com"),
        CSRFTokens(b"x" * 32).make("ada@example.com"),
        old.make("ada@example.com"),
        "1.2.3",
    ):
        data = {"confirm": key.id} | ({"csrf": token} if token else {})
        response = await http.post(path, data=data, headers=STAFF)
        assert response.status_code == 403, token
        assert "csrf_failed" in response.text
    assert (await manager.get(key.id, owner="acme")).status() == "active"
    assert [e.action for e in await manager.events(key_id=key.id)] == ["created"]


async def test_markup_is_escaped(http: httpx.AsyncClient, manager: KeyManager) -> None:
    """A name, metadata and event detail with markup show as text on every page."""
    name = "<script>alert(1)</script>"
    key = await manager.create(owner="<b>acme</b>", name=name, metadata={"x": "<img src=x>"})
    await manager.update(key.id, owner="<b>acme</b>", metadata={"y": "<svg onload=1>"})
    for path in ("/admin/keys/", f"/admin/keys/{key.id}", f"/admin/keys/{key.id}/edit"):
        page = await http.get(path, headers=STAFF)
        assert page.status_code == 200
        assert "<script>alert(1)" not in page.text and "<b>acme" not in page.text
        assert "<img" not in page.text and "<svg onload" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


async def test_strict_csp_with_a_nonce(http: httpx.AsyncClient) -> None:
    """Each page has a fresh nonce; the CSP allows only elements carrying it, no framing."""
    first, second = [await http.get("/admin/keys/", headers=STAFF) for _ in range(2)]
    policy = first.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
    assert nonce is not None
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    tags = re.findall(r"<(script|style)([^>]*)>", first.text)
    assert tags and all(f'nonce="{nonce.group(1)}"' in attrs for _, attrs in tags)
    assert nonce.group(1) not in second.headers["content-security-policy"]
    assert first.headers["cache-control"] == "no-store"
    assert first.headers["x-frame-options"] == "DENY"


async def test_key_page_and_actions(http: httpx.AsyncClient, manager: KeyManager) -> None:
    """The key page shows its fields, chart and events; edit, disable, enable, rotate and
    revoke (after confirmation) work and are audited with authorize's actor."""
    key = await manager.create(owner="acme", name="ci", rate_limit="10/second", quota=100)
    page = await http.get(f"/admin/keys/{key.id}?range=7d", headers=STAFF)
    assert page.status_code == 200
    assert "10/second" in page.text and "100 of 100 left" in page.text
    assert "<svg" in page.text and page.text.count("<g><title>") == 169
    path = f"/admin/keys/{key.id}"
    edited = await post(http, f"{path}/edit", {"name": "ci-2", "scopes": "items:read"})
    assert edited.status_code == 303
    record = await manager.get(key.id, owner="acme")
    assert (record.name, record.scopes, record.quota) == ("ci-2", ("items:read",), 100)
    for action, state in (("disable", "disabled"), ("enable", "active")):
        done = await post(http, f"{path}/{action}", {}, form_page=path)
        assert done.status_code == 303
        assert (await manager.get(key.id, owner="acme")).status() == state
    unconfirmed = await post(http, f"{path}/revoke", {"confirm": "nope"})
    assert unconfirmed.status_code == 400
    rotated = await post(http, f"{path}/rotate", {"grace": "1m"}, form_page=path)
    assert rotated.status_code == 200 and 'id="secret"' in rotated.text
    revoked = await post(http, f"{path}/revoke", {"confirm": key.id})
    assert revoked.status_code == 303
    assert (await manager.get(key.id, owner="acme")).status() == "revoked"
    actors = {(e.action, e.actor) for e in await manager.events(key_id=key.id)}
    assert {
        ("updated", "ada@example.com"),
        ("disabled", "ada@example.com"),
        ("enabled", "ada@example.com"),
        ("rotated", "ada@example.com"),
        ("revoked", "ada@example.com"),
    } <= actors


async def test_list_filters_and_pages(database_url: str, manager: KeyManager) -> None:
    """Filters by owner, state, name and expiry; pages of page_size with links."""
    for i in range(5):
        await manager.create(owner="acme", name=f"ci-{i}")
    await manager.create(owner="globex", name="deploy", expires_in=timedelta(days=3))
    async with client(build(database_url, page_size=2)) as http:

        async def names(query: str) -> list[str]:
            page = await http.get(f"/admin/keys/?{query}", headers=STAFF)
            assert page.status_code == 200
            return re.findall(r'<td class="name">([^<]+)</td>', page.text)

        assert await names("owner=acme") == ["ci-0", "ci-1"]
        assert await names("owner=acme&page=3") == ["ci-4"]
        assert await names("name=DEPLOY") == ["deploy"]
        assert await names("expiring=7") == ["deploy"]
        assert await names("state=revoked") == []
        first = await http.get("/admin/keys/?owner=acme", headers=STAFF)
        assert 'href="/admin/keys/?owner=acme&amp;page=2"' in first.text


async def test_bad_requests(http: httpx.AsyncClient, manager: KeyManager) -> None:
    """A key id in the wrong form or unknown: 404; a JSON post: 415; a bad form field:
    the form again with the error, 422, nothing created."""
    for path in ("/admin/keys/short", "/admin/keys/AAAAAAAAAAAA", "/admin/keys/AAAAAAAAAAA%21"):
        assert (await http.get(path, headers=STAFF)).status_code == 404
    json_post = await http.post("/admin/keys/new", json={"owner": "x"}, headers=STAFF)
    assert json_post.status_code == 415
    bad = await post(http, "/admin/keys/new", {"owner": "acme", "name": "x", "quota": "lots"})
    assert bad.status_code == 422 and 'role="alert"' in bad.text
    assert await manager.list_all() == []
