"""keystile.fastapi through real FastAPI apps over ASGI: OpenAPI, status codes, headers."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Security, WebSocket
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from apps import client, installed_middleware, load_example
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    APIKeyUser,
    CreatedKey,
    KeyManager,
    MemoryKeyStore,
    StoreError,
    revoke_presented,
)
from keystile.errors import InsufficientScope
from keystile.fastapi import (
    APIKey,
    CurrentKey,
    KeystileHTTPException,
    KeystileSecurity,
    OptionalKey,
    current_key,
    optional_key,
    require_scopes,
)

pytestmark = pytest.mark.anyio

EXEMPT = ["/public", "/docs", "/openapi.json"]
# At module level: FastAPI resolves the (postponed) annotations in the module's globals.
token_security = KeystileSecurity(
    header_name="X-Token", bearer_scheme_name="token", header_scheme_name="xToken"
)
declaring_security = KeystileSecurity()


def key_body(key: APIKey) -> dict[str, Any]:
    return {
        "id": key.key_id,
        "owner": key.owner,
        "name": key.name,
        "scopes": list(key.scopes),
        "metadata": dict(key.metadata),
    }


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/public")
    async def public(key: OptionalKey) -> dict[str, Any]:
        return {"key": key.key_id if key else None}

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, Any]:
        return key_body(key)

    @app.get("/maybe")
    async def maybe(key: OptionalKey) -> dict[str, Any]:
        return {"key": key.key_id if key else None}

    @app.get("/maybe-admin")
    async def maybe_admin(
        key: Annotated[APIKey | None, Security(optional_key, scopes=["admin"])],
    ) -> dict[str, Any]:
        return {"key": key.key_id if key else None}

    @app.get("/items", dependencies=[Depends(require_scopes("items:read"))])
    async def list_items() -> list[str]:
        return ["apple"]

    @app.post("/items")
    async def create_item(
        key: Annotated[APIKey, Security(current_key, scopes=["items:write"])],
    ) -> dict[str, Any]:
        return {"created_by": key.key_id}

    @app.get("/everything")
    async def everything(
        a: CurrentKey,
        b: OptionalKey,
        c: Annotated[APIKey, Depends(require_scopes("items:read"))],
        d: Annotated[APIKey, Security(current_key, scopes=["items:read"])],
    ) -> dict[str, bool]:
        return {"same": a is b is c is d}

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_scopes("admin"))])

    @admin.get("/stats")
    async def stats() -> dict[str, bool]:
        return {"ok": True}

    @admin.delete("/items", dependencies=[Depends(require_scopes("items:write"))])
    async def purge() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(admin)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, key: CurrentKey) -> None:
        await websocket.accept()
        await websocket.send_json({"id": key.key_id})
        await websocket.close()

    return app


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
def manager(store: MemoryKeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS)


@pytest.fixture
async def reader(manager: KeyManager) -> CreatedKey:
    return await manager.create(
        owner="acme", name="reader", scopes=["items:read"], metadata={"team": "blue"}
    )


@pytest.fixture
async def writer(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="writer", scopes=["items:read", "items:write"])


@pytest.fixture
async def admin(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="admin", scopes=["admin"])


@pytest.fixture
async def protect(store: MemoryKeyStore) -> AsyncIterator[Callable[..., APIKeyMiddleware]]:
    """Wrap an app in a middleware on the test store, closed after the test."""
    built: list[APIKeyMiddleware] = []

    def wrap(app: Any = None, **options: Any) -> APIKeyMiddleware:
        options.setdefault("argon2", CHEAPEST_PARAMETERS)
        options.setdefault("exempt_paths", EXEMPT)
        middleware = APIKeyMiddleware(app or build_app(), store=store, **options)
        built.append(middleware)
        return middleware

    yield wrap
    for middleware in built:
        await middleware.aclose()


@pytest.fixture
def app(protect: Callable[..., APIKeyMiddleware]) -> APIKeyMiddleware:
    return protect()


@pytest.fixture
def anonymous_app(protect: Callable[..., APIKeyMiddleware]) -> APIKeyMiddleware:
    """``required=False``: requests without a key reach the routes."""
    return protect(required=False)


def bearer(created: CreatedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {created.key}"}


# -- the optional extra -----------------------------------------------------------------


def test_import_without_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing keystile.fastapi without FastAPI says which extra to install."""
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.setitem(sys.modules, "fastapi.security", None)
    monkeypatch.delitem(sys.modules, "keystile.fastapi")
    with pytest.raises(ImportError, match=r'pip install "keystile\[fastapi\]"'):
        importlib.import_module("keystile.fastapi")


