"""FastAPI in one line: ``protect(app)``, and dependencies that read the verified key.

    from fastapi import Depends, FastAPI
    from keystile.fastapi import CurrentKey, protect, require_scopes

    app = FastAPI()
    protect(app, database_url="sqlite:///keystile.db")

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, str]:
        return {"id": key.key_id, "owner": key.owner}

    @app.post("/items", dependencies=[Depends(require_scopes("items:write"))])
    async def create_item() -> None: ...

:func:`protect` adds ``APIKeyMiddleware``, exempts the docs (Swagger UI, ReDoc, the
OpenAPI document), and documents the API's security in OpenAPI, once, when the document
is generated: two security schemes (a bearer scheme and an API-key header scheme)
listed as alternatives on every operation the middleware protects, and every refusal
those operations can answer, with its body and headers (:mod:`keystile.openapi`).
Swagger UI's *Authorize* then works on every protected route, with either scheme, and no
route needs a dependency for it.

The middleware is the only verifier: the dependencies read ``scope["user"]``, never the
key, so a request costs one verification however many dependencies it uses, and each
dependency costs what FastAPI's cheapest dependency costs. They declare nothing in
OpenAPI themselves (that is :func:`protect`'s job, paid once instead of on every
request); :class:`KeystileSecurity` gives dependencies that also declare the schemes,
for apps that add the middleware themselves, at the price of FastAPI's security classes
running on every request.

Refusals are :class:`KeystileHTTPException` (defined in :mod:`keystile.responses`, a
Starlette ``HTTPException``) whose status, headers and body are the middleware's own
(:func:`keystile.responses.error_response`). :func:`protect` installs
:func:`keystile_exception_handler`, which sends that body as is; without it, FastAPI's
default handler puts the body under ``"detail"``. ``revoke_presented`` raises the same
class when a logout cannot be recorded, so one exception handler answers both. On a
WebSocket the handshake is closed with 1008 and the error code, as the middleware does.

FastAPI is an optional extra: ``pip install "keystile[fastapi]"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, cast

from . import adapters

try:
    from fastapi import APIRouter, Depends, FastAPI, Security, WebSocketException
    from fastapi import routing as fastapi_routing
    from fastapi.routing import APIRoute
    from fastapi.security import (
        APIKeyHeader,
        HTTPAuthorizationCredentials,
        HTTPBearer,
        SecurityScopes,
    )
except ImportError as exc:  # pragma: no cover - exercised by a test that hides fastapi
    raise adapters.missing_extra("fastapi", "FastAPI") from exc

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from . import openapi
from .config import DEFAULT_HEADER_NAME, KeystileConfig
from .errors import AuthenticationError, MissingCredentials
from .middleware import APIKeyMiddleware
from .openapi import DEFAULT_BEARER_SCHEME_NAME, DEFAULT_HEADER_SCHEME_NAME
from .principal import APIKeyUser
from .responses import KeystileHTTPException

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .management.api import ManagementOptions

#: The type of ``current_key``: the verified key (id, owner, name, scopes, metadata).
APIKey = APIKeyUser


KeyDependency = Callable[..., Awaitable[APIKeyUser]]
OptionalKeyDependency = Callable[..., Awaitable[APIKeyUser | None]]

#: Set on every keystile dependency: ``(needs a key, the scopes it requires)``. OpenAPI
#: generation reads it to tell which operations need a key and which scopes.
_MARK = "__keystile_dependency__"


# -- the dependencies ----------------------------------------------------------------------


def _middleware(conn: HTTPConnection) -> APIKeyMiddleware:
    return adapters.find_middleware(
        conn.scope,
        reader="keystile.fastapi dependencies read",
        place="this route: keystile.fastapi.protect(app, ...) or "
        "app.add_middleware(APIKeyMiddleware, ...)",
    )


def _refuse(conn: HTTPConnection, auth_error: AuthenticationError) -> Exception:
    """The exception that refuses this request, counted with the middleware's rejects."""
    middleware = _middleware(conn)
    adapters.count_refusal(middleware, auth_error)
    if conn.scope["type"] == "websocket":
        code, reason = adapters.close_code(auth_error)
        return WebSocketException(code, reason=reason)
    return KeystileHTTPException(
        auth_error, realm=middleware.realm, header_name=middleware.header_name
    )


def _check_scopes(conn: HTTPConnection, key: object, scopes: list[str]) -> None:
    refusal = adapters.scope_refusal(key, tuple(dict.fromkeys(scopes)))
    if refusal is not None:
        raise _refuse(conn, refusal)


