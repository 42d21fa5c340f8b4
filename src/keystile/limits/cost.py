"""What one request weighs against the limits: ``cost=`` on the middleware.

``cost={"/v1/render": 10, "POST /v1/batch": 50, "/v1/export/*": 5}``: a path the app
routes on (or ``METHOD path``; a trailing ``*`` makes a prefix, the longest one wins), to
a whole number of uses; any other request costs 1. Or a callable of the ASGI scope that
returns the number. The cost is spent against every rate limit and quota of the key and
its owner before the app runs: all have room for it, or nothing is spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigurationError, ServiceUnavailable
from .policy import MAX_QUOTA

__all__ = ["CostOption", "RequestCost", "check_cost"]

logger = logging.getLogger("keystile.limits")

#: What ``cost=`` takes.
CostOption = Mapping[str, int] | Callable[[Any], int] | None

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


def check_cost(n: object, what: str) -> int:
    """``n`` if it is a whole number of uses from 1 to ``MAX_QUOTA``, else ``ValueError``
    saying what ``what`` got."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_QUOTA:
        raise ValueError(f"{what} must be a whole number from 1 to {MAX_QUOTA}, got {n!r}")
    return n


class RequestCost:
    """``cost=`` parsed once (``ConfigurationError`` for a bad entry), asked per request."""

    __slots__ = ("call", "exact", "prefixes")

    def __init__(self, option: CostOption) -> None:
        self.call: Callable[[Any], int] | None = None
        self.exact: dict[tuple[str, str], int] = {}
        self.prefixes: list[tuple[str, str, int]] = []
        if option is None:
            return
        if callable(option):
            self.call = option
            return
        if not isinstance(option, Mapping):
            raise ConfigurationError(
                "cost must be a mapping of path (or 'METHOD path') to uses, or a callable"
            )
        for target, n in option.items():
            method, path = _target(target)
            try:
                n = check_cost(n, f"cost[{target!r}]")
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            if path.endswith("*"):
                self.prefixes.append((method, path[:-1], n))
            else:
                self.exact[method, path] = n
        self.prefixes.sort(key=lambda entry: -len(entry[1]))

    def __bool__(self) -> bool:
        return self.call is not None or bool(self.exact or self.prefixes)

    def of(self, scope: Any, path: str) -> int:
        """The uses this request spends (``path``: the path the app routes on). A callable
        that fails or answers anything but a whole number from 1 to ``MAX_QUOTA`` is
        logged and the request refused with 503: it is never let through unweighed."""
        if self.call is not None:
            try:
                return check_cost(self.call(scope), "the cost callable's answer")
            except Exception as exc:
                logger.error("keystile: cost= failed for a request: %s", exc)
                raise ServiceUnavailable("internal_error") from None
        method = scope.get("method", "GET")
        exact = self.exact
        n = exact.get((method, path)) or exact.get(("", path))
        if n is not None:
            return n
        for wanted, prefix, cost in self.prefixes:
            if (not wanted or wanted == method) and path.startswith(prefix):
                return cost
        return 1

    def describe(self, method: str, path: str) -> str | None:
        """For an OpenAPI operation (``path`` as the route declares it): what it costs,
        if not 1."""
        if self.call is not None:
            return "Each request spends uses of the key's limits and quota by what it asks."
        n = self.of({"method": method}, path)
        if n == 1:
            return None
        return f"Each request spends {n} uses of the key's limits and quota."


def _target(target: object) -> tuple[str, str]:
    """``("POST", "/v1/batch")`` of ``"POST /v1/batch"``; ``("", path)`` for any method."""
    if not isinstance(target, str):
        raise ConfigurationError(f"cost keys are paths such as '/v1/render', not {target!r}")
    method, _, path = target.strip().rpartition(" ")
    method = method.strip().upper()
    if not path.startswith("/") or (method and method not in _METHODS):
        raise ConfigurationError(
            f"invalid cost key {target!r}: give a path ('/v1/render') or 'METHOD path'"
        )
    return method, path
