"""``keystile.charge(request, n)``: spend a request's quota after the fact.

A handler that learns what a request cost only once it ran (tokens generated, rows
exported) charges it: ``n`` more uses of every quota the key and its owner have. They
count at once in this process (the next request sees them), reach the store with the
next flush, and with Redis are taken from its counters by the next decision. Rate limits
are not touched: a request's weight against them is ``cost=``, known before the app runs.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from starlette.requests import HTTPConnection

from .limits.policy import MAX_QUOTA

__all__ = ["charge"]

logger = logging.getLogger("keystile.limits")


def charge(request: HTTPConnection | MutableMapping[str, Any], n: int) -> bool:
    """Spend ``n`` (a whole number, 0 to ``MAX_QUOTA``) more uses of the quotas of the
    key that authenticated ``request`` (a Starlette request or WebSocket, or the ASGI
    scope) and of its owner. ``True`` if something was charged; ``False`` for a request
    without a limited key, ``n=0``, or a malformed ``n`` (logged, nothing spent: a
    handler's mistake never turns its response into a 500)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_QUOTA:
        logger.error(
            "keystile: charge(request, n) takes a whole number from 0 to %d, got %r;"
            " nothing charged",
            MAX_QUOTA,
            n,
        )
        return False
    scope = request.scope if isinstance(request, HTTPConnection) else request
    middleware = scope.get("keystile")
    policy = getattr(scope.get("user"), "limits", None)
    if not n or middleware is None or policy is None or not policy.quotas:
        return False
    middleware.limits.charge(policy, n)
    return True
