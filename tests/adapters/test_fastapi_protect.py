"""keystile.fastapi.protect(app): the middleware, the docs exempt, and security in OpenAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from apps import client, installed_middleware
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager, MemoryKeyStore
from keystile.fastapi import (
    APIKey,
    CurrentKey,
    KeystileHTTPException,
    OptionalKey,
    current_key,
    protect,
    require_scopes,
)
from keystile.openapi import fully_exempt

pytestmark = pytest.mark.anyio

EITHER = [{"bearerAuth": []}, {"apiKeyHeader": []}]
ERROR_REF = {"$ref": "#/components/schemas/KeystileError"}


def body(*codes: str) -> dict[str, Any]:
    """The documented schema of a refusal body carrying one of ``codes``."""
    return {"allOf": [ERROR_REF, {"properties": {"error": {"enum": list(codes)}}}]}


# At module level: FastAPI resolves the (postponed) annotations in the module's globals.
oauth = HTTPBearer(scheme_name="oauth", auto_error=False)
OAuthToken = Annotated[HTTPAuthorizationCredentials | None, Depends(oauth)]


def build_app(**fastapi_options: Any) -> FastAPI:
    app = FastAPI(**fastapi_options)

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.get("/public")
    async def public(key: OptionalKey) -> dict[str, Any]:
        return {"key": key.key_id if key else None}

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, Any]:
        return {"id": key.key_id}

    @app.get("/plain")
    async def plain(request: Request) -> dict[str, Any]:
        return {"user": request.user.display_name}

    @app.get("/items/{item_id}", dependencies=[Depends(require_scopes("items:read"))])
    async def get_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.post("/items")
    async def create_item(
        key: Annotated[APIKey, Security(current_key, scopes=["items:write"])],
    ) -> dict[str, str]:
        return {"by": key.key_id}

    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_scopes("admin"))])

    @admin.delete("/items", dependencies=[Depends(require_scopes("items:write"))])
    async def purge() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(admin)
    return app


@pytest.fixture
def store() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
def manager(store: MemoryKeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS)


@pytest.fixture
async def reader(manager: KeyManager) -> CreatedKey:
    return await manager.create(owner="acme", name="reader", scopes=["items:read"])


@pytest.fixture
async def protected(store: MemoryKeyStore) -> AsyncIterator[Callable[..., FastAPI]]:
    """``protect()`` an app on the test store; its middleware is closed after the test."""
    apps: list[FastAPI] = []

    def wrap(app: FastAPI | None = None, **options: Any) -> FastAPI:
        app = app or build_app()
        protect(app, store=store, argon2=CHEAPEST_PARAMETERS, **options)
        apps.append(app)
        return app

    yield wrap
    for app in apps:
        if app.middleware_stack is not None:
            await installed_middleware(app).aclose()


def bearer(created: CreatedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {created.key}"}


def operation(document: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    result: dict[str, Any] = document["paths"][path][method]
    return result


# -- the middleware ------------------------------------------------------------------------


async def test_protect_requires_a_key(
    protected: Callable[..., FastAPI], reader: CreatedKey
) -> None:
    """Every route needs a key: 401 without, 200 with either header."""
    app = protected()
    async with client(app) as c:
        assert (await c.get("/health")).status_code == 401
        assert (await c.get("/health", headers=bearer(reader))).status_code == 200
        assert (await c.get("/whoami", headers={"X-API-Key": reader.key})).json() == {
            "id": reader.id
        }
    assert isinstance(installed_middleware(app), APIKeyMiddleware)


async def test_docs_load_without_a_key(protected: Callable[..., FastAPI]) -> None:
    """Swagger UI, its OAuth2 redirect page, ReDoc and the OpenAPI document need no key."""
    app = protected()
    async with client(app) as c:
        for path in ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"):
            assert (await c.get(path)).status_code == 200, path


async def test_exempt_docs_false_protects_the_docs(protected: Callable[..., FastAPI]) -> None:
    """exempt_docs=False leaves the docs behind the key like any route."""
    app = protected(exempt_docs=False)
    async with client(app) as c:
        assert (await c.get("/docs")).status_code == 401
        assert (await c.get("/openapi.json")).status_code == 401


async def test_custom_docs_urls_are_exempt(protected: Callable[..., FastAPI]) -> None:
    """The app's own docs URLs are exempt; a docs URL set to None exempts nothing."""
    app = protected(
        build_app(docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    )
    async with client(app) as c:
        assert (await c.get("/api/docs")).status_code == 200
        assert (await c.get("/api/openapi.json")).status_code == 200
        assert (await c.get("/redoc")).status_code == 401
        assert (await c.get("/docs")).status_code == 401


async def test_user_exempt_paths_are_kept(
    protected: Callable[..., FastAPI], reader: CreatedKey
) -> None:
    """exempt_paths of the caller stay exempt next to the docs."""
    app = protected(exempt_paths=["/health", "/public"])
    async with client(app) as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/docs")).status_code == 200
        assert (await c.get("/public")).json() == {"key": None}
        assert (await c.get("/public", headers=bearer(reader))).json() == {"key": reader.id}
        assert (await c.get("/whoami")).status_code == 401


def test_unknown_option_fails_at_protect() -> None:
    """A misspelt middleware option is a TypeError at protect(), not at the first request."""
    app = FastAPI()
    with pytest.raises(TypeError, match="cache_tll"):
        protect(app, store=MemoryKeyStore(), cache_tll=5)
    with pytest.raises(TypeError, match="app"):
        protect(app, app=app)


async def test_same_key_in_both_headers_is_one_credential(
    protected: Callable[..., FastAPI], reader: CreatedKey
) -> None:
    """Swagger UI with both Authorize fields filled with one key sends it twice: 200."""
    app = protected()
    async with client(app) as c:
        r = await c.get("/whoami", headers={**bearer(reader), "X-API-Key": reader.key})
    assert r.status_code == 200


async def test_different_keys_in_both_headers_is_400(
    protected: Callable[..., FastAPI], reader: CreatedKey, manager: KeyManager
) -> None:
    """Two different keys are a malformed request: 400 invalid_request."""
    other = await manager.create(owner="acme", name="other")
    app = protected()
    async with client(app) as c:
        r = await c.get("/whoami", headers={**bearer(reader), "X-API-Key": other.key})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"


# -- OpenAPI -------------------------------------------------------------------------------


async def test_security_schemes_are_declared(protected: Callable[..., FastAPI]) -> None:
    """components.securitySchemes holds the bearer scheme and the configured header."""
    schemes = protected(header_name="X-Token").openapi()["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http"
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["apiKeyHeader"]["type"] == "apiKey"
    assert schemes["apiKeyHeader"]["in"] == "header"
    assert schemes["apiKeyHeader"]["name"] == "X-Token"


async def test_every_protected_operation_lists_both_schemes(
    protected: Callable[..., FastAPI],
) -> None:
    """Routes with and without keystile dependencies list the two schemes as alternatives."""
    document = protected().openapi()
    for path in ("/health", "/whoami", "/plain", "/public"):
        assert operation(document, path)["security"] == EITHER, path


async def test_exempt_operations_have_empty_security(protected: Callable[..., FastAPI]) -> None:
    """An exempt operation says no key is needed (security: []) and documents no 401."""
    document = protected(exempt_paths=["/health", "/public"]).openapi()
    for path in ("/health", "/public"):
        assert operation(document, path)["security"] == []
        assert "401" not in operation(document, path)["responses"]
    assert operation(document, "/whoami")["security"] == EITHER


async def test_requirements_carry_the_route_scopes(protected: Callable[..., FastAPI]) -> None:
    """Scopes from require_scopes, Security(...) and a router are listed in both schemes."""
    document = protected().openapi()
    read = [{"bearerAuth": ["items:read"]}, {"apiKeyHeader": ["items:read"]}]
    write = [{"bearerAuth": ["items:write"]}, {"apiKeyHeader": ["items:write"]}]
    both = [
        {"bearerAuth": ["admin", "items:write"]},
        {"apiKeyHeader": ["admin", "items:write"]},
    ]
    assert operation(document, "/items/{item_id}")["security"] == read
    assert operation(document, "/items", "post")["security"] == write
    assert operation(document, "/admin/items", "delete")["security"] == both


async def test_protected_operations_document_429_and_503(
    protected: Callable[..., FastAPI],
) -> None:
    """Each protected operation documents the limits' 429 and the 503 of an unchecked key;
    exempt ones document neither."""
    document = protected(exempt_paths=["/public"]).openapi()
    responses = operation(document, "/whoami")["responses"]
    assert responses["429"]["content"]["application/json"]["schema"] == body(
        "rate_limited", "quota_exceeded"
    )
    assert responses["503"]["content"]["application/json"]["schema"] == body(
        "temporarily_unavailable"
    )
    for status in ("429", "503"):
        assert status not in operation(document, "/public")["responses"]


async def test_protected_operations_document_401(protected: Callable[..., FastAPI]) -> None:
    """Each protected operation documents the middleware's 401 and its JSON body."""
    document = protected().openapi()
    response = operation(document, "/health")["responses"]["401"]
    assert response["content"]["application/json"]["schema"] == body(
        "unauthorized", "invalid_token"
    )
    assert response["headers"]["WWW-Authenticate"]["required"] is True
    bad_request = operation(document, "/health")["responses"]["400"]
    assert bad_request["content"]["application/json"]["schema"] == body("invalid_request")
    error = document["components"]["schemas"]["KeystileError"]
    assert error["required"] == ["error", "detail"]
    assert error["additionalProperties"] is False
    assert {"error", "detail", "hint", "credential_source", "missing_scopes", "limit"} <= set(
        error["properties"]
    )


async def test_403_on_every_protected_operation(protected: Callable[..., FastAPI]) -> None:
    """Any key may carry an IP allowlist: 403 ip_not_allowed is documented on every
    protected operation, with insufficient_scope (and its challenge) where scopes are
    required; an exempt operation without keystile dependencies documents none."""
    document = protected(exempt_paths=["/public"]).openapi()
    plain = operation(document, "/whoami")["responses"]["403"]
    assert plain["content"]["application/json"]["schema"] == body("ip_not_allowed")
    assert set(plain["headers"]) == {"Cache-Control"}
    for path, method in (("/items/{item_id}", "get"), ("/admin/items", "delete")):
        scoped = operation(document, path, method)["responses"]["403"]
        assert scoped["content"]["application/json"]["schema"] == body(
            "ip_not_allowed", "insufficient_scope"
        )
        assert scoped["headers"]["WWW-Authenticate"]["required"] is False
    assert "403" not in operation(document, "/public")["responses"]


async def test_no_error_schema_without_a_documented_body(
    protected: Callable[..., FastAPI],
) -> None:
    """With on_error and no keystile dependency, no response names the error body, and
    components.schemas does not hold it."""
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> str:
        return "plain"

    document = protected(app, on_error=lambda conn, exc: JSONResponse({}, 401)).openapi()
    assert "KeystileError" not in document["components"].get("schemas", {})


async def test_dependency_refusals_send_the_middleware_body(
    protected: Callable[..., FastAPI], reader: CreatedKey
) -> None:
    """protect() answers a dependency's refusal with the middleware's body, not under
    FastAPI's "detail"."""
    async with client(protected()) as c:
        r = await c.post("/items", headers=bearer(reader))
    assert r.status_code == 403
    assert r.json() == {
        "error": "insufficient_scope",
        "detail": "Missing scope: items:write.",
        "required_scopes": ["items:write"],
        "missing_scopes": ["items:write"],
    }
    assert r.headers["cache-control"] == "no-store"


async def test_an_apps_own_handler_is_kept_and_its_body_not_documented(
    protected: Callable[..., FastAPI], reader: CreatedKey
) -> None:
    """An app handler for KeystileHTTPException answers the dependencies' refusals; their
    body is then the app's, so a status they share with the middleware names no body."""
    app = build_app()

    @app.exception_handler(KeystileHTTPException)
    async def own(request: Request, exc: KeystileHTTPException) -> JSONResponse:
        return JSONResponse({"nope": True}, status_code=exc.status_code)

    document = protected(app).openapi()
    async with client(app) as c:
        r = await c.post("/items", headers=bearer(reader))
    assert r.json() == {"nope": True}
    response = operation(document, "/items/{item_id}")["responses"]["403"]
    assert "content" not in response
    assert response["headers"]["Cache-Control"]["required"] is False


async def test_custom_on_error_documents_401_without_a_body(
    protected: Callable[..., FastAPI],
) -> None:
    """With on_error the middleware's body is the app's: the 401 names no schema."""
    document = protected(on_error=lambda conn, exc: JSONResponse({}, 401)).openapi()
    assert "content" not in operation(document, "/health")["responses"]["401"]


async def test_declared_responses_are_kept(protected: Callable[..., FastAPI]) -> None:
    """A 401 the route declares itself keeps its description and body, and gains
    keystile's body as an alternative and its headers as optional."""
    app = build_app()

    @app.get("/own", responses={401: {"description": "Ours."}})
    async def own() -> str:
        return "own"

    @app.get("/mine", responses={401: {"description": "Mine.", "model": dict[str, int]}})
    async def mine() -> str:
        return "mine"

    document = protected(app).openapi()
    own_401 = operation(document, "/own")["responses"]["401"]
    assert own_401["description"] == "Ours."
    assert own_401["content"]["application/json"]["schema"] == body("unauthorized", "invalid_token")
    assert own_401["headers"]["WWW-Authenticate"]["required"] is False
    mine_401 = operation(document, "/mine")["responses"]["401"]
    alternatives = mine_401["content"]["application/json"]["schema"]["anyOf"]
    assert alternatives[1] == body("unauthorized", "invalid_token")
    assert alternatives[0]["type"] == "object"


async def test_routes_added_after_protect_are_documented(protected: Callable[..., FastAPI]) -> None:
    """protect() documents the routes present when the document is generated."""
    app = protected(FastAPI())

    @app.get("/late")
    async def late() -> str:
        return "late"

    assert operation(app.openapi(), "/late")["security"] == EITHER


async def test_the_document_is_cached(protected: Callable[..., FastAPI]) -> None:
    """The document is generated once and kept in app.openapi_schema, as FastAPI does."""
    app = protected()
    document = app.openapi()
    assert app.openapi() is document
    assert app.openapi_schema is document


async def test_a_document_generated_before_protect_is_regenerated(
    protected: Callable[..., FastAPI],
) -> None:
    """A document FastAPI cached before protect() does not hide the security."""
    app = build_app()
    assert "security" not in operation(app.openapi(), "/health")
    protected(app)
    assert operation(app.openapi(), "/health")["security"] == EITHER


async def test_a_custom_openapi_is_wrapped(protected: Callable[..., FastAPI]) -> None:
    """A custom app.openapi assigned before protect() keeps its changes and gets security."""
    app = build_app()

    def custom_openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            document = get_openapi(title="Custom", version="2.0", routes=app.routes)
            document["info"]["x-logo"] = {"url": "logo.png"}
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    document = protected(app).openapi()
    assert document["info"]["x-logo"] == {"url": "logo.png"}
    assert operation(document, "/health")["security"] == EITHER


async def test_served_document_matches_app_openapi(protected: Callable[..., FastAPI]) -> None:
    """The /openapi.json FastAPI serves is the documented one."""
    app = protected()
    async with client(app) as c:
        served = (await c.get("/openapi.json")).json()
    assert operation(served, "/whoami")["security"] == EITHER


async def test_required_false_marks_the_key_optional(protected: Callable[..., FastAPI]) -> None:
    """With required=False, a route that does not need a key accepts anonymous callers ({}),
    a route with CurrentKey or require_scopes needs one, and the app's own schemes stay."""
    app = build_app()

    @app.get("/reports")
    async def reports(token: OAuthToken) -> str:
        return "reports"

    document = protected(app, required=False).openapi()
    assert operation(document, "/plain")["security"] == [*EITHER, {}]
    assert operation(document, "/public")["security"] == [*EITHER, {}]
    assert operation(document, "/whoami")["security"] == EITHER
    assert operation(document, "/reports")["security"] == [*EITHER, {"oauth": []}, {}]
    # The middleware refuses a key that is not valid, the dependency a request without
    # one: the same body either way.
    assert operation(document, "/whoami")["responses"]["401"]["content"]["application/json"][
        "schema"
    ] == body("invalid_token", "unauthorized")
    assert operation(document, "/plain")["responses"]["401"]["content"]["application/json"][
        "schema"
    ] == body("invalid_token")


# -- exempt operations follow the middleware's rules --------------------------------------


async def test_prefix_exemption_covers_templated_paths(protected: Callable[..., FastAPI]) -> None:
    """A "prefix*" exemption exempts a templated route under it, and only under it."""
    app = FastAPI()

    @app.get("/static/{name}")
    async def static(name: str) -> str:
        return name

    @app.get("/{name}")
    async def anything(name: str) -> str:
        return name

    @app.get("/files/{name}")
    async def files(name: str) -> str:
        return name

    document = protected(app, exempt_paths=["/static/*", "/files/readme"]).openapi()
    assert operation(document, "/static/{name}")["security"] == []
    assert operation(document, "/{name}")["security"] == EITHER
    # Only one value of {name} is exempt: the operation still takes a key.
    assert operation(document, "/files/{name}")["security"] == EITHER


@pytest.mark.parametrize(
    "path",
    ["/health", "/healthz", "/static", "/static/", "/static/a/b", "/staticx", "/", "/docs"],
)
def test_exemption_agrees_with_the_middleware(path: str) -> None:
    """For a path without parameters, protect()'s exemption is the middleware's."""
    exempt_paths = ["/health", "/static/*", "/docs"]
    middleware = APIKeyMiddleware(FastAPI(), store=MemoryKeyStore(), exempt_paths=exempt_paths)
    exact = frozenset(p for p in exempt_paths if not p.endswith("*"))
    prefixes = tuple(p[:-1] for p in exempt_paths if p.endswith("*"))
    scope = {"type": "http", "path": path, "root_path": ""}
    assert fully_exempt(path, exact, prefixes) == middleware._is_exempt(scope)
