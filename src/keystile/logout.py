"""Logout: revoke the key that authenticated the current request.

It runs on the request path, inside a route behind ``APIKeyMiddleware``, and answers a
failure the way the middleware does; so it lives with the request side, apart from
``KeyManager``, which knows nothing of requests.
"""

from __future__ import annotations

import logging

from starlette.exceptions import WebSocketException
from starlette.requests import HTTPConnection

from .errors import ServiceUnavailable, StoreError
from .principal import APIKeyUser
from .responses import WEBSOCKET_TRY_AGAIN_LATER, KeystileHTTPException
from .stores.records import utcnow

__all__ = ["LOGOUT_UNAVAILABLE", "revoke_presented"]

logger = logging.getLogger("keystile")

LOGOUT_UNAVAILABLE = (
    "The logout could not be recorded because the key store is unavailable; the key still"
    " works. Retry shortly."
)


async def revoke_presented(conn: HTTPConnection) -> bool:
    """Revoke the key that authenticated this request (logout).

    Returns whether a key was revoked. Needs ``APIKeyMiddleware`` in front of the route.
    The audit log records it as ``logout`` by ``apikey:<name>`` (the key itself).

    The key leaves this process's cache first, so its next request here reaches the
    store whatever happens next. If the store cannot record the revocation, the key
    still works, and the client must be told: this raises
    :class:`~keystile.responses.KeystileHTTPException`, answered like the middleware's
    own 503 (``Retry-After``, error ``temporarily_unavailable``), or on a WebSocket
    closes with 1013 (try again later).
    """
    user = conn.scope.get("user")
    middleware = conn.scope.get("keystile")
    if not isinstance(user, APIKeyUser) or middleware is None:
        return False
    middleware.evict(user.key_id)
    try:
        revoked: bool = await middleware.store.revoke(
            user.key_id, user.owner, at=utcnow(), actor=user.display_name, action="logout"
        )
    except StoreError as exc:
        logger.warning("keystile: could not record the logout of key %s: %s", user.redacted, exc)
        if conn.scope["type"] == "websocket":
            raise WebSocketException(
                WEBSOCKET_TRY_AGAIN_LATER, reason="temporarily_unavailable"
            ) from exc
        error = ServiceUnavailable("store_unavailable", LOGOUT_UNAVAILABLE)
        raise KeystileHTTPException(
            error, realm=middleware.realm, header_name=middleware.header_name
        ) from exc
    # A request that raced the revocation may have cached the key again meanwhile.
    middleware.evict(user.key_id)
    return revoked
