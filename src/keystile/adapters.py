"""What the framework adapters share: each of ``keystile.fastapi``, ``litestar``, ``django``
and ``quart`` only translates these rules into its framework's terms.

* **The middleware that verified the request** is ``scope["keystile"]``
  (:func:`find_middleware`). Without it an adapter fails closed with a server error: the
  app is misassembled, not the client, and a silent 401 on every request would hide that.
* **Scopes** (:func:`scope_refusal`): no key is a ``MissingCredentials``, a key without a
  required scope an ``InsufficientScope`` naming the missing ones; ``"authenticated"`` is
  held by every verified key, as in ``request.auth.scopes``.
* **A refusal** is counted with the middleware's own (:func:`count_refusal`, so
  ``stats()`` sees it) and sent with the middleware's status, headers and body
  (:class:`Refusal`, from :mod:`keystile.responses`); a WebSocket handshake is closed with
  1008 and the error code (:func:`close_code`).
* **Options**: an adapter that installs the middleware builds its
  :class:`~keystile.config.KeystileConfig` once (:func:`adapter_config`), adds its docs
  to the exempt paths, hands that config to the middleware and reads the options it
  documents from it, never from the keywords.
* **OpenAPI**: whether the middleware exempts a route (:func:`exempt_route`, from the
  config's exact and prefix sets), and the security schemes (:func:`security_schemes`,
  from :mod:`keystile.openapi`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import KeystileConfig
from .errors import AuthenticationError, InsufficientScope, MissingCredentials
from .middleware import APIKeyMiddleware
from .openapi import IMPLICIT_SCOPE, fully_exempt, security_schemes
from .principal import APIKeyUser
from .responses import WEBSOCKET_POLICY_VIOLATION, error_body, error_code, error_headers

__all__ = [
    "Refusal",
    "adapter_config",
    "close_code",
    "count_refusal",
    "exempt_route",
    "find_middleware",
    "missing_extra",
    "required_scopes",
    "scope_refusal",
    "security_schemes",
]


def missing_extra(adapter: str, needs: str) -> ImportError:
    """The error of importing ``keystile.<adapter>`` without its framework (``needs``),
    an optional extra of the same name."""
    return ImportError(
        f'keystile.{adapter} needs {needs}, an optional extra: pip install "keystile[{adapter}]"'
    )


def find_middleware(
    scope: object, *, reader: str, place: str, error: type[Exception] = RuntimeError
) -> APIKeyMiddleware:
    """The ``APIKeyMiddleware`` that verified the request of ``scope`` (its ASGI scope).

    Without one, ``error`` saying that ``reader`` (``"keystile.quart reads"``) reads what
    the middleware verified, but it is not in front of ``place`` (where, and how to put
    it there).
    """
    middleware = scope.get("keystile") if isinstance(scope, Mapping) else None
    if not isinstance(middleware, APIKeyMiddleware):
        raise error(
            f"{reader} the key APIKeyMiddleware verified, but the middleware is not in "
            f"front of {place}"
        )
    return middleware


def required_scopes(scopes: tuple[str, ...], *, instead: str = "") -> tuple[str, ...]:
    """The scopes a ``require_scopes(*scopes)`` checks, each once; none is a programming
    error (``ValueError``, suggesting ``instead``)."""
    if not scopes:
        raise ValueError(f"require_scopes needs at least one scope{instead}")
    return tuple(dict.fromkeys(scopes))


def scope_refusal(user: object, required: tuple[str, ...] = ()) -> AuthenticationError | None:
    """Why a request whose ``scope["user"]`` is ``user`` may not reach what needs
    ``required``, or ``None`` when it may."""
    if not isinstance(user, APIKeyUser):
        return MissingCredentials()
    held = user.scopes
    for scope in required:
        if scope not in held and scope != IMPLICIT_SCOPE:
            missing = (s for s in required if s not in held and s != IMPLICIT_SCOPE)
            return InsufficientScope(required, tuple(missing))
    return None


def count_refusal(middleware: APIKeyMiddleware, refusal: AuthenticationError) -> None:
    """Count ``refusal`` with the middleware's own (``stats().rejects``)."""
    middleware.verifier.counters.rejects[refusal.reason] += 1


def close_code(refusal: AuthenticationError) -> tuple[int, str]:
    """How a refused WebSocket handshake is closed: 1008 and the error code, as the
    middleware closes it."""
    return WEBSOCKET_POLICY_VIOLATION, error_code(refusal)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the middleware sends it: status, JSON body and headers."""

    status_code: int
    body: dict[str, object]
    headers: dict[str, str]

    @classmethod
    def of(cls, error: AuthenticationError, middleware: APIKeyMiddleware) -> Refusal:
        """The middleware's answer to ``error`` (its realm and API-key header name)."""
        return cls(
            error.status_code,
            error_body(error, header_name=middleware.header_name),
            error_headers(error, realm=middleware.realm),
        )


def adapter_config(options: Mapping[str, Any], *, exempt: Iterable[str] = ()) -> KeystileConfig:
    """The config ``APIKeyMiddleware(app, **options)`` would build (``config=`` and
    keywords beside it alike; an unknown name is a ``TypeError``), with ``exempt`` (the
    docs) added to its exempt paths."""
    keywords = dict(options)
    config: KeystileConfig | None = keywords.pop("config", None)
    if config is None:
        config = KeystileConfig.from_options(**keywords)
    elif keywords:
        config = config.replace(**keywords)
    extra = [path for path in dict.fromkeys(exempt) if path not in config.exempt_paths]
    return config.replace(exempt_paths=[*config.exempt_paths, *extra]) if extra else config


def exempt_route(path: str, config: KeystileConfig) -> bool:
    """Whether the middleware of ``config`` exempts every request that the route path
    ``path`` (an OpenAPI path, maybe with ``{parameters}``) matches."""
    return fully_exempt(path, config.exempt_exact, config.exempt_prefixes)
