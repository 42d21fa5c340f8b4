"""Litestar: a plugin that installs keystile in one line, and a guard over its scopes.

    from litestar import Litestar, get
    from keystile.litestar import KeystilePlugin, require_scopes

    @get("/items", guards=[require_scopes("items:read")])
    async def items() -> list[str]: ...

    app = Litestar(
        route_handlers=[items], plugins=[KeystilePlugin(database_url="sqlite:///keystile.db")]
    )

Litestar applies middleware per route, so ``DefineMiddleware(APIKeyMiddleware, ...)``
builds one ``APIKeyMiddleware`` per route handler. Every one of them built from the same
options shares one :class:`~keystile.runtime.KeystileRuntime` (one cache, one store and
pool, one usage recorder), so a key costs one argon2 verification per process however
many routes it calls. What route middleware cannot do is see the ASGI ``lifespan``
scope, so nothing would write the pending ``last_used_at`` at shutdown; and it cannot
tell OpenAPI how to send a key. :class:`KeystilePlugin` adds the middleware, an
``on_shutdown`` hook that stops the shared runtime (flushing ``last_used_at``), the
bearer and API-key header schemes in ``components.securitySchemes``, and those schemes
as alternatives on every operation whose path is not exempt.

``request.user`` is the verified :class:`~keystile.APIKeyUser` and ``request.auth`` its
Starlette ``AuthCredentials`` (``scopes == ["authenticated", *key scopes]``), so guards
and handlers read the key the middleware already verified: nothing verifies it twice.

Litestar is an optional extra: ``pip install "keystile[litestar]"``.
"""

from __future__ import annotations

from copy import copy
from typing import Any

try:
    from litestar.config.app import AppConfig
    from litestar.connection import ASGIConnection
    from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
    from litestar.handlers.base import BaseRouteHandler
    from litestar.middleware import DefineMiddleware
    from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme
    from litestar.plugins.base import InitPlugin, ReceiveRoutePlugin
    from litestar.routes import BaseRoute, HTTPRoute
    from litestar.types import Guard
except ImportError as exc:  # pragma: no cover - exercised by a test that hides litestar
    raise ImportError(
        'keystile.litestar needs Litestar, an optional extra: pip install "keystile[litestar]"'
    ) from exc

from starlette.types import Receive, Scope, Send

from .errors import AuthenticationError, InsufficientScope, MissingCredentials
from .middleware import DEFAULT_HEADER_NAME, APIKeyMiddleware
from .principal import APIKeyUser
from .responses import error_code, www_authenticate
from .stats import KeystileStats

__all__ = [
    "DEFAULT_BEARER_SCHEME_NAME",
    "DEFAULT_HEADER_SCHEME_NAME",
    "KeystilePlugin",
    "require_scopes",
    "security_components",
    "security_requirements",
]

#: The scheme names ``keystile.fastapi`` uses, so both frameworks document keys alike.
DEFAULT_BEARER_SCHEME_NAME = "bearerAuth"
DEFAULT_HEADER_SCHEME_NAME = "apiKeyHeader"


def security_components(
    *,
    header_name: str = DEFAULT_HEADER_NAME,
    bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
    header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
) -> Components:
    """The two ways to send a key, as OpenAPI security schemes."""
    return Components(
        security_schemes={
            bearer_scheme_name: SecurityScheme(
                type="http",
                scheme="bearer",
                description="An API key as a bearer token: `Authorization: Bearer <key>`.",
            ),
            header_scheme_name: SecurityScheme(
                type="apiKey",
                name=header_name,
                security_scheme_in="header",
                description=f"An API key in the `{header_name}` header.",
            ),
        }
    )


def security_requirements(
    *,
    bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
    header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
) -> list[SecurityRequirement]:
    """Either scheme satisfies an operation: two requirements, i.e. alternatives."""
    return [{bearer_scheme_name: []}, {header_scheme_name: []}]


