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
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any

try:
    from fastapi import Depends, FastAPI, Security, WebSocketException
    from fastapi import routing as fastapi_routing
    from fastapi.routing import APIRoute
    from fastapi.security import (
        APIKeyHeader,
        HTTPAuthorizationCredentials,
        HTTPBearer,
        SecurityScopes,
    )
except ImportError as exc:  # pragma: no cover - exercised by a test that hides fastapi
    raise ImportError(
        'keystile.fastapi needs FastAPI, an optional extra: pip install "keystile[fastapi]"'
    ) from exc

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from .errors import AuthenticationError, InsufficientScope, MissingCredentials
from .limits.cost import RequestCost
from .middleware import DEFAULT_HEADER_NAME, APIKeyMiddleware
from .openapi import (
    DEFAULT_BEARER_SCHEME_NAME,
    DEFAULT_HEADER_SCHEME_NAME,
    ERROR_SCHEMA_NAME,
    IMPLICIT_SCOPE,
    document_operation,
    error_schema,
    fully_exempt,
    security_schemes,
)
from .principal import APIKeyUser
from .responses import WEBSOCKET_POLICY_VIOLATION, KeystileHTTPException, error_code

__all__ = [
    "DEFAULT_BEARER_SCHEME_NAME",
    "DEFAULT_HEADER_SCHEME_NAME",
    "APIKey",
    "CurrentKey",
    "KeystileHTTPException",
    "KeystileSecurity",
    "OptionalKey",
    "current_key",
    "keystile_exception_handler",
    "optional_key",
    "protect",
    "require_scopes",
]

#: The type of ``current_key``: the verified key (id, owner, name, scopes, metadata).
APIKey = APIKeyUser


KeyDependency = Callable[..., Awaitable[APIKeyUser]]
OptionalKeyDependency = Callable[..., Awaitable[APIKeyUser | None]]

#: Set on every keystile dependency: ``(needs a key, the scopes it requires)``. OpenAPI
#: generation reads it to tell which operations need a key and which scopes.
_MARK = "__keystile_dependency__"


# -- the dependencies ----------------------------------------------------------------------


def _middleware(conn: HTTPConnection) -> APIKeyMiddleware:
    middleware = conn.scope.get("keystile")
    if not isinstance(middleware, APIKeyMiddleware):
        # Failing closed with a 500 beats a silent 401 on every request: the app is
        # misassembled, not the client.
        raise RuntimeError(
            "keystile.fastapi dependencies read the key APIKeyMiddleware verified, but the "
            "middleware is not in front of this route: keystile.fastapi.protect(app, ...) "
            "or app.add_middleware(APIKeyMiddleware, ...)"
        )
    return middleware


def _refuse(conn: HTTPConnection, auth_error: AuthenticationError) -> Exception:
    """The exception that refuses this request, counted with the middleware's rejects."""
    middleware = _middleware(conn)
    middleware.verifier.counters.rejects[auth_error.reason] += 1
    if conn.scope["type"] == "websocket":
        # The same close the middleware sends for a refused handshake.
        return WebSocketException(WEBSOCKET_POLICY_VIOLATION, reason=error_code(auth_error))
    return KeystileHTTPException(
        auth_error, realm=middleware.realm, header_name=middleware.header_name
    )


def _missing(required: Iterable[str], held: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for s in required if s not in held and s != IMPLICIT_SCOPE)


def _check_scopes(conn: HTTPConnection, key: APIKeyUser, scopes: list[str]) -> None:
    missing = _missing(scopes, key.scopes)
    if missing:
        raise _refuse(conn, InsufficientScope(tuple(dict.fromkeys(scopes)), missing))


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
    if not scopes:
        raise ValueError("require_scopes needs at least one scope; use current_key")
    required = tuple(dict.fromkeys(scopes))

    async def dependency(conn: HTTPConnection, security_scopes: SecurityScopes) -> APIKeyUser:
        key = conn.scope.get("user")
        if not isinstance(key, APIKeyUser):
            raise _refuse(conn, MissingCredentials())
        held = key.scopes
        for scope in required:
            if scope not in held and scope != IMPLICIT_SCOPE:
                raise _refuse(conn, InsufficientScope(required, _missing(required, held)))
        if security_scopes.scopes:  # an enclosing Security(..., scopes=[...])
            _check_scopes(conn, key, [*security_scopes.scopes, *required])
        return key

    dependency.__name__ = "require_scopes"
    dependency.__qualname__ = f"require_scopes({' '.join(required)})"
    setattr(dependency, _MARK, (True, required))
    return dependency