# The dependencies take only what FastAPI hands over without work of its own (the
# connection, and the scopes of an enclosing ``Security(...)``), so each costs what
# FastAPI's cheapest dependency costs; the key was verified before FastAPI ran.


async def current_key(conn: HTTPConnection, security_scopes: SecurityScopes) -> APIKeyUser:
    """The verified key; 401 without one, 403 if it lacks a scope declared with
    ``Security(current_key, scopes=[...])``."""
    key = conn.scope.get("user")
    if not isinstance(key, APIKeyUser):
        raise _refuse(conn, MissingCredentials())
    if security_scopes.scopes:
        _check_scopes(conn, key, security_scopes.scopes)
    return key


async def optional_key(conn: HTTPConnection, security_scopes: SecurityScopes) -> APIKeyUser | None:
    """The verified key, or ``None`` for an anonymous request (``required=False``, or an
    exempt path without a valid key). A key that is present must still hold any scopes
    declared with ``Security(optional_key, scopes=[...])``."""
    key = conn.scope.get("user")
    if not isinstance(key, APIKeyUser):
        if "keystile" not in conn.scope:
            _middleware(conn)
        return None
    if security_scopes.scopes:
        _check_scopes(conn, key, security_scopes.scopes)
    return key


setattr(current_key, _MARK, (True, ()))
setattr(optional_key, _MARK, (False, ()))


def require_scopes(*scopes: str) -> KeyDependency:
    """A dependency that returns the key if it holds every one of ``scopes``.

    401 when the route is reached without a key (``required=False``, or an exempt
    path); 403 ``insufficient_scope`` naming the missing scopes otherwise. Use it per
    route (``dependencies=[Depends(require_scopes("items:write"))]``), as a parameter
    (``key: APIKey = Depends(require_scopes("admin"))``) or per router; each use is
    checked, so a router's scopes and a route's add up. ``"authenticated"`` is held by
    every verified key.
    """
    required = adapters.required_scopes(scopes, instead="; use current_key")

    async def dependency(conn: HTTPConnection, security_scopes: SecurityScopes) -> APIKeyUser:
        key = conn.scope.get("user")
        refusal = adapters.scope_refusal(key, required)
        if refusal is not None:
            raise _refuse(conn, refusal)
        if security_scopes.scopes:  # an enclosing Security(..., scopes=[...])
            _check_scopes(conn, key, [*security_scopes.scopes, *required])
        return cast(APIKeyUser, key)

    dependency.__name__ = "require_scopes"
    dependency.__qualname__ = f"require_scopes({' '.join(required)})"
    setattr(dependency, _MARK, (True, required))
    return dependency


#: ``async def route(key: CurrentKey)``: the same as ``key: APIKey = Depends(current_key)``.
CurrentKey = Annotated[APIKeyUser, Depends(current_key)]
#: ``async def route(key: OptionalKey)``: the key, or ``None`` when anonymous.
OptionalKey = Annotated[APIKeyUser | None, Depends(optional_key)]