async def _unreachable(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("keystile: the plugin's handle on the runtime serves no requests")


class KeystilePlugin(InitPlugin, ReceiveRoutePlugin):
    """Protect a Litestar app: ``Litestar(..., plugins=[KeystilePlugin(database_url=...)])``.

    Takes the keyword options of :class:`~keystile.APIKeyMiddleware` and:

    * adds ``DefineMiddleware(APIKeyMiddleware, **options)`` as the outermost app
      middleware, so your own middleware and guards see ``scope["user"]``;
    * exempts the OpenAPI routes (``openapi_config.path``, ``/schema`` by default) unless
      ``exempt_docs=False``, so the schema and its UIs load without a key;
    * declares the bearer and ``X-API-Key`` (``header_name``) schemes and lists them on
      every documented operation whose path is not exempt;
    * stops the shared runtime from ``on_shutdown``: background work ends and the pending
      ``last_used_at`` writes are flushed, which route middleware alone never does.

    ``plugin.middleware`` is an ``APIKeyMiddleware`` of the same configuration (it shares
    the runtime of the per-route instances): ``plugin.middleware.stats()``, ``evict()``.
    """

    __slots__ = (
        "_exempt_exact",
        "_exempt_prefixes",
        "_middleware",
        "_requirements",
        "bearer_scheme_name",
        "exempt_docs",
        "header_scheme_name",
        "options",
    )

    def __init__(
        self,
        *,
        exempt_docs: bool = True,
        bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
        header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
        **options: Any,
    ) -> None:
        self.options = options
        self.exempt_docs = exempt_docs
        self.bearer_scheme_name = bearer_scheme_name
        self.header_scheme_name = header_scheme_name
        self._requirements = security_requirements(
            bearer_scheme_name=bearer_scheme_name, header_scheme_name=header_scheme_name
        )
        self._middleware: APIKeyMiddleware | None = None
        self._exempt_exact: frozenset[str] = frozenset()
        self._exempt_prefixes: tuple[str, ...] = ()

    @property
    def middleware(self) -> APIKeyMiddleware:
        """An ``APIKeyMiddleware`` sharing the app's runtime (set once the app is built)."""
        if self._middleware is None:
            raise RuntimeError("KeystilePlugin: the app using this plugin is not built yet")
        return self._middleware

    def stats(self) -> KeystileStats:
        """The counters of the app's runtime, the same as ``scope["keystile"].stats()``."""
        return self.middleware.stats()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        options = dict(self.options)
        exempt = list(options.get("exempt_paths", ()))
        openapi = app_config.openapi_config
        if openapi is not None and self.exempt_docs:
            docs = (openapi.path or "/schema").rstrip("/")
            exempt += [docs, f"{docs}/*"]
        options["exempt_paths"] = exempt
        self._exempt_exact = frozenset(p for p in exempt if not p.endswith("*"))
        self._exempt_prefixes = tuple(p[:-1] for p in exempt if p.endswith("*"))

        # Same options, same runtime: this handle stops what the per-route instances use.
        self._middleware = APIKeyMiddleware(_unreachable, **options)
        # Litestar types ASGI apps with its own TypedDicts; the middleware speaks Starlette's.
        factory: Any = APIKeyMiddleware
        app_config.middleware.insert(0, DefineMiddleware(factory, **options))
        app_config.on_shutdown.append(self._shutdown)

        if openapi is not None:
            components = openapi.components
            existing = list(components) if isinstance(components, list) else [components]
            schemes = security_components(
                header_name=options.get("header_name", DEFAULT_HEADER_NAME),
                bearer_scheme_name=self.bearer_scheme_name,
                header_scheme_name=self.header_scheme_name,
            )
            # A copy, as Litestar's own security backends do: the caller's config may be
            # shared by other apps. (``dataclasses.replace`` would re-run its deprecations.)
            openapi = copy(openapi)
            openapi.components = [*existing, schemes]
            app_config.openapi_config = openapi
        return app_config

    def receive_route(self, route: BaseRoute) -> None:
        """List the schemes on the operations of a protected path (not on exempt ones).

        Litestar registers a copy of each handler per app, so this changes only the
        handlers of the app being built.
        """
        if not isinstance(route, HTTPRoute) or self._is_exempt(route.path):
            return
        for handler in route.route_handlers:
            security = list(handler.security or ())
            added = [r for r in self._requirements if r not in security]
            if added:
                handler.security = [*security, *added]

    def _is_exempt(self, path: str) -> bool:
        return path in self._exempt_exact or path.startswith(self._exempt_prefixes)

    async def _shutdown(self) -> None:
        await self.middleware.aclose()


def _middleware(connection: ASGIConnection[Any, Any, Any, Any]) -> APIKeyMiddleware:
    middleware = connection.scope.get("keystile")
    if not isinstance(middleware, APIKeyMiddleware):
        # A 500 beats a silent 401 on every request: the app is misassembled, not the client.
        raise RuntimeError(
            "keystile.litestar guards read the key APIKeyMiddleware verified, but the "
            "middleware is not in front of this route: add KeystilePlugin(...) or "
            "DefineMiddleware(APIKeyMiddleware, ...)"
        )
    return middleware


def _challenge_headers(exc: AuthenticationError, realm: str) -> dict[str, str]:
    headers = {"Cache-Control": "no-store"}
    challenge = www_authenticate(exc, realm)
    if challenge is not None:
        headers["WWW-Authenticate"] = challenge
    return headers


def require_scopes(*scopes: str) -> Guard:
    """A Litestar guard: the verified key must hold every one of ``scopes``.

    ``@get("/items", guards=[require_scopes("items:read")])``. A request without a key
    (``required=False``, or an exempt path) gets 401; a key missing a scope gets 403
    ``insufficient_scope`` with the RFC 6750 challenge, its body in Litestar's own shape
    (``detail``, and ``extra`` naming the required and missing scopes). "authenticated"
    is held by every key, as in ``request.auth.scopes``.
    """
    if not scopes:
        raise ValueError("require_scopes needs at least one scope")
    required = tuple(dict.fromkeys(scopes))

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        middleware = _middleware(connection)
        user = connection.scope.get("user")
        realm = middleware.realm
        if not isinstance(user, APIKeyUser):
            missing_key = MissingCredentials()
            middleware.verifier.counters.rejects[missing_key.reason] += 1
            raise NotAuthorizedException(
                detail=missing_key.description,
                headers=_challenge_headers(missing_key, realm),
                extra={"error": error_code(missing_key)},
            )
        missing = tuple(scope for scope in required if not user.has_scopes(scope))
        if missing:
            refusal = InsufficientScope(required, missing)
            middleware.verifier.counters.rejects[refusal.reason] += 1
            raise PermissionDeniedException(
                detail=refusal.description,
                headers=_challenge_headers(refusal, realm),
                extra={
                    "error": error_code(refusal),
                    "required_scopes": list(required),
                    "missing_scopes": list(missing),
                },
            )

    guard.__qualname__ = f"require_scopes({' '.join(required)})"
    return guard
