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
bearer and API-key header schemes in ``components.securitySchemes``, those schemes as
alternatives on every operation that takes a key, and every refusal such an operation
can meet, with its body and headers (:mod:`keystile.openapi`).

Refusals of the :func:`require_scopes` guard are :class:`KeystileRefusal`; the plugin
answers them with the middleware's own status, headers and body
(:func:`keystile.responses.error_body`), so a client meets one body whoever refused.

``request.user`` is the verified :class:`~keystile.APIKeyUser` and ``request.auth`` its
Starlette ``AuthCredentials`` (``scopes == ["authenticated", *key scopes]``), so guards
and handlers read the key the middleware already verified: nothing verifies it twice.

Litestar is an optional extra: ``pip install "keystile[litestar]"``.
"""

from __future__ import annotations

from copy import copy
from typing import Any

from . import adapters

try:
    from litestar.config.app import AppConfig
    from litestar.connection import ASGIConnection, Request
    from litestar.enums import MediaType
    from litestar.exceptions import HTTPException
    from litestar.handlers.base import BaseRouteHandler
    from litestar.handlers.http_handlers import HTTPRouteHandler
    from litestar.middleware import DefineMiddleware
    from litestar.openapi.spec import Components, Operation, SecurityRequirement, SecurityScheme
    from litestar.plugins.base import InitPlugin, ReceiveRoutePlugin
    from litestar.response import Response
    from litestar.routes import BaseRoute, HTTPRoute
    from litestar.types import Guard
except ImportError as exc:  # pragma: no cover - exercised by a test that hides litestar
    raise adapters.missing_extra("litestar", "Litestar") from exc

from starlette.types import Receive, Scope, Send

from .config import DEFAULT_HEADER_NAME
from .errors import AuthenticationError
from .middleware import APIKeyMiddleware
from .openapi import (
    DEFAULT_BEARER_SCHEME_NAME,
    DEFAULT_HEADER_SCHEME_NAME,
    document_refusals,
    error_schema,
    refusals,
)
from .stats import KeystileStats

#: Set on every keystile guard: the scopes it requires.
_MARK = "__keystile_scopes__"


def security_components(
    *,
    header_name: str = DEFAULT_HEADER_NAME,
    bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
    header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
) -> Components:
    """The two ways to send a key, as OpenAPI security schemes."""
    schemes = adapters.security_schemes(
        header_name, bearer_scheme_name=bearer_scheme_name, header_scheme_name=header_scheme_name
    )
    return Components(
        security_schemes={
            name: SecurityScheme(
                type=scheme["type"],
                scheme=scheme.get("scheme"),
                name=scheme.get("name"),
                security_scheme_in=scheme.get("in"),
                description=scheme["description"],
            )
            for name, scheme in schemes.items()
        }
    )


def security_requirements(
    *,
    bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
    header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
    scopes: list[str] | None = None,
) -> list[SecurityRequirement]:
    """Either scheme satisfies an operation: two requirements, i.e. alternatives, each
    with the ``scopes`` the operation requires."""
    return [{bearer_scheme_name: list(scopes or ())}, {header_scheme_name: list(scopes or ())}]


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
      every documented operation whose path is not exempt or whose keystile guard needs
      a key, with the scopes the guards require;
    * documents on those operations every refusal they can meet (400, 401, 403, 429,
      503; :mod:`keystile.openapi`) and answers the guards' refusals with the
      middleware's body (:class:`KeystileRefusal`);
    * stops the shared runtime from ``on_shutdown``: background work ends and the pending
      ``last_used_at`` writes are flushed, which route middleware alone never does.

    ``plugin.middleware`` is an ``APIKeyMiddleware`` of the same configuration (it shares
    the runtime of the per-route instances): ``plugin.middleware.stats()``, ``evict()``.
    """

    __slots__ = (
        "_middleware",
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
        self.options, self.exempt_docs = options, exempt_docs
        self.bearer_scheme_name, self.header_scheme_name = bearer_scheme_name, header_scheme_name
        self._middleware: APIKeyMiddleware | None = None

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
        openapi = app_config.openapi_config
        docs: tuple[str, ...] = ()
        if openapi is not None and self.exempt_docs:
            path = (openapi.path or "/schema").rstrip("/")
            docs = (path, f"{path}/*")
        config = adapters.adapter_config(self.options, exempt=docs)

        # Same config, same runtime: this handle stops what the per-route instances use.
        self._middleware = APIKeyMiddleware(_unreachable, config=config)
        # Litestar types ASGI apps with its own TypedDicts; the middleware speaks Starlette's.
        factory: Any = APIKeyMiddleware
        app_config.middleware.insert(0, DefineMiddleware(factory, config=config))
        app_config.on_shutdown.append(self._shutdown)
        app_config.exception_handlers.setdefault(KeystileRefusal, _answer)

        if openapi is not None:
            components = openapi.components
            existing = list(components) if isinstance(components, list) else [components]
            schemes = security_components(
                header_name=config.header_name,
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
        """Document keystile on the route's operations: the schemes, and the refusals.

        Litestar registers a copy of each handler per app, so this changes only the
        handlers of the app being built.
        """
        if not isinstance(route, HTTPRoute):
            return
        exempt = adapters.exempt_route(route.path_format, self.middleware.config)
        for handler in route.route_handlers:
            self._document(handler, exempt)

    def _document(self, handler: HTTPRouteHandler, exempt: bool) -> None:
        scopes = _guard_scopes(handler)
        config = self.middleware.config
        required = config.required
        from_middleware, from_app = refusals(
            middleware=not exempt,
            required=required,
            key_needed=scopes is not None,
            scopes=scopes or (),
        )
        if not from_middleware and not from_app:
            return
        security = list(handler.security or ())
        wanted = security_requirements(
            bearer_scheme_name=self.bearer_scheme_name,
            header_scheme_name=self.header_scheme_name,
            scopes=scopes,
        )
        if scopes is None and not required:
            wanted.append({})
        handler.security = [*security, *(r for r in wanted if r not in security)]
        handler.operation_class = _documenting(
            handler.operation_class,
            from_middleware,
            from_app,
            middleware_known=config.on_error is None,
            rate_limit_headers=config.rate_limit_headers,
        )

    async def _shutdown(self) -> None:
        await self.middleware.aclose()


def _middleware(connection: ASGIConnection[Any, Any, Any, Any]) -> APIKeyMiddleware:
    return adapters.find_middleware(
        connection.scope,
        reader="keystile.litestar guards read",
        place="this route: add KeystilePlugin(...) or DefineMiddleware(APIKeyMiddleware, ...)",
    )


class KeystileRefusal(HTTPException):
    """A refusal of a keystile guard: the middleware's status and headers, and its body
    in ``body``. :class:`KeystilePlugin` answers it with that body as is; without the
    plugin, Litestar's default handler sends its own shape, the body under ``extra``."""

    def __init__(self, refusal: AuthenticationError, middleware: APIKeyMiddleware) -> None:
        answer = adapters.Refusal.of(refusal, middleware)
        self.auth_error = refusal
        self.body = answer.body
        super().__init__(
            detail=refusal.description,
            status_code=answer.status_code,
            headers=answer.headers,
            extra=answer.body,
        )


def _answer(request: Request[Any, Any, Any], exc: KeystileRefusal) -> Response[Any]:
    return Response(
        exc.body, status_code=exc.status_code, headers=exc.headers, media_type=MediaType.JSON
    )


def _guard_scopes(handler: HTTPRouteHandler) -> list[str] | None:
    """The scopes the keystile guards of ``handler`` (and of its routers) require, or
    ``None`` without a keystile guard."""
    scopes: list[str] | None = None
    for layer in handler.ownership_layers:
        for guard in getattr(layer, "guards", None) or ():
            required = getattr(guard, _MARK, None)
            if required is not None:
                scopes = [*(scopes or ()), *(s for s in required if s not in (scopes or ()))]
    return scopes


def _error_body(codes: list[str]) -> dict[str, Any]:
    """The error body's schema, inline (Litestar builds ``components.schemas`` from the
    handlers' types only), narrowed to ``codes``."""
    schema = error_schema()
    schema["properties"]["error"] = {**schema["properties"]["error"], "enum": codes}
    return schema


def _documenting(
    base: type[Operation],
    from_middleware: list[type[AuthenticationError]],
    from_app: list[type[AuthenticationError]],
    **options: bool,
) -> type[Operation]:
    """``base`` (the handler's operation class), adding keystile's refusals to the
    operation's responses when the document is rendered, once Litestar has settled the
    references in the responses it generated."""

    class KeystileOperation(base):  # type: ignore[misc,valid-type]
        def to_schema(self) -> dict[str, Any]:
            schema: dict[str, Any] = super().to_schema()
            responses = schema.setdefault("responses", {})
            document_refusals(
                responses, from_middleware, from_app, body_schema=_error_body, **options
            )
            return schema

    return KeystileOperation


def require_scopes(*scopes: str) -> Guard:
    """A Litestar guard: the verified key must hold every one of ``scopes``.

    ``@get("/items", guards=[require_scopes("items:read")])``. A request without a key
    (``required=False``, or an exempt path) gets 401; a key missing a scope gets 403
    ``insufficient_scope`` with the RFC 6750 challenge: the middleware's responses,
    raised as :class:`KeystileRefusal`. "authenticated" is held by every key, as in
    ``request.auth.scopes``.
    """
    required = adapters.required_scopes(scopes)

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        middleware = _middleware(connection)
        refusal = adapters.scope_refusal(connection.scope.get("user"), required)
        if refusal is not None:
            adapters.count_refusal(middleware, refusal)
            raise KeystileRefusal(refusal, middleware)

    guard.__qualname__ = f"require_scopes({' '.join(required)})"
    setattr(guard, _MARK, required)
    return guard


__all__ = [
    "DEFAULT_BEARER_SCHEME_NAME",
    "DEFAULT_HEADER_SCHEME_NAME",
    "KeystilePlugin",
    "KeystileRefusal",
    "require_scopes",
    "security_components",
    "security_requirements",
]
