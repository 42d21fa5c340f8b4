"""GitHub's public keys read from a real HTTP server on 127.0.0.1: cached, read again when
a report names a key the cache lacks (at most once per interval), never from a URL a
request could choose, never through a redirect."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from github_signing import SigningKey, keys_document, post, report
from keystile import CHEAPEST_PARAMETERS, KeyManager, MemoryKeyStore
from keystile.scanning import secret_scanning_app
from loopback import serving

pytestmark = pytest.mark.anyio


class GitHubKeys:
    """The public-keys document as GitHub would serve it, with a log of every request."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.requests: list[str] = []
        self.status = 200
        self.redirect_to: str | None = None

    async def document(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        if self.redirect_to is not None:
            return RedirectResponse(self.redirect_to)
        if self.status != 200:
            return Response("down", status_code=self.status)
        return JSONResponse(keys_document(*self.keys))

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.document)])


async def leaked_key(store: MemoryKeyStore) -> tuple[KeyManager, str, str]:
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    created = await manager.create(owner="acme", name="ci")
    return manager, created.key, created.id


async def test_keys_are_fetched_once_and_cached() -> None:
    github = GitHubKeys(SigningKey.generate("k1"))
    store = MemoryKeyStore()
    manager, key, key_id = await leaked_key(store)
    async with serving(github.app()) as base:
        app = secret_scanning_app(manager=manager, keys_url=f"{base}/meta/public_keys")
        for _ in range(3):
            body = report(key)
            response = await post(app, body, github.keys[0].headers(body))
            assert response.status_code == 200
    assert github.requests == ["/meta/public_keys"]
    assert (await store.get(key_id)).revoked_at is not None  # type: ignore[union-attr]


async def test_a_rotated_github_key_is_fetched_when_first_named() -> None:
    old, new = SigningKey.generate("old"), SigningKey.generate("new")
    github = GitHubKeys(old)
    manager, key, _ = await leaked_key(MemoryKeyStore())
    async with serving(github.app()) as base:
        app = secret_scanning_app(manager=manager, keys_url=base + "/keys", refetch_interval=0)
        body = report("ghp_" + "a" * 36)
        assert (await post(app, body, old.headers(body))).status_code == 200
        github.keys.append(new)
        body = report(key)
        assert (await post(app, body, new.headers(body))).status_code == 200
    assert len(github.requests) == 2


async def test_a_flood_of_unknown_ids_fetches_at_most_once_per_interval() -> None:
    github = GitHubKeys(SigningKey.generate("k1"))
    store = MemoryKeyStore()
    manager, key, key_id = await leaked_key(store)
    async with serving(github.app()) as base:
        app = secret_scanning_app(manager=manager, keys_url=base + "/keys", refetch_interval=3600)
        body = report(key)
        for n in range(20):
            stranger = SigningKey.generate(f"random-{n}")
            response = await post(app, body, stranger.headers(body))
            assert (response.status_code, response.json()["error"]) == (401, "unknown_key_id")
    assert len(github.requests) == 1
    assert (await store.get(key_id)).is_active()  # type: ignore[union-attr]


@pytest.mark.parametrize("failure", ["down", "redirect"])
async def test_keys_that_cannot_be_read_are_503_and_change_nothing(failure: str) -> None:
    github = GitHubKeys(SigningKey.generate("k1"))
    elsewhere = GitHubKeys(*github.keys)  # the same keys, at a URL nobody configured
    store = MemoryKeyStore()
    manager, key, key_id = await leaked_key(store)
    async with serving(github.app()) as base, serving(elsewhere.app()) as other:
        if failure == "down":
            github.status = 502
        else:
            github.redirect_to = other + "/keys"
        app = secret_scanning_app(manager=manager, keys_url=base + "/keys")
        body = report(key)
        response = await post(app, body, github.keys[0].headers(body))
    assert (response.status_code, response.json()["error"]) == (503, "keys_unavailable")
    assert elsewhere.requests == []
    assert (await store.get(key_id)).is_active()  # type: ignore[union-attr]


async def test_no_url_in_a_request_is_ever_fetched() -> None:
    """A report may carry URLs anywhere (headers, body); only the configured one is read."""
    github = GitHubKeys(SigningKey.generate("k1"))
    attacker = GitHubKeys(SigningKey.generate("evil"))
    manager, key, _ = await leaked_key(MemoryKeyStore())
    async with serving(github.app()) as base, serving(attacker.app()) as evil:
        app = secret_scanning_app(manager=manager, keys_url=base + "/keys")
        body = report(key, url=evil + "/keys", source=evil)
        headers: dict[str, Any] = {
            **attacker.keys[0].headers(body),
            "Github-Public-Key-Url": evil + "/keys",
            "Host": evil.removeprefix("http://"),
            "Referer": evil + "/keys",
        }
        response = await post(app, body, headers)
    assert response.status_code == 401
    assert attacker.requests == []
    assert github.requests == ["/keys"]