@dataclass(eq=False, kw_only=True)
class KeystileSecurity:
    """Dependencies that also declare the two security schemes on the operations using them.

    For apps that add ``APIKeyMiddleware`` themselves instead of calling :func:`protect`
    and still want Swagger UI's *Authorize* on the routes that read the key:

        security = KeystileSecurity(header_name="X-Token")
        app.add_middleware(APIKeyMiddleware, header_name="X-Token")

        @app.get("/me")
        async def me(key: APIKey = Depends(security.current_key)) -> str: ...

    The schemes are FastAPI security classes run as sub-dependencies, so FastAPI runs
    them on every request (about 50 µs on a small route); their values are ignored.
    :func:`protect` declares the same schemes once, in the OpenAPI document, and its
    dependencies cost nothing of the kind. Scopes work as with the module-level ones.
    """

    header_name: str = DEFAULT_HEADER_NAME
    bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME
    header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME
    #: The FastAPI security classes that declare the schemes.
    bearer: HTTPBearer = field(init=False, repr=False)
    api_key_header: APIKeyHeader = field(init=False, repr=False)
    #: :func:`current_key` and :func:`optional_key`, with the schemes declared.
    current_key: KeyDependency = field(init=False, repr=False)
    optional_key: OptionalKeyDependency = field(init=False, repr=False)

    def __post_init__(self) -> None:
        schemes = adapters.security_schemes(self.header_name)
        self.bearer = HTTPBearer(
            scheme_name=self.bearer_scheme_name,
            description=schemes[DEFAULT_BEARER_SCHEME_NAME]["description"],
            auto_error=False,
        )
        self.api_key_header = APIKeyHeader(
            name=self.header_name,
            scheme_name=self.header_scheme_name,
            description=schemes[DEFAULT_HEADER_SCHEME_NAME]["description"],
            auto_error=False,
        )
        bearer_scheme, header_scheme = Depends(self.bearer), Depends(self.api_key_header)

        async def declared_current_key(
            conn: HTTPConnection,
            security_scopes: SecurityScopes,
            bearer: HTTPAuthorizationCredentials | None = bearer_scheme,
            api_key_header: str | None = header_scheme,
        ) -> APIKeyUser:
            return await current_key(conn, security_scopes)

        async def declared_optional_key(
            conn: HTTPConnection,
            security_scopes: SecurityScopes,
            bearer: HTTPAuthorizationCredentials | None = bearer_scheme,
            api_key_header: str | None = header_scheme,
        ) -> APIKeyUser | None:
            return await optional_key(conn, security_scopes)

        setattr(declared_current_key, _MARK, (True, ()))
        setattr(declared_optional_key, _MARK, (False, ()))
        self.current_key = declared_current_key
        self.optional_key = declared_optional_key

    def require_scopes(self, *scopes: str) -> KeyDependency:
        """:func:`require_scopes`, with the schemes declared on the operation."""
        adapters.required_scopes(scopes, instead="; use current_key")
        scoped_key = Security(self.current_key, scopes=list(scopes))

        async def declared_require_scopes(key: APIKeyUser = scoped_key) -> APIKeyUser:
            return key

        declared_require_scopes.__qualname__ = f"require_scopes({' '.join(scopes)})"
        return declared_require_scopes


# -- protect(app) ---------------------------------------------------------------------------

_HTTP_METHODS = frozenset(("get", "put", "post", "delete", "options", "head", "patch", "trace"))


async def keystile_exception_handler(request: Request, exc: Exception) -> Response:
    """Answer a :class:`KeystileHTTPException` exactly as the middleware answers: its body
    as is, not under FastAPI's ``"detail"``. :func:`protect` installs it; an app that adds
    the middleware itself installs it with
    ``app.add_exception_handler(KeystileHTTPException, keystile_exception_handler)``."""
    if not isinstance(exc, KeystileHTTPException):  # pragma: no cover - registered for it only
        raise exc
    return exc.response()


def protect(app: FastAPI, *, exempt_docs: bool = True, **options: Any) -> None:
    """Require a valid API key on every route of ``app``, and say so in its OpenAPI.

    ``protect(app, database_url="sqlite:///keystile.db")`` takes the keyword options of
    :class:`~keystile.APIKeyMiddleware` and:

    * adds the middleware (``app.add_middleware``: add ``CORSMiddleware`` after it);
    * answers the refusals of keystile's dependencies with the middleware's own body
      (:func:`keystile_exception_handler`, unless the app has a handler of its own);
    * with ``exempt_docs`` (the default), adds ``app.docs_url``, ``app.redoc_url``,
      ``app.openapi_url`` and ``app.swagger_ui_oauth2_redirect_url`` (those that are not
      ``None``) to ``exempt_paths``, so the docs load without a key;
    * declares a bearer scheme and an API-key header scheme (``header_name``) in
      ``components.securitySchemes``, lists both as alternatives on every operation that
      takes a key (with the scopes its keystile dependencies require) and ``security: []``
      on exempt ones that do not, and documents every refusal an operation can meet
      (:mod:`keystile.openapi`): 400, 401 with its challenge, 403 (an address outside the
      key's allowlist, a missing scope), 429 with ``Retry-After`` and the ``RateLimit``
      fields, 503 with ``Retry-After``, each with the error body as a schema;
    * with ``cost=``, says in each operation's description how many uses it spends.

    The OpenAPI part wraps ``app.openapi``: it runs when the document is generated (routes
    added after ``protect()`` are included), keeps FastAPI's caching in
    ``app.openapi_schema``, and wraps a custom ``app.openapi`` assigned before
    ``protect()`` (one assigned after replaces it). Exempt operations are those whose
    route path the middleware exempts for every value of its path parameters.
    """
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    config = adapters.adapter_config(options, exempt=[url for url in docs if url and exempt_docs])
    app.add_middleware(APIKeyMiddleware, config=config)
    app.exception_handlers.setdefault(KeystileHTTPException, keystile_exception_handler)
    generate = app.openapi
    patched: list[dict[str, Any]] = []

    def documented_openapi() -> dict[str, Any]:
        schema = generate()
        if not patched or patched[0] is not schema:
            _Documenter(app, config).document(schema)
            patched[:] = [schema]
        return schema

    app.openapi = documented_openapi  # type: ignore[method-assign]
    app.openapi_schema = None  # a document generated before protect() lacks the security