#: ``async def route(key: CurrentKey)``: the same as ``key: APIKey = Depends(current_key)``.
CurrentKey = Annotated[APIKeyUser, Depends(current_key)]
#: ``async def route(key: OptionalKey)``: the key, or ``None`` when anonymous.
OptionalKey = Annotated[APIKeyUser | None, Depends(optional_key)]


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

    def __init__(
        self,
        *,
        header_name: str = DEFAULT_HEADER_NAME,
        bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
        header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
    ) -> None:
        self.header_name = header_name
        self.bearer = HTTPBearer(
            scheme_name=bearer_scheme_name,
            description="An API key as a bearer token: `Authorization: Bearer <key>`.",
            auto_error=False,
        )
        self.api_key_header = APIKeyHeader(
            name=header_name,
            scheme_name=header_scheme_name,
            description=f"An API key in the `{header_name}` header.",
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
        self.current_key: KeyDependency = declared_current_key
        self.optional_key: OptionalKeyDependency = declared_optional_key

    def require_scopes(self, *scopes: str) -> KeyDependency:
        """:func:`require_scopes`, with the schemes declared on the operation."""
        if not scopes:
            raise ValueError("require_scopes needs at least one scope; use current_key")
        scoped_key = Security(self.current_key, scopes=list(scopes))

        async def declared_require_scopes(key: APIKeyUser = scoped_key) -> APIKeyUser:
            return key

        declared_require_scopes.__qualname__ = f"require_scopes({' '.join(scopes)})"
        return declared_require_scopes


# -- protect(app) ---------------------------------------------------------------------------

_HTTP_METHODS = frozenset(("get", "put", "post", "delete", "options", "head", "patch", "trace"))
_MIDDLEWARE_OPTIONS = inspect.signature(APIKeyMiddleware).parameters


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
    unknown = sorted(name for name in options if name == "app" or name not in _MIDDLEWARE_OPTIONS)
    if unknown:
        raise TypeError(f"protect() got unknown APIKeyMiddleware options: {', '.join(unknown)}")
    exempt = list(options.pop("exempt_paths", ()))
    if exempt_docs:
        docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
        exempt += [url for url in docs if url and url not in exempt]
    app.add_middleware(APIKeyMiddleware, exempt_paths=exempt, **options)
    app.exception_handlers.setdefault(KeystileHTTPException, keystile_exception_handler)
    generate = app.openapi
    patched: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not patched or patched[0] is not schema:
            _Documenter(app, exempt, options).document(schema)
            patched[:] = [schema]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
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
    ref = {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}
    return {"allOf": [ref, {"properties": {"error": {"enum": codes}}}]}


class _Documenter:
    """Adds keystile's security and refusals to a generated document."""

    def __init__(self, app: FastAPI, exempt_paths: list[str], options: dict[str, Any]) -> None:
        self.app = app
        self.header_name: str = options.get("header_name", DEFAULT_HEADER_NAME)
        self.required: bool = options.get("required", True)
        self.rate_limit_headers: bool = options.get("rate_limit_headers", False)
        # on_error makes the middleware's responses; an app handler of its own, the
        # dependencies'. What they send is theirs to document.
        self.middleware_known = options.get("on_error") is None
        handler = app.exception_handlers.get(KeystileHTTPException)
        self.app_known = handler is keystile_exception_handler
        self.exact = frozenset(p for p in exempt_paths if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in exempt_paths if p.endswith("*"))
        self.cost = RequestCost(options.get("cost"))

    def document(self, schema: dict[str, Any]) -> None:
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(security_schemes(self.header_name))
        routes = {
            (route.path_format, method.lower()): route
            for route in _api_routes(self.app)
            for method in route.methods or ()
        }
        with_body = False
        for path, item in (schema.get("paths") or {}).items():
            exempt = fully_exempt(path, self.exact, self.prefixes)
            for method, operation in item.items():
                if method in _HTTP_METHODS and isinstance(operation, dict):
                    route = routes.get((path, method))
                    needs, scopes = _key_use(route) if route else (False, [])
                    with_body |= document_operation(
                        operation,
                        exempt=exempt,
                        required=self.required,
                        key_needed=needs,
                        scopes=scopes,
                        body_schema=_error_body,
                        middleware_known=self.middleware_known,
                        app_known=self.app_known,
                        rate_limit_headers=self.rate_limit_headers,
                    )
                    note = None if exempt else self.cost.describe(method.upper(), path)
                    if note:
                        operation["description"] = "\n\n".join(
                            filter(None, (operation.get("description"), note))
                        )
        if with_body:
            components.setdefault("schemas", {})[ERROR_SCHEMA_NAME] = error_schema()
