"""Litestar: the idiomatic DefineMiddleware line, the plugin, guards, OpenAPI and shutdown.

Litestar's default logging config reconfigures the root logger when an app is built.
The apps written here pass ``logging_config=None``; the docs' and the example's apps
keep Litestar's default, so the ``keep_root_logging`` fixture puts the root logger back.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from litestar import Litestar, Request, get
from litestar.middleware import DefineMiddleware
from litestar.testing import AsyncTestClient

from apps import EXAMPLES, client
from docblocks import INTEGRATION, block_under, mint
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, APIKeyUser, KeyManager
from keystile.litestar import KeystilePlugin, require_scopes

pytestmark = pytest.mark.anyio

KeyRequest = Request[APIKeyUser, Any, Any]
SECURITY = [{"bearerAuth": []}, {"apiKeyHeader": []}]


async def make_key(database_url: str, *scopes: str) -> str:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name="bot", scopes=list(scopes))
    return created.key


def numbered_handlers(count: int) -> list[Any]:
    """``count`` routes, each answering with the id of the runtime that served it."""
    handlers = []
    for i in range(count):

        @get(f"/r{i}", name=f"r{i}")
        async def route(request: KeyRequest) -> dict[str, Any]:
            return {"runtime": id(request.scope["keystile"].runtime)}  # type: ignore[typeddict-item]

        handlers.append(route)
    return handlers


@get("/whoami")
async def whoami(request: KeyRequest) -> dict[str, Any]:
    user = request.user
    return {
        "principal": type(user).__name__,
        "display_name": user.display_name,
        "scopes": request.auth.scopes,
    }


@get("/items", guards=[require_scopes("items:read")])
async def items() -> list[str]:
    return ["a", "b"]


@get("/health", guards=[require_scopes("items:read")])
async def guarded_health() -> str:
    return "ok"


@get("/public")
async def public() -> str:
    return "ok"


def plugin_app(database_url: str, **options: Any) -> tuple[Litestar, KeystilePlugin]:
    plugin = KeystilePlugin(
        database_url=database_url,
        argon2=CHEAPEST_PARAMETERS,
        exempt_paths=["/public", "/health"],
        **options,
    )
    app = Litestar(
        route_handlers=[whoami, items, guarded_health, public],
        plugins=[plugin],
        logging_config=None,
    )
    return app, plugin


# -- the idiomatic line ---------------------------------------------------------------


async def test_define_middleware_line_shares_one_runtime(sqlite_database_url: str) -> None:
    """DefineMiddleware over five handlers: one runtime, argon2 once, four cache hits."""
    key = await make_key(sqlite_database_url)
    app = Litestar(
        route_handlers=numbered_handlers(5),
        middleware=[
            DefineMiddleware(
                APIKeyMiddleware, database_url=sqlite_database_url, argon2=CHEAPEST_PARAMETERS
            )
        ],
        logging_config=None,
    )
    async with client(app) as c:
        answers = [await c.get(f"/r{i}", headers={"X-API-Key": key}) for i in range(5)]
    probe = APIKeyMiddleware(app, database_url=sqlite_database_url, argon2=CHEAPEST_PARAMETERS)
    stats = probe.stats()
    await probe.aclose()
    assert [a.status_code for a in answers] == [200] * 5
    assert {a.json()["runtime"] for a in answers} == {id(probe.runtime)}
    assert (stats.argon2_verifications, stats.cache_misses, stats.cache_hits) == (1, 1, 4)


async def test_define_middleware_line_refuses_without_a_key(sqlite_database_url: str) -> None:
    """The plain DefineMiddleware line answers keystile's 401 before the handler runs."""
    app = Litestar(
        route_handlers=[whoami],
        middleware=[DefineMiddleware(APIKeyMiddleware, database_url=sqlite_database_url)],
        logging_config=None,
    )
    async with client(app) as c:
        refused = await c.get("/whoami")
    await APIKeyMiddleware(app, database_url=sqlite_database_url).aclose()
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    assert refused.headers["www-authenticate"] == 'Bearer realm="api"'


# -- request.user and guards ----------------------------------------------------------


