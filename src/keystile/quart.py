"""Quart: the key the middleware verified, and a decorator over its scopes.

    from quart import Quart
    from keystile import APIKeyMiddleware
    from keystile.quart import current_key, require_scopes

    app = Quart(__name__)

    @app.post("/items")
    @require_scopes("items:write")
    async def create_item() -> dict[str, str]:
        return {"by": current_key().display_name}

    app.asgi_app = APIKeyMiddleware(app.asgi_app, database_url="sqlite:///keystile.db")

Quart has no authentication layer of its own: the middleware wraps ``app.asgi_app`` and
leaves the key in the ASGI scope, which Quart's request and WebSocket objects keep.
These helpers read it there, never verify it again, and refuse as the middleware does:
the same status, headers and JSON body (:mod:`keystile.responses`), sent with
``quart.abort``; a WebSocket handshake is closed with 1008 and the error code.

Quart is an optional extra: ``pip install "keystile[quart]"``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar, cast

from . import adapters

try:
    from quart import Response, abort, current_app, has_websocket_context, request, websocket
except ImportError as exc:  # pragma: no cover - exercised by a test that hides quart
    raise adapters.missing_extra("quart", "Quart") from exc

from .errors import AuthenticationError
from .middleware import APIKeyMiddleware
from .principal import APIKeyUser
from .responses import error_response

Handler = TypeVar("Handler", bound=Callable[..., Any])


def _scope() -> tuple[dict[str, Any], APIKeyMiddleware]:
    """This request's (or WebSocket's) ASGI scope, and the middleware that verified it."""
    # Quart types the scope as its TypedDicts; the middleware's keys are not in them.
    scope = cast(dict[str, Any], (websocket if has_websocket_context() else request).scope)
    middleware = adapters.find_middleware(
        scope,
        reader="keystile.quart reads",
        place="this app: app.asgi_app = APIKeyMiddleware(app.asgi_app, ...)",
    )
    return scope, middleware


def _abort(middleware: APIKeyMiddleware, refusal: AuthenticationError) -> NoReturn:
    adapters.count_refusal(middleware, refusal)
    answer = error_response(refusal, realm=middleware.realm, header_name=middleware.header_name)
    headers = {k: v for k, v in answer.headers.items() if k != "content-length"}
    abort(Response(bytes(answer.body), status=answer.status_code, headers=headers))


def current_key() -> APIKeyUser:
    """The verified key of this request or WebSocket; without one (an exempt path, or
    ``required=False``) the request is refused with the middleware's 401 (a WebSocket
    handshake gets it as Quart's rejection response, where the server can send one)."""
    scope, middleware = _scope()
    refusal = adapters.scope_refusal(scope.get("user"))
    if refusal is not None:
        _abort(middleware, refusal)
    return cast(APIKeyUser, scope["user"])


def require_scopes(*scopes: str) -> Callable[[Handler], Handler]:
    """A decorator (under the route's): the key must hold every one of ``scopes``.

    401 when the handler is reached without a key, 403 ``insufficient_scope`` naming the
    missing scopes otherwise, both as the middleware sends them; on a WebSocket the
    handshake is closed with 1008. "authenticated" is held by every verified key.
    """
    required = adapters.required_scopes(scopes, instead="; use current_key")

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            scope, middleware = _scope()
            refusal = adapters.scope_refusal(scope.get("user"), required)
            if refusal is not None:
                if not has_websocket_context():
                    _abort(middleware, refusal)
                adapters.count_refusal(middleware, refusal)
                await websocket.close(*adapters.close_code(refusal))
                return None
            result: Awaitable[Any] = current_app.ensure_async(handler)(*args, **kwargs)
            return await result

        return cast(Handler, guarded)

    return decorate


__all__ = ["current_key", "require_scopes"]
