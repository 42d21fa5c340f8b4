"""protect()'s OpenAPI document against what keystile sends: every refusal, sent for real
and by a fuzzer, must be documented with its status, body and headers, and nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Security
from pydantic import BaseModel

from apps import client, installed_middleware
from keystile import CHEAPEST_PARAMETERS, KeyManager, MemoryKeyStore
from keystile.fastapi import APIKey, CurrentKey, OptionalKey, current_key, protect, require_scopes
from openapi_conformance import (
    DownStore,
    Keys,
    error_codes,
    failures,
    fuzz,
    key,
    make_keys,
    send_all,
    sent_against_declared,
)

pytestmark = pytest.mark.anyio

EXEMPT = ["/health", "/mine", "/maybe"]


class Item(BaseModel):
    name: str


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, str]:
        return {"id": key.key_id}

    @app.get("/items/{item_id}", dependencies=[Depends(require_scopes("items:read"))])
    async def get_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.post("/items", status_code=201)
    async def create_item(
        item: Item, key: Annotated[APIKey, Security(current_key, scopes=["items:write"])]
    ) -> dict[str, str]:
        return {"name": item.name}

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.get("/mine")
    async def mine(key: CurrentKey) -> dict[str, str]:
        return {"id": key.key_id}

    @app.get("/maybe")
    async def maybe(key: OptionalKey) -> dict[str, str | None]:
        return {"id": key.key_id if key else None}

    return app


@dataclass
class Setup:
    app: FastAPI
    down: FastAPI  # the same app over a store that cannot be read: 503
    keys: Keys
    document: dict[str, Any]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    store = MemoryKeyStore()
    keys = await make_keys(KeyManager(store, argon2=CHEAPEST_PARAMETERS))
    app, down = build_app(), build_app()
    protect(app, store=store, argon2=CHEAPEST_PARAMETERS, exempt_paths=EXEMPT)
    protect(down, store=DownStore(), argon2=CHEAPEST_PARAMETERS, exempt_paths=EXEMPT)
    async with client(app) as c:
        document = (await c.get("/openapi.json")).json()
    yield Setup(app, down, keys, document)
    for each in (app, down):
        if each.middleware_stack is not None:
            await installed_middleware(each).aclose()


async def test_every_refusal_is_documented(setup: Setup) -> None:
    """Each refusal keystile sends (400, 401, 403 of both kinds, 429 of both kinds, 503)
    has its status, JSON body and headers in the operation's documented responses."""
    problems = {}
    for what, method, template, response, status, code in await send_all(
        setup.app, setup.down, setup.keys
    ):
        assert (response.status_code, response.json()["error"]) == (status, code), what
        found = failures(setup.document, template, method, response)
        if found:
            problems[what] = found
    assert problems == {}


async def test_declared_headers_are_the_ones_sent(setup: Setup) -> None:
    """For each documented refusal, the headers declared are the keystile headers sent:
    WWW-Authenticate only where a challenge goes out, Retry-After and RateLimit only on
    the refusals that carry them."""
    sent = [
        (template, method, response)
        for _, method, template, response, _, _ in await send_all(setup.app, setup.down, setup.keys)
    ]
    assert sent_against_declared(setup.document, sent) == {}


async def test_required_headers_are_on_every_response_of_their_status(setup: Setup) -> None:
    """A header declared required is on every response of that status (Retry-After on a
    429 is optional: a quota without refill sends none)."""
    responses = setup.document["paths"]["/whoami"]["get"]["responses"]
    required = {
        status: sorted(
            name for name, header in responses[status]["headers"].items() if header.get("required")
        )
        for status in ("400", "401", "403", "429", "503")
    }
    assert required == {
        "400": ["Cache-Control", "WWW-Authenticate"],
        "401": ["Cache-Control", "WWW-Authenticate"],
        "403": ["Cache-Control"],
        "429": ["Cache-Control"],
        "503": ["Cache-Control", "Retry-After"],
    }


async def test_error_schema_lists_every_code(setup: Setup) -> None:
    """The error body's schema enumerates every error code keystile's bodies carry."""
    schema = setup.document["components"]["schemas"]["KeystileError"]
    assert set(schema["properties"]["error"]["enum"]) == error_codes()


async def test_fuzzer_finds_nothing_undocumented(setup: Setup) -> None:
    """schemathesis, with random credentials, none, and each test key, finds no status,
    header or body keystile sends that the document does not describe."""
    keys = setup.keys
    credentials: dict[str, dict[str, str] | None] = {
        "generated": None,
        "none": {},
        "full": key(keys.full),
        "reader": {"Authorization": f"Bearer {keys.reader}"},
        "remote": key(keys.remote),
        "limited": key(keys.limited),
        "used_up": key(keys.used_up),
    }
    async with client(setup.app) as c:
        found, statuses = await fuzz(c, setup.document, credentials)
    assert found == []
    # The run met the refusals it is meant to check.
    assert {400, 401} <= statuses["generated"]
    assert 401 in statuses["none"]
    assert {200, 201} <= statuses["full"]
    assert 403 in statuses["reader"] and 403 in statuses["remote"]
    assert 429 in statuses["limited"] and 429 in statuses["used_up"]


async def test_rate_limit_headers_on_success_are_documented() -> None:
    """With rate_limit_headers=True, the RateLimit fields the middleware adds to what the
    app answers (a 200, a dependency's 403) are declared there, and only there."""
    store = MemoryKeyStore()
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    created = await manager.create(
        owner="acme", name="k", scopes=["items:read"], rate_limit="5/minute"
    )
    app = build_app()
    protect(app, store=store, argon2=CHEAPEST_PARAMETERS, rate_limit_headers=True)
    async with client(app) as c:
        document = (await c.get("/openapi.json")).json()
        ok = await c.get("/whoami", headers=key(created.key))
        refused = await c.post("/items", headers=key(created.key), json={"name": "tea"})
        unauthorized = await c.get("/whoami")
    await installed_middleware(app).aclose()
    assert "ratelimit" in ok.headers and "ratelimit" in refused.headers
    assert refused.status_code == 403
    assert failures(document, "/whoami", "GET", ok) == ""
    assert failures(document, "/items", "POST", refused) == ""
    assert failures(document, "/whoami", "GET", unauthorized) == ""
    for status in ("400", "401", "503"):
        assert (
            "RateLimit" not in document["paths"]["/whoami"]["get"]["responses"][status]["headers"]
        )


async def test_on_error_leaves_the_middlewares_bodies_undocumented() -> None:
    """With on_error the app makes the middleware's responses: they are documented
    without a body and with optional headers, while a dependency's keep theirs."""
    from starlette.responses import JSONResponse

    app = build_app()
    protect(app, store=MemoryKeyStore(), on_error=lambda conn, exc: JSONResponse({}, 401))
    responses = app.openapi()["paths"]["/items"]["post"]["responses"]
    assert "content" not in responses["401"]
    assert not any(header["required"] for header in responses["401"]["headers"].values())
    assert "content" not in responses["403"]  # ip_not_allowed is the middleware's
    assert responses["403"]["headers"]["WWW-Authenticate"]["required"] is False