def _api_routes(app: FastAPI) -> Iterable[Any]:
    """The app's API routes as OpenAPI sees them: with an included router's prefix and
    dependencies (recent FastAPI resolves included routers lazily, as route contexts;
    earlier versions copy their routes into ``app.routes``)."""
    iter_route_contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    if iter_route_contexts is None:  # pragma: no cover - FastAPI without route contexts
        return [route for route in app.routes if isinstance(route, APIRoute)]
    return [
        context
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
    ]


def _key_use(route: Any) -> tuple[bool, list[str]]:
    """``(needs a key, scopes required)`` from the route's keystile dependencies, its
    router's and those nested in its own dependencies."""
    needs = False
    scopes: list[str] = []
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop(0)
        pending[:0] = dependant.dependencies
        mark = getattr(inspect.unwrap(dependant.call), _MARK, None) if dependant.call else None
        if mark is None:
            continue
        needs = needs or mark[0]
        declared = [
            *mark[1],
            *(dependant.parent_oauth_scopes or ()),
            *(dependant.own_oauth_scopes or ()),
        ]
        scopes += [s for s in declared if s not in scopes]
    return needs, scopes


def _error_body(codes: list[str]) -> dict[str, Any]:
    """The error body's schema, narrowed to ``codes``."""
    ref = {"$ref": f"#/components/schemas/{openapi.ERROR_SCHEMA_NAME}"}
    return {"allOf": [ref, {"properties": {"error": {"enum": codes}}}]}


class _Documenter:
    """Adds keystile's security and refusals to a generated document."""

    def __init__(self, app: FastAPI, config: KeystileConfig) -> None:
        self.app = app
        self.config = config
        # on_error makes the middleware's responses; an app handler of its own, the
        # dependencies'. What they send is theirs to document.
        self.middleware_known = config.on_error is None
        handler = app.exception_handlers.get(KeystileHTTPException)
        self.app_known = handler is keystile_exception_handler

    def document(self, schema: dict[str, Any]) -> None:
        components = schema.setdefault("components", {})
        schemes = adapters.security_schemes(self.config.header_name)
        components.setdefault("securitySchemes", {}).update(schemes)
        routes = {
            (route.path_format, method.lower()): route
            for route in _api_routes(self.app)
            for method in route.methods or ()
        }
        with_body = False
        for path, item in (schema.get("paths") or {}).items():
            exempt = adapters.exempt_route(path, self.config)
            for method, operation in item.items():
                if method in _HTTP_METHODS and isinstance(operation, dict):
                    route = routes.get((path, method))
                    needs, scopes = _key_use(route) if route else (False, [])
                    with_body |= openapi.document_operation(
                        operation,
                        exempt=exempt,
                        required=self.config.required,
                        key_needed=needs,
                        scopes=scopes,
                        body_schema=_error_body,
                        middleware_known=self.middleware_known,
                        app_known=self.app_known,
                        rate_limit_headers=self.config.rate_limit_headers,
                    )
                    cost = self.config.request_cost
                    note = None if exempt else cost.describe(method.upper(), path)
                    if note:
                        operation["description"] = "\n\n".join(
                            filter(None, (operation.get("description"), note))
                        )
        if with_body:
            components.setdefault("schemas", {})[openapi.ERROR_SCHEMA_NAME] = openapi.error_schema()


def key_management_router(
    *, prefix: str = "", tags: Sequence[str] = ("API keys",), **options: Unpack[ManagementOptions]
) -> APIRouter:
    """The key-management endpoints of ``keystile.management.management_app`` (same
    keyword arguments, plus ``prefix`` and ``tags``) as an ``APIRouter``: include it and
    they show in the app's ``/docs``. Exempt its paths from the middleware: the app's own
    sign-in, through ``owner(request)``, says whose keys a request may manage."""
    from .management.router import management_router

    return management_router(prefix=prefix, tags=tags, **options)


__all__ = [
    "DEFAULT_BEARER_SCHEME_NAME",
    "DEFAULT_HEADER_SCHEME_NAME",
    "APIKey",
    "CurrentKey",
    "KeystileHTTPException",
    "KeystileSecurity",
    "OptionalKey",
    "current_key",
    "key_management_router",
    "keystile_exception_handler",
    "optional_key",
    "protect",
    "require_scopes",
]