def test_public_names() -> None:
    """Every name in keystile.fastapi.__all__ exists, once."""
    import keystile.fastapi as module

    assert len(set(module.__all__)) == len(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_api_key_is_the_principal() -> None:
    """The typed dependency returns keystile's one principal class."""
    assert APIKey is APIKeyUser


def test_require_scopes_needs_a_scope() -> None:
    """require_scopes() with no scope is a programming error."""
    with pytest.raises(ValueError, match="current_key"):
        require_scopes()


# -- OpenAPI: protect() documents the API (tests/adapters/test_fastapi_protect.py) ----------------


def openapi() -> dict[str, Any]:
    return build_app().openapi()


def test_dependencies_alone_declare_no_security() -> None:
    """Without protect(), the module-level dependencies add nothing to OpenAPI: they are
    plain functions, and the schemes are protect()'s (or KeystileSecurity's) to declare."""
    document = openapi()
    assert "securitySchemes" not in document.get("components", {})
    assert "security" not in document["paths"]["/whoami"]["get"]


def test_keystile_security_declares_both_schemes() -> None:
    """KeystileSecurity's dependencies declare the bearer and header schemes themselves."""
    app = FastAPI()

    @app.get("/me")
    async def me(key: Annotated[APIKey, Depends(declaring_security.current_key)]) -> str:
        return key.key_id

    document = app.openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key as a bearer token: `Authorization: Bearer <key>`.",
    }
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    assert document["paths"]["/me"]["get"]["security"] == [
        {"bearerAuth": []},
        {"apiKeyHeader": []},
    ]


def test_openapi_custom_header_name() -> None:
    """KeystileSecurity(header_name=...) declares that header and its own scheme names."""
    app = FastAPI()

    @app.get("/me")
    async def me(key: Annotated[APIKey, Depends(token_security.require_scopes("me"))]) -> str:
        return key.key_id

    document = app.openapi()
    assert document["components"]["securitySchemes"]["xToken"]["name"] == "X-Token"
    assert document["paths"]["/me"]["get"]["security"] == [{"token": ["me"]}, {"xToken": ["me"]}]


async def test_keystile_security_dependencies_read_the_key(
    protect: Callable[..., APIKeyMiddleware], reader: CreatedKey
) -> None:
    """KeystileSecurity's dependencies give the verified key and check scopes like the
    module-level ones."""
    inner = FastAPI()

    @inner.get("/me")
    async def me(key: Annotated[APIKey, Depends(token_security.current_key)]) -> str:
        return key.key_id

    @inner.get("/maybe")
    async def maybe(key: Annotated[APIKey | None, Depends(token_security.optional_key)]) -> str:
        return key.key_id if key else "-"

    @inner.get("/me-admin", dependencies=[Depends(token_security.require_scopes("admin"))])
    async def me_admin() -> str:
        return "admin"

    async with client(protect(inner, required=False)) as c:
        assert (await c.get("/me", headers=bearer(reader))).json() == reader.id
        assert (await c.get("/maybe")).json() == "-"
        assert (await c.get("/me")).status_code == 401
        assert (await c.get("/me-admin", headers=bearer(reader))).status_code == 403


async def test_swagger_ui_loads_through_exempt_paths(app: APIKeyMiddleware) -> None:
    """With /docs and /openapi.json exempt, Swagger UI and its document load without a key."""
    async with client(app) as c:
        docs = await c.get("/docs")
        document = await c.get("/openapi.json")
    assert docs.status_code == 200
    assert document.status_code == 200
    assert "/whoami" in document.json()["paths"]


