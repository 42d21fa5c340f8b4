"""FastAPI dependencies over the principal ``APIKeyMiddleware`` already verified.

::

    from fastapi import Depends, FastAPI
    from keystile import APIKeyMiddleware
    from keystile.fastapi import CurrentKey, require_scopes

    app = FastAPI()
    app.add_middleware(APIKeyMiddleware, exempt_paths=["/docs", "/openapi.json"])

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, str]:
        return {"id": key.key_id, "owner": key.owner}

    @app.post("/items", dependencies=[Depends(require_scopes("items:write"))])
    async def create_item() -> None: ...

The middleware is the only verifier: these dependencies read ``scope["user"]``, never
the key itself, so a request costs one verification however many dependencies it uses.
They also declare two OpenAPI security schemes, a bearer scheme and an ``X-API-Key``
header scheme, listed on every operation as alternatives, so Swagger UI's *Authorize*
button works with either. Their values are ignored (the middleware strips the credential
headers before the app sees them).

Refusals are :class:`KeystileHTTPException` (defined in :mod:`keystile.responses`, a
Starlette ``HTTPException``, which FastAPI's default handler answers) whose status,
``WWW-Authenticate`` and ``Cache-Control`` headers and body come from
:func:`keystile.responses.error_response`, the same as the middleware's own refusals;
FastAPI's default handler puts the body under ``"detail"``. ``revoke_presented`` raises
the same class when a logout cannot be recorded, so one exception handler reshapes
both. On a WebSocket the handshake is closed with 1008 and the error code, as the
middleware does.

FastAPI is an optional extra: ``pip install "keystile[fastapi]"``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

try:
    from fastapi import Depends, Security, WebSocketException
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

from starlette.requests import HTTPConnection

from .errors import AuthenticationError, InsufficientScope, MissingCredentials
from .middleware import DEFAULT_HEADER_NAME, APIKeyMiddleware
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
    "optional_key",
    "require_scopes",
]

#: The type of ``current_key``: the verified key (id, owner, name, scopes, metadata).
APIKey = APIKeyUser

DEFAULT_BEARER_SCHEME_NAME = "bearerAuth"
DEFAULT_HEADER_SCHEME_NAME = "apiKeyHeader"

#: The scope every verified key holds without being granted it: ``request.auth.scopes``
#: lists it, as Starlette's own backends do, so ``require_scopes("authenticated")``
#: agrees with ``@requires("authenticated")``.
_IMPLICIT_SCOPE = "authenticated"

KeyDependency = Callable[..., Awaitable[APIKeyUser]]
OptionalKeyDependency = Callable[..., Awaitable[APIKeyUser | None]]


def _middleware(conn: HTTPConnection) -> APIKeyMiddleware:
    middleware = conn.scope.get("keystile")
    if not isinstance(middleware, APIKeyMiddleware):
        # Failing closed with a 500 beats a silent 401 on every request: the app is
        # misassembled, not the client.
        raise RuntimeError(
            "keystile.fastapi dependencies read the key APIKeyMiddleware verified, but the "
            "middleware is not in front of this route: app.add_middleware(APIKeyMiddleware, ...)"
        )
    return middleware


def _principal(conn: HTTPConnection) -> APIKeyUser | None:
    _middleware(conn)
    user = conn.scope.get("user")
    return user if isinstance(user, APIKeyUser) else None


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


def _check_scopes(conn: HTTPConnection, key: APIKeyUser, security_scopes: SecurityScopes) -> None:
    required = tuple(dict.fromkeys(security_scopes.scopes))
    missing = tuple(
        scope for scope in required if scope not in key.scopes and scope != _IMPLICIT_SCOPE
    )
    if missing:
        raise _refuse(conn, InsufficientScope(required, missing))


class KeystileSecurity:
    """The dependencies for one header name and pair of OpenAPI scheme names.

    The module-level ``current_key``, ``optional_key`` and ``require_scopes`` come from
    ``KeystileSecurity()``; build your own when the middleware uses another
    ``header_name`` so OpenAPI (and Swagger UI) name the right header::

        security = KeystileSecurity(header_name="X-Token")
        app.add_middleware(APIKeyMiddleware, header_name="X-Token")

        @app.get("/me")
        async def me(key: APIKey = Depends(security.current_key)) -> str: ...

    Every dependency accepts FastAPI scopes: ``Security(current_key, scopes=["admin"])``
    is the same as ``Depends(require_scopes("admin"))``, and scopes declared by
    enclosing ``Security(...)`` dependencies or routers add up.
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
        self.optional_key: OptionalKeyDependency = self._optional_key_dependency()
        self.current_key: KeyDependency = self._current_key_dependency()

    def require_scopes(self, *scopes: str) -> KeyDependency:
        """A dependency that returns the key if it holds every one of ``scopes``.

        401 when the route is reached without a key (``required=False``, or an exempt
        path); 403 ``insufficient_scope`` naming the missing scopes otherwise. Use it per
        route (``dependencies=[Depends(require_scopes("items:write"))]``), as a parameter
        (``key: APIKey = Depends(require_scopes("admin"))``) or per router.
        """
        if not scopes:
            raise ValueError("require_scopes needs at least one scope; use current_key")
        scoped_key = Security(self.current_key, scopes=list(scopes))

        async def require_scopes(key: APIKeyUser = scoped_key) -> APIKeyUser:
            return key

        require_scopes.__qualname__ = f"require_scopes({' '.join(scopes)})"
        return require_scopes

    def _optional_key_dependency(self) -> OptionalKeyDependency:
        # The schemes are sub-dependencies only so OpenAPI lists them; their values are
        # ignored (and ``None`` once the middleware strips the credential headers).
        bearer_scheme, header_scheme = Depends(self.bearer), Depends(self.api_key_header)

        async def optional_key(
            conn: HTTPConnection,
            security_scopes: SecurityScopes,
            bearer: HTTPAuthorizationCredentials | None = bearer_scheme,
            api_key_header: str | None = header_scheme,
        ) -> APIKeyUser | None:
            """The verified key, or ``None`` for an anonymous request (``required=False``).

            A key that is present must still hold any scopes the route declares.
            """
            key = _principal(conn)
            if key is not None:
                _check_scopes(conn, key, security_scopes)
            return key

        return optional_key

    def _current_key_dependency(self) -> KeyDependency:
        bearer_scheme, header_scheme = Depends(self.bearer), Depends(self.api_key_header)

        async def current_key(
            conn: HTTPConnection,
            security_scopes: SecurityScopes,
            bearer: HTTPAuthorizationCredentials | None = bearer_scheme,
            api_key_header: str | None = header_scheme,
        ) -> APIKeyUser:
            """The verified key; 401 without one, 403 if it lacks a declared scope."""
            key = _principal(conn)
            if key is None:
                raise _refuse(conn, MissingCredentials())
            _check_scopes(conn, key, security_scopes)
            return key

        return current_key


_default = KeystileSecurity()

#: ``key: APIKey = Depends(current_key)``: the verified key; 401 without one.
current_key: KeyDependency = _default.current_key
#: ``key: APIKey | None = Depends(optional_key)``: the key, or ``None`` when anonymous.
optional_key: OptionalKeyDependency = _default.optional_key
#: ``Depends(require_scopes("items:write"))``: the key, 403 unless it holds the scopes.
require_scopes = _default.require_scopes

#: ``async def route(key: CurrentKey)``: the same as ``key: APIKey = Depends(current_key)``.
CurrentKey = Annotated[APIKeyUser, Depends(current_key)]
#: ``async def route(key: OptionalKey)``: the key, or ``None`` when anonymous.
OptionalKey = Annotated[APIKeyUser | None, Depends(optional_key)]
