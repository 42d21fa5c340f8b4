"""KeystilePlugin's OpenAPI document against what keystile sends: every refusal, sent for
real and by a fuzzer, must be documented with its status, body and headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar, Request, get, post
from litestar.params import FromPath, JSONBody

from apps import client
from keystile import CHEAPEST_PARAMETERS, APIKeyUser, KeyManager, KeyStore, MemoryKeyStore
from keystile.litestar import KeystilePlugin, require_scopes
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

EXEMPT = ["/health", "/mine"]


@dataclass
class Item:
    name: str


@get("/whoami")
async def whoami(request: Request[APIKeyUser, Any, Any]) -> dict[str, str]:
    return {"id": request.user.key_id}


@get("/items/{item_id:int}", guards=[require_scopes("items:read")])
async def get_item(item_id: FromPath[int]) -> dict[str, int]:
    return {"id": item_id}


@post("/items", guards=[require_scopes("items:write")])
async def create_item(data: JSONBody[Item]) -> dict[str, str]:
    return {"name": data.name}


@get("/health")
async def health() -> str:
    return "ok"


@get("/mine", guards=[require_scopes("items:read")])
async def mine(request: Request[APIKeyUser, Any, Any]) -> dict[str, str]:
    return {"id": request.user.key_id}


def build_app(store: KeyStore, **options: Any) -> tuple[Litestar, KeystilePlugin]:
    plugin = KeystilePlugin(store=store, argon2=CHEAPEST_PARAMETERS, exempt_paths=EXEMPT, **options)
    app = Litestar(
        route_handlers=[whoami, get_item, create_item, health, mine],
        plugins=[plugin],
        logging_config=None,
    )
    return app, plugin


@dataclass
class Setup:
    app: Litestar
    down: Litestar
    keys: Keys
    document: dict[str, Any]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    store = MemoryKeyStore()
    keys = await make_keys(KeyManager(store, argon2=CHEAPEST_PARAMETERS))
    (app, plugin), (down, down_plugin) = build_app(store), build_app(DownStore())
    async with client(app) as c:
        document = (await c.get("/schema/openapi.json")).json()
    yield Setup(app, down, keys, document)
    await plugin.middleware.aclose()
    await down_plugin.middleware.aclose()


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
    """For each documented refusal, the headers declared are the keystile headers sent."""
    sent = [
        (template, method, response)
        for _, method, template, response, _, _ in await send_all(setup.app, setup.down, setup.keys)
    ]
    assert sent_against_declared(setup.document, sent) == {}


async def test_error_schema_lists_every_code(setup: Setup) -> None:
    """The error bodies' schemas, together, enumerate every error code keystile sends."""
    codes: set[str] = set()
    for item in setup.document["paths"].values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                for each in (schema or {}).get("anyOf", [schema]):
                    codes.update(
                        (each or {}).get("properties", {}).get("error", {}).get("enum", ())
                    )
    assert codes == error_codes()


async def test_fuzzer_finds_nothing_undocumented(setup: Setup) -> None:
    """schemathesis, with random credentials, none, and each test key, finds no status,
    header or body keystile sends that the document does not describe."""
    keys = setup.keys
    credentials: dict[str, dict[str, str] | None] = {
        "generated": None,
        "none": {},
        "full": key(keys.full),
        "writer": {"Authorization": f"Bearer {keys.writer}"},
        "remote": key(keys.remote),
        "limited": key(keys.limited),
        "used_up": key(keys.used_up),
    }
    async with client(setup.app) as c:
        found, statuses = await fuzz(c, setup.document, credentials)
    assert found == []
    assert {400, 401} <= statuses["generated"]
    assert 401 in statuses["none"]
    assert {200, 201} <= statuses["full"]
    assert 403 in statuses["writer"] and 403 in statuses["remote"]
    assert 429 in statuses["limited"] and 429 in statuses["used_up"]


async def test_rate_limit_headers_on_success_are_documented() -> None:
    """With rate_limit_headers=True, the RateLimit fields on what the app answers (a 200,
    a guard's 403) are declared there."""
    store = MemoryKeyStore()
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    created = await manager.create(
        owner="acme", name="k", scopes=["items:read"], rate_limit="5/minute"
    )
    app, plugin = build_app(store, rate_limit_headers=True)
    async with client(app) as c:
        document = (await c.get("/schema/openapi.json")).json()
        ok = await c.get("/whoami", headers=key(created.key))
        refused = await c.post("/items", headers=key(created.key), json={"name": "tea"})
    await plugin.middleware.aclose()
    assert "ratelimit" in ok.headers and refused.status_code == 403
    assert failures(document, "/whoami", "GET", ok) == ""
    assert failures(document, "/items", "POST", refused) == ""


async def test_required_false_and_on_error_are_documented() -> None:
    """required=False lets an unguarded operation be called without a key ({}), a guarded
    one not; on_error leaves the middleware's statuses without a body."""
    from starlette.responses import JSONResponse

    app, plugin = build_app(
        MemoryKeyStore(), required=False, on_error=lambda conn, exc: JSONResponse({}, 401)
    )
    paths = app.openapi_schema.to_schema()["paths"]
    await plugin.middleware.aclose()
    assert paths["/whoami"]["get"]["security"][-1] == {}
    assert {} not in paths["/items"]["post"]["security"]
    assert "content" not in paths["/whoami"]["get"]["responses"]["401"]
    # 403 is on_error's ip_not_allowed or the guard's insufficient_scope: no one body.
    assert "content" not in paths["/items"]["post"]["responses"]["403"]