# -- current_key ------------------------------------------------------------------------


async def test_current_key_exposes_the_verified_key(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """current_key gives id, owner, name, scopes and metadata of the presented key."""
    async with client(app) as c:
        r = await c.get("/whoami", headers=bearer(reader))
    assert r.status_code == 200
    assert r.json() == {
        "id": reader.id,
        "owner": "acme",
        "name": "reader",
        "scopes": ["items:read"],
        "metadata": {"team": "blue"},
    }


async def test_current_key_with_x_api_key_header(app: APIKeyMiddleware, reader: CreatedKey) -> None:
    """The header form reaches current_key the same way."""
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": reader.key})
    assert r.status_code == 200
    assert r.json()["id"] == reader.id


async def test_current_key_without_principal_is_401(anonymous_app: APIKeyMiddleware) -> None:
    """Reached anonymously (required=False), current_key answers 401 with a bare challenge."""
    async with client(anonymous_app) as c:
        r = await c.get("/whoami")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'
    assert r.headers["cache-control"] == "no-store"
    detail = r.json()["detail"]
    assert detail["error"] == "unauthorized"
    assert "X-API-Key" in detail["hint"]


async def test_current_key_on_exempt_path_is_401(protect: Callable[..., APIKeyMiddleware]) -> None:
    """An exempt path carries no principal, so current_key there answers 401."""
    app = protect(exempt_paths=["/whoami"])
    async with client(app) as c:
        r = await c.get("/whoami")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'


async def test_refusal_uses_the_middleware_realm_and_header(
    protect: Callable[..., APIKeyMiddleware],
) -> None:
    """The 401 from a dependency names the middleware's realm and header name."""
    app = protect(required=False, realm="shop", header_name="X-Token")
    async with client(app) as c:
        r = await c.get("/whoami")
    assert r.headers["www-authenticate"] == 'Bearer realm="shop"'
    assert "X-Token" in r.json()["detail"]["hint"]


async def test_dependency_without_middleware_fails_closed() -> None:
    """A keystile dependency on an app without APIKeyMiddleware raises instead of passing."""
    async with client(build_app()) as c:
        with pytest.raises(RuntimeError, match="APIKeyMiddleware"):
            await c.get("/whoami")


async def test_current_key_over_websocket(app: APIKeyMiddleware, reader: CreatedKey) -> None:
    """current_key works on a FastAPI websocket route."""
    with TestClient(app) as c, c.websocket_connect("/ws", headers=bearer(reader)) as ws:
        assert ws.receive_json() == {"id": reader.id}


async def test_websocket_without_principal_is_closed_1008(
    anonymous_app: APIKeyMiddleware,
) -> None:
    """Reached anonymously, a websocket route with current_key closes the handshake, 1008."""
    with (
        TestClient(anonymous_app) as c,
        pytest.raises(WebSocketDisconnect) as closed,
        c.websocket_connect("/ws"),
    ):
        pass  # pragma: no cover
    assert closed.value.code == 1008
    assert closed.value.reason == "unauthorized"


# -- scopes -----------------------------------------------------------------------------


async def test_require_scopes_lets_a_scoped_key_through(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """A key holding the scope reaches a route guarded by require_scopes."""
    async with client(app) as c:
        r = await c.get("/items", headers=bearer(reader))
    assert r.status_code == 200
    assert r.json() == ["apple"]


async def test_missing_scope_is_403_insufficient_scope(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """A key without the scope gets 403 insufficient_scope with scope="..." and no-store."""
    async with client(app) as c:
        r = await c.post("/items", headers=bearer(reader))
    assert r.status_code == 403
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="api", error="insufficient_scope"')
    assert challenge.endswith('scope="items:write"')
    assert r.headers["cache-control"] == "no-store"


async def test_missing_scope_body_names_the_missing_scopes(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """The 403 body lists the required and the missing scopes."""
    async with client(app) as c:
        r = await c.post("/items", headers=bearer(reader))
    assert r.json() == {
        "detail": {
            "error": "insufficient_scope",
            "detail": "Missing scope: items:write.",
            "required_scopes": ["items:write"],
            "missing_scopes": ["items:write"],
        }
    }


async def test_security_scopes_let_a_scoped_key_through(
    app: APIKeyMiddleware, writer: CreatedKey
) -> None:
    """Security(current_key, scopes=[...]) admits a key holding the scopes."""
    async with client(app) as c:
        r = await c.post("/items", headers=bearer(writer))
    assert r.status_code == 200
    assert r.json() == {"created_by": writer.id}


async def test_router_scope_guards_every_route(app: APIKeyMiddleware, reader: CreatedKey) -> None:
    """A router's require_scopes refuses a key without the router scope."""
    async with client(app) as c:
        r = await c.get("/admin/stats", headers=bearer(reader))
    assert r.status_code == 403
    assert r.json()["detail"]["missing_scopes"] == ["admin"]


async def test_router_and_route_scopes_are_both_required(
    app: APIKeyMiddleware, admin: CreatedKey
) -> None:
    """A route's scope adds to its router's: holding only the router scope gets 403."""
    async with client(app) as c:
        stats = await c.get("/admin/stats", headers=bearer(admin))
        purge = await c.delete("/admin/items", headers=bearer(admin))
    assert stats.status_code == 200
    assert purge.status_code == 403
    assert purge.json()["detail"]["missing_scopes"] == ["items:write"]


async def test_security_scopes_around_require_scopes_are_checked(
    protect: Callable[..., APIKeyMiddleware], reader: CreatedKey, writer: CreatedKey
) -> None:
    """Scopes an enclosing Security(...) declares are required on top of require_scopes'."""
    inner = FastAPI()

    @inner.get("/x")
    async def x(
        key: Annotated[APIKey, Security(require_scopes("items:read"), scopes=["items:write"])],
    ) -> str:
        return key.key_id

    async with client(protect(inner)) as c:
        refused = await c.get("/x", headers=bearer(reader))
        admitted = await c.get("/x", headers=bearer(writer))
    assert refused.status_code == 403
    assert refused.json()["detail"]["missing_scopes"] == ["items:write"]
    assert admitted.status_code == 200


async def test_require_scopes_without_principal_is_401(anonymous_app: APIKeyMiddleware) -> None:
    """Reached anonymously, a scoped route answers 401 (authenticate first), not 403."""
    async with client(anonymous_app) as c:
        r = await c.get("/items")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="api"'


async def test_scope_refusals_are_counted(app: APIKeyMiddleware, reader: CreatedKey) -> None:
    """Operators see dependency refusals in the middleware's rejects counter."""
    async with client(app) as c:
        await c.post("/items", headers=bearer(reader))
    assert app.stats().rejects == {"insufficient_scope": 1}


async def test_refusal_can_be_flattened_by_a_handler(
    protect: Callable[..., APIKeyMiddleware], reader: CreatedKey
) -> None:
    """A handler for KeystileHTTPException sends the middleware's body shape, unwrapped."""
    inner = build_app()

    @inner.exception_handler(KeystileHTTPException)
    async def flat(request: Request, exc: KeystileHTTPException) -> JSONResponse:
        assert isinstance(exc.auth_error, InsufficientScope)
        return JSONResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)

    async with client(protect(inner)) as c:
        r = await c.post("/items", headers=bearer(reader))
    assert r.status_code == 403
    assert r.json()["missing_scopes"] == ["items:write"]
    assert r.headers["www-authenticate"].startswith('Bearer realm="api"')


# -- optional_key -----------------------------------------------------------------------


async def test_optional_key_is_none_when_anonymous(anonymous_app: APIKeyMiddleware) -> None:
    """optional_key gives None for a request without a key."""
    async with client(anonymous_app) as c:
        r = await c.get("/maybe")
    assert r.status_code == 200
    assert r.json() == {"key": None}


async def test_optional_key_is_the_key_when_present(
    anonymous_app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """optional_key gives the verified key when one was presented."""
    async with client(anonymous_app) as c:
        r = await c.get("/maybe", headers=bearer(reader))
    assert r.json() == {"key": reader.id}


async def test_optional_key_on_exempt_path_is_none(app: APIKeyMiddleware) -> None:
    """On an exempt path without a key optional_key gives None."""
    async with client(app) as c:
        r = await c.get("/public")
    assert r.json() == {"key": None}


async def test_optional_key_on_exempt_path_is_the_key_when_valid(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """A valid key sent to an exempt path is verified, and optional_key there gives it."""
    async with client(app) as c:
        by_bearer = await c.get("/public", headers=bearer(reader))
        by_header = await c.get("/public", headers={"X-API-Key": reader.key})
    assert by_bearer.json() == {"key": reader.id}
    assert by_header.json() == {"key": reader.id}


async def test_optional_key_on_exempt_path_drops_an_invalid_key(
    app: APIKeyMiddleware, reader: CreatedKey, manager: KeyManager
) -> None:
    """An invalid key sent to an exempt path is dropped: the request goes on anonymous
    (200, optional_key gives None) and the refusal is counted."""
    await manager.revoke(reader.id, owner="acme")
    async with client(app) as c:
        garbage = await c.get("/public", headers={"Authorization": "Bearer ks_garbage"})
        revoked = await c.get("/public", headers=bearer(reader))
    assert (garbage.status_code, garbage.json()) == (200, {"key": None})
    assert (revoked.status_code, revoked.json()) == (200, {"key": None})
    assert sum(app.stats().rejects.values()) == 2


async def test_current_key_on_exempt_path_with_a_valid_key(
    protect: Callable[..., APIKeyMiddleware], reader: CreatedKey
) -> None:
    """On an exempt path, current_key gives a valid key that was sent."""
    app = protect(exempt_paths=["/whoami"])
    async with client(app) as c:
        r = await c.get("/whoami", headers=bearer(reader))
    assert r.status_code == 200
    assert r.json()["id"] == reader.id


async def test_optional_key_checks_scopes_of_a_present_key(
    anonymous_app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """A present key must hold the scopes given to optional_key; anonymous still passes."""
    async with client(anonymous_app) as c:
        anonymous = await c.get("/maybe-admin")
        keyed = await c.get("/maybe-admin", headers=bearer(reader))
    assert anonymous.status_code == 200
    assert keyed.status_code == 403


# -- one verification -------------------------------------------------------------------


async def test_dependencies_never_verify_a_second_time(
    app: APIKeyMiddleware, reader: CreatedKey
) -> None:
    """Four keystile dependencies on one route: exactly one verification per request."""
    async with client(app) as c:
        for _ in range(3):
            r = await c.get("/everything", headers=bearer(reader))
            assert r.json() == {"same": True}
    stats = app.stats()
    assert stats.cache_hits + stats.cache_misses == 3  # one cache lookup per request
    assert stats.argon2_verifications == 1


# -- the example ------------------------------------------------------------------------


async def test_fastapi_example_end_to_end() -> None:
    """The example app: public, whoami, scoped items, admin stats, logout, Swagger UI and
    the OpenAPI security protect() declares."""
    example = load_example("fastapi_app")
    database_url = f"memory://fastapi-example-{uuid.uuid4().hex}"
    app = example.create_app(database_url, argon2=CHEAPEST_PARAMETERS)
    manager = KeyManager(MemoryKeyStore(database_url.split("://")[1]), argon2=CHEAPEST_PARAMETERS)
    scopes = ["items:read", "items:write", "admin"]
    key = (await manager.create(owner="demo", name="demo", scopes=scopes)).key
    reader = (await manager.create(owner="demo", name="reader", scopes=["items:read"])).key
    auth = {"Authorization": f"Bearer {key}"}
    async with client(app) as c:
        assert (await c.get("/public")).json()["hello"] == "world"
        assert (await c.get("/public", headers=auth)).json()["hello"] == "apikey:demo"
        assert (await c.get("/docs")).status_code == 200
        document = (await c.get("/openapi.json")).json()
        assert document["paths"]["/public"]["get"]["security"] == []
        assert document["paths"]["/stats"]["get"]["security"] == [
            {"bearerAuth": ["admin"]},
            {"apiKeyHeader": ["admin"]},
        ]
        assert (await c.get("/whoami")).status_code == 401
        whoami = await c.get("/whoami", headers=auth)
        assert whoami.json()["owner"] == "demo"
        assert (await c.post("/items", json={"name": "apple"}, headers=auth)).status_code == 201
        items = await c.get("/items", headers={"X-API-Key": reader})
        assert items.json() == [{"name": "apple"}]
        denied = await c.post("/items", json={"name": "pear"}, headers={"X-API-Key": reader})
        assert denied.status_code == 403
        stats = await c.get("/stats", headers=auth)
        assert stats.json()["rejects"]["insufficient_scope"] == 1
        assert (await c.post("/logout", headers=auth)).json() == {"revoked": True}
        assert (await c.get("/whoami", headers=auth)).status_code == 401
    await installed_middleware(app).aclose()


# -- the implicit "authenticated" scope ---------------------------------------------------


def authenticated_app() -> FastAPI:
    app = FastAPI()

    @app.get("/authenticated", dependencies=[Depends(require_scopes("authenticated"))])
    async def authenticated(request: Request) -> dict[str, Any]:
        return {"scopes": request.auth.scopes}

    @app.get("/authenticated-and-admin")
    async def authenticated_and_admin(
        key: Annotated[APIKey, Security(current_key, scopes=["authenticated", "admin"])],
    ) -> str:
        return key.key_id

    return app


async def test_require_scopes_authenticated_admits_any_key(
    protect: Callable[..., APIKeyMiddleware], manager: KeyManager
) -> None:
    """require_scopes("authenticated") agrees with request.auth.scopes: any valid key, even
    one granted no scope, passes."""
    unscoped = await manager.create(owner="acme", name="plain")
    with TestClient(protect(authenticated_app())) as c:
        r = c.get("/authenticated", headers=bearer(unscoped))
    assert r.status_code == 200
    assert r.json() == {"scopes": ["authenticated"]}


async def test_authenticated_does_not_excuse_other_scopes(
    protect: Callable[..., APIKeyMiddleware], reader: CreatedKey
) -> None:
    """ "authenticated" is implicit, other scopes are still required and named when missing."""
    with TestClient(protect(authenticated_app())) as c:
        r = c.get("/authenticated-and-admin", headers=bearer(reader))
    assert r.status_code == 403
    assert r.json()["detail"]["missing_scopes"] == ["admin"]


async def test_require_scopes_authenticated_without_key_is_401(
    protect: Callable[..., APIKeyMiddleware],
) -> None:
    """Without a key (required=False), require_scopes("authenticated") still answers 401."""
    with TestClient(protect(authenticated_app(), required=False)) as c:
        r = c.get("/authenticated")
    assert r.status_code == 401


# -- KeystileHTTPException lives in keystile.responses ---------------------------------


def test_keystile_http_exception_is_the_responses_one() -> None:
    """keystile.fastapi re-exports the one Starlette-level KeystileHTTPException."""
    from starlette.exceptions import HTTPException

    import keystile.responses

    assert KeystileHTTPException is keystile.responses.KeystileHTTPException
    assert issubclass(KeystileHTTPException, HTTPException)


class RevokeFailingStore(MemoryKeyStore):
    """A memory store whose revoke fails as an unreachable database would."""

    async def revoke(self, key_id: str, owner: str, *, at: Any, **audit: str) -> bool:
        raise StoreError("revoke failed (connection refused)")


async def test_fastapi_logout_during_outage_is_503() -> None:
    """In a FastAPI app, a logout the store cannot record is a 503 whose detail is the
    middleware's body, like every other keystile refusal in FastAPI."""
    store = RevokeFailingStore()
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="a", name="s")
    inner = FastAPI()

    @inner.post("/logout")
    async def logout(request: Request) -> dict[str, bool]:
        return {"revoked": await revoke_presented(request)}

    app = APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS)
    async with client(app) as c:
        r = await c.post("/logout", headers=bearer(created))
    await app.aclose()
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    detail = r.json()["detail"]
    assert detail["error"] == "temporarily_unavailable"
    assert "logout could not be recorded" in detail["detail"]