async def test_request_user_is_the_verified_key(sqlite_database_url: str) -> None:
    """request.user is the APIKeyUser and request.auth carries its scopes."""
    key = await make_key(sqlite_database_url, "items:read")
    app, plugin = plugin_app(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/whoami", headers={"Authorization": f"Bearer {key}"})
    await plugin.middleware.aclose()
    assert answer.json() == {
        "principal": "APIKeyUser",
        "display_name": "apikey:bot",
        "scopes": ["authenticated", "items:read"],
    }


async def test_guard_admits_a_key_with_the_scope(sqlite_database_url: str) -> None:
    """require_scopes lets a key holding the scope through to the handler."""
    key = await make_key(sqlite_database_url, "items:read")
    app, plugin = plugin_app(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/items", headers={"X-API-Key": key})
    await plugin.middleware.aclose()
    assert (answer.status_code, answer.json()) == (200, ["a", "b"])


async def test_guard_refuses_a_key_without_the_scope(sqlite_database_url: str) -> None:
    """A key lacking the scope gets 403 insufficient_scope with the RFC 6750 challenge."""
    key = await make_key(sqlite_database_url, "items:write")
    app, plugin = plugin_app(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/items", headers={"X-API-Key": key})
    stats = plugin.stats()
    await plugin.middleware.aclose()
    assert answer.status_code == 403
    assert answer.json() == {
        "error": "insufficient_scope",
        "detail": "Missing scope: items:read.",
        "required_scopes": ["items:read"],
        "missing_scopes": ["items:read"],
    }
    assert answer.headers["cache-control"] == "no-store"
    assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
    assert 'scope="items:read"' in answer.headers["www-authenticate"]
    assert stats.rejects["insufficient_scope"] == 1


async def test_guard_without_the_plugin_sends_the_body_under_extra(
    sqlite_database_url: str,
) -> None:
    """Without the plugin's handler, Litestar's own shape carries the same body in extra,
    with the same status and challenge."""
    key = await make_key(sqlite_database_url, "items:write")
    options = {"database_url": sqlite_database_url, "argon2": CHEAPEST_PARAMETERS}
    app = Litestar(
        route_handlers=[items],
        middleware=[DefineMiddleware(APIKeyMiddleware, **options)],
        logging_config=None,
    )
    async with client(app) as c:
        answer = await c.get("/items", headers={"X-API-Key": key})
    await APIKeyMiddleware(app, **options).aclose()
    assert answer.status_code == 403
    assert answer.json()["extra"]["missing_scopes"] == ["items:read"]
    assert answer.json()["extra"]["error"] == "insufficient_scope"
    assert 'scope="items:read"' in answer.headers["www-authenticate"]


async def test_guard_answers_401_on_an_exempt_path_without_a_key(
    sqlite_database_url: str,
) -> None:
    """On an exempt path a guarded route reached without a key answers 401, not 403."""
    app, plugin = plugin_app(sqlite_database_url)
    async with client(app) as c:
        answer = await c.get("/health")
    await plugin.middleware.aclose()
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer realm="api"'


def test_require_scopes_needs_a_scope() -> None:
    """A guard that requires nothing is a mistake, refused when the app is written."""
    with pytest.raises(ValueError, match="at least one scope"):
        require_scopes()


# -- the plugin: OpenAPI ----------------------------------------------------------------


async def test_plugin_declares_both_security_schemes(sqlite_database_url: str) -> None:
    """The OpenAPI document declares the bearer and X-API-Key header schemes."""
    app, plugin = plugin_app(sqlite_database_url, header_name="X-Token")
    async with client(app) as c:
        schema = (await c.get("/schema/openapi.json")).json()
    await plugin.middleware.aclose()
    assert schema["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key as a bearer token: `Authorization: Bearer <key>`.",
        },
        "apiKeyHeader": {
            "type": "apiKey",
            "name": "X-Token",
            "in": "header",
            "description": "An API key in the `X-Token` header.",
        },
    }


async def test_plugin_lists_security_on_protected_operations_only(
    sqlite_database_url: str,
) -> None:
    """Protected operations list either scheme, with the scopes their guards require; an
    exempt one lists them only if its guard needs a key."""
    app, plugin = plugin_app(sqlite_database_url)
    schema = app.openapi_schema.to_schema()
    await plugin.middleware.aclose()
    paths = schema["paths"]
    read = [{"bearerAuth": ["items:read"]}, {"apiKeyHeader": ["items:read"]}]
    assert paths["/whoami"]["get"]["security"] == SECURITY
    assert paths["/items"]["get"]["security"] == read
    assert paths["/health"]["get"]["security"] == read
    assert "security" not in paths["/public"]["get"]


async def test_plugin_serves_the_schema_without_a_key(sqlite_database_url: str) -> None:
    """The OpenAPI routes are exempt, so the schema and its UI load without a key."""
    app, plugin = plugin_app(sqlite_database_url)
    async with client(app) as c:
        document = await c.get("/schema/openapi.json")
        page = await c.get("/schema/swagger")
    await plugin.middleware.aclose()
    assert document.status_code == 200
    assert page.status_code == 200


async def test_plugin_keeps_the_callers_openapi_config(sqlite_database_url: str) -> None:
    """The plugin adds its schemes to a copy: the caller's OpenAPIConfig is unchanged."""
    from litestar.openapi import OpenAPIConfig

    config = OpenAPIConfig(title="mine", version="1")
    before = config.components
    plugin = KeystilePlugin(database_url=sqlite_database_url)
    app = Litestar(
        route_handlers=[whoami], plugins=[plugin], openapi_config=config, logging_config=None
    )
    schema = app.openapi_schema.to_schema()
    await plugin.middleware.aclose()
    assert config.components is before
    assert schema["info"]["title"] == "mine"
    assert set(schema["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}


# -- the plugin: one runtime, shutdown ------------------------------------------------------


async def test_plugin_handle_shares_the_routes_runtime(sqlite_database_url: str) -> None:
    """plugin.middleware is of the same runtime as the per-route middleware instances."""
    key = await make_key(sqlite_database_url)
    plugin = KeystilePlugin(database_url=sqlite_database_url, argon2=CHEAPEST_PARAMETERS)
    app = Litestar(route_handlers=numbered_handlers(3), plugins=[plugin], logging_config=None)
    async with client(app) as c:
        answers = [await c.get(f"/r{i}", headers={"X-API-Key": key}) for i in range(3)]
    stats = plugin.stats()
    await plugin.middleware.aclose()
    assert {a.json()["runtime"] for a in answers} == {id(plugin.middleware.runtime)}
    assert stats.argon2_verifications == 1


async def test_plugin_flushes_last_used_at_at_shutdown(sqlite_database_url: str) -> None:
    """The plugin's on_shutdown hook writes the pending last_used_at to SQLite."""
    key = await make_key(sqlite_database_url)
    app, plugin = plugin_app(sqlite_database_url, flush_interval=3600)
    async with KeyManager.from_url(sqlite_database_url) as keys:
        key_id = (await keys.list("acme"))[0].id
    async with AsyncTestClient(app) as c:  # runs the lifespan: startup, then shutdown
        assert (await c.get("/whoami", headers={"X-API-Key": key})).status_code == 200
        pending = plugin.stats().pending_touches
        async with KeyManager.from_url(sqlite_database_url) as keys:
            before = (await keys.get(key_id, owner="acme")).last_used_at
    async with KeyManager.from_url(sqlite_database_url) as keys:
        after = (await keys.get(key_id, owner="acme")).last_used_at
    assert (pending, before) == (1, None)
    assert after is not None


def test_plugin_handle_needs_a_built_app() -> None:
    """plugin.middleware before the app is built is a clear error, not None."""
    with pytest.raises(RuntimeError, match="not built yet"):
        _ = KeystilePlugin().middleware


# -- docs, example, extra -------------------------------------------------------------


@pytest.fixture
def keep_root_logging() -> Iterator[None]:
    """Undo what an app built with Litestar's default logging config does to the root logger."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory without KEYSTILE_DATABASE_URL: the snippets' defaults apply."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    return tmp_path


def import_as_module(
    name: str, code: str, filename: str, monkeypatch: pytest.MonkeyPatch
) -> ModuleType:
    """Run ``code`` as module ``name``, registered in sys.modules for the test: Litestar
    resolves handler annotations through the handler's module."""
    module = ModuleType(name)
    module.__file__ = filename
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(code, filename, "exec", dont_inherit=True), module.__dict__)  # noqa: S102
    return module


@pytest.mark.usefixtures("keep_root_logging")
async def test_docs_litestar_block_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Litestar section's app: /health without a key, whoami and the guard with one."""
    key = await mint(scopes=["items:read"])
    block = block_under(INTEGRATION, "Litestar", containing="KeystilePlugin")
    snippet = import_as_module("litestar_docs_snippet", block.code, block.where, monkeypatch)
    app, plugin = snippet.app, snippet.plugin
    auth = {"Authorization": f"Bearer {key}"}
    async with client(app) as c:
        health = await c.get("/health")
        me = await c.get("/whoami", headers=auth)
        listed = await c.get("/items", headers=auth)
        anonymous = await c.get("/whoami")
    await plugin.middleware.aclose()
    assert (health.status_code, health.text) == (200, "ok")
    assert me.json() == {"key": "apikey:laptop", "scopes": ["authenticated", "items:read"]}
    assert listed.json() == ["a", "b"]
    assert anonymous.status_code == 401


@pytest.mark.usefixtures("keep_root_logging")
async def test_example_app_serves_scoped_routes(
    sqlite_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/litestar_app.py: public without a key, items by scope, stats for admin only."""
    path = EXAMPLES / "litestar_app.py"
    example = import_as_module(
        "keystile_example_litestar_app", path.read_text(encoding="utf-8"), str(path), monkeypatch
    )
    key = await make_key(sqlite_database_url, "items:read", "items:write")
    app = example.create_app(sqlite_database_url, argon2=CHEAPEST_PARAMETERS)
    plugin = app.plugins.get(KeystilePlugin)
    auth = {"X-API-Key": key}
    async with client(app) as c:
        public_page = await c.get("/public")
        created = await c.post("/items", json={"name": "tea"}, headers=auth)
        listed = await c.get("/items", headers=auth)
        stats = await c.get("/stats", headers=auth)
    await plugin.middleware.aclose()
    assert public_page.status_code == 200
    assert created.json() == {"name": "tea"}
    assert listed.json() == [{"name": "tea"}]
    assert stats.status_code == 403


def test_import_without_litestar_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing keystile.litestar without Litestar says which extra to install."""
    for name in [m for m in sys.modules if m == "litestar" or m.startswith("litestar.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "litestar", None)
    monkeypatch.delitem(sys.modules, "keystile.litestar")
    with pytest.raises(ImportError, match=r'pip install "keystile\[litestar\]"'):
        importlib.import_module("keystile.litestar")
