"""APIKeyMiddleware: ASGI dispatch, exempt paths, the request-path stages in order.

A pure ASGI middleware (not ``BaseHTTPMiddleware``). Built from one
:class:`~keystile.config.KeystileConfig`, it calls the stages of :mod:`keystile.stages`
once each (read the credential, verify, admit, record, call the app), with the compiled
hit path inline, and turns the one exception a stage raises into the RFC 6750 response
from :mod:`keystile.responses` (or the app's ``on_error``). It also owns the background
work (usage flushes, revocation listener, cache upkeep), started by the lifespan protocol
or, when a server runs without lifespan, lazily on the first request. The background work
belongs to the runtime, not to the lifespan call, so an app that ends the lifespan
protocol early does not stop it; a duty that fails is logged and restarted.

A WebSocket lives only while its key is valid: ``socket_guard`` checks the key at each
message and closes the socket once it is revoked, disabled or expired.

Without a valid key nothing the app produces reaches the client, with two exceptions:
``exempt_paths`` (matched on the path the app routes on, without the proxy's
``root_path``; keystile credentials are still stripped there) and CORS preflights, which
are forwarded only to a ``CORSMiddleware`` inside this one and only let out when the
answer carries the CORS preflight headers.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import DEFAULT_HEADER_NAME, DEFAULT_REALM, ErrorHandler, KeystileConfig
from .credentials import split_credential, without_credentials
from .errors import AuthenticationError, MissingCredentials
from .principal import APIKeyUser
from .responses import WEBSOCKET_POLICY_VIOLATION, error_code, error_response
from .runtime import KeystileRuntime
from .socket_guard import guard_websocket
from .stages import Headers, admit, admit_now, check_allowlist, read_credential, verify
from .stats import KeystileStats

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .config import KeystileOptions

__all__ = ["DEFAULT_HEADER_NAME", "DEFAULT_REALM", "APIKeyMiddleware", "ErrorHandler"]

logger = logging.getLogger("keystile")

#: The header a CORS preflight answer carries and no other response needs.
_PREFLIGHT_ANSWER_HEADER = b"access-control-allow-methods"


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``scope["path"]`` without the proxy's ``root_path``
    (ASGI servers include it in ``path``; Starlette's router strips it the same way)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if len(path) == len(root):
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


def is_preflight(scope: Scope) -> bool:
    """A CORS preflight: ``OPTIONS`` with both ``Origin`` and ``Access-Control-Request-Method``
    (an ``OPTIONS`` without ``Origin`` is not one, whatever else it carries)."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


def has_cors_responder(app: ASGIApp) -> bool:
    """Whether a Starlette ``CORSMiddleware`` sits inside ``app``, found by following the
    ``.app`` links middlewares keep (and a Starlette app's declared middleware)."""
    node: Any = app
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, CORSMiddleware):
            return True
        for declared in getattr(node, "user_middleware", None) or ():
            cls = getattr(declared, "cls", None)
            if isinstance(cls, type) and issubclass(cls, CORSMiddleware):
                return True
        node = getattr(node, "app", None)
    return False


class APIKeyMiddleware:
    """Require a valid API key on every HTTP and WebSocket request.

    ``app.add_middleware(APIKeyMiddleware, database_url="sqlite:///keystile.db")``

    The options are those of :class:`~keystile.config.KeystileConfig`, given as keywords
    or as ``config=`` (keywords given beside it replace its values). The database comes
    from ``store=`` (a ``KeyStore``), else ``database_url=``, else the
    ``KEYSTILE_DATABASE_URL`` environment variable, else ``sqlite:///keystile.db``: the
    same order as the ``keystile`` CLI, so both see the same keys. Every option is
    documented in ``docs/operations.md``.

    With ``required=False`` a request without a key goes on as anonymous, and so does a
    bearer token that is not keystile's (see ``key_prefixes``), untouched, for the app's
    own OAuth layer; a keystile key that is not valid is still refused.
    """

    #: ``app``, ``config`` and every option by name, for ``inspect.signature`` (set below).
    __signature__: ClassVar[inspect.Signature]

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: KeystileConfig | None = None,
        **options: Unpack[KeystileOptions],
    ) -> None:
        if config is None:
            config = KeystileConfig.from_options(**options)
        elif options:
            config = config.replace(**options)
        self.app = app
        self.config = config
        self.runtime = KeystileRuntime.for_config(config)
        self.store = self.runtime.store
        self.verifier = self.runtime.verifier
        self.recorder = self.runtime.recorder
        self.required = config.required
        self.header_name = config.header_name
        self.realm = config.realm
        self.strip_credentials = config.strip_credentials
        self.reap_every = config.reap_every
        self.on_error = config.on_error or self.default_on_error
        #: Read on every request, so kept here: one attribute load instead of two.
        self._header = config.header
        self._bearer_starts = config.bearer_starts
        #: The compiled hit path (``None`` on the pure-Python path): stages 1 and 2 in one
        #: call for a cached key; it leaves anything else to ``read_credential``.
        self._hit_request = self.verifier.cache.hit_request
        self._has_exemptions = bool(config.exempt_paths)
        self._cors_inside: bool | None = None
        #: Usage limits, checked after a key is verified (docs/operations.md, "Limits").
        self.limits = self.runtime.limits_for(config)
        self._limit_every_key = self.limits.limits_every_key
        #: Whether the compiled hit may count a use as it answers: not when every key is
        #: limited, since the use is recorded only once the limit admits the request.
        self._count = not self._limit_every_key
        #: ``cost=``, asked only for a limited key's request.
        self._cost = config.request_cost or None
        #: Whether the limits decide without an await (``memory://``): ``admit_now``.
        self._admit_now = not self.limits.is_async
        if config.metrics:
            # Read at scrape time from the runtime's counters: the hit path pays nothing.
            from .metrics import PrometheusMetrics

            metrics = config.metrics
            exporter = metrics if isinstance(metrics, PrometheusMetrics) else PrometheusMetrics()
            exporter.install(self.runtime)
        if config.webhooks:
            from .webhooks.delivery import WebhookDelivery

            hooks = config.webhooks
            sender = hooks if isinstance(hooks, WebhookDelivery) else WebhookDelivery()
            sender.install(self.runtime, self.limits)

    # -- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self.runtime.running:
            self.runtime.start()
        scope["keystile"] = self
        if self._has_exemptions and self._is_exempt(scope):
            await self._pass_exempt(scope, receive, send)
            return
        # Stages 1 and 2, read and verify: compiled for a cached key (the stages module
        # says why inline), else in Python.
        user: APIKeyUser
        without: Headers | None
        found = (
            self._hit_request(scope["headers"], self._header, self._bearer_starts, self._count)
            if self._hit_request is not None
            else None
        )
        if found is not None:
            user, auth_scopes, without, counted = found
        else:
            try:
                token, source, without = read_credential(scope["headers"], self.config)
                if token is not None:
                    entry = await verify(self.verifier, token, source)
            except AuthenticationError as exc:
                await self._deny(exc, scope, receive, send)
                return
            if token is None:
                scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
                await self.app(scope, receive, send)
                return
            user, auth_scopes, counted = entry.user, entry.auth_scopes, False
        scope["user"] = user
        scope["auth"] = AuthCredentials(auth_scopes)
        # Stages 3 and 4, admit and record: a use the compiled hit counted is of a key
        # without an IP allowlist or limits, admitted as it is; any other key pays these
        # checks, and a key with limits or an allowlist is admitted by them.
        if not counted:
            if user.limits is not None or self._limit_every_key or user.ip_allowlist is not None:
                try:
                    cost = self._cost.of(scope, route_path(scope)) if self._cost is not None else 1
                    if self._admit_now:
                        send = admit_now(user, scope, self.limits, send, cost)
                    else:
                        send = await admit(user, scope, self.limits, send, cost)
                except AuthenticationError as exc:
                    await self._deny(exc, scope, receive, send)
                    return
            self.recorder.touch(user.key_id, self.verifier.clock())
        # Stage 5, call the app.
        if self.strip_credentials and without is not None:
            scope["headers"] = without
        if kind == "websocket":
            receive, send = guard_websocket(self.verifier, user, receive, send)
        await self.app(scope, receive, send)

    def _is_exempt(self, scope: Scope) -> bool:
        """Whether the path the app routes on is an exact exempt path or starts with an
        exempt prefix (``config`` parsed ``exempt_paths`` into both)."""
        path, config = route_path(scope), self.config
        return path in config.exempt_exact or bool(
            config.exempt_prefixes and path.startswith(config.exempt_prefixes)
        )

    async def _pass_exempt(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A path that needs no key. A valid key sent there is still verified, so the route
        sees it (``OptionalKey``, ``request.user``); a key that is not valid, or cannot be
        checked now, is dropped and the request goes on anonymous (the refusal is counted).
        keystile credentials never reach the app (nor its access log); others stay."""
        scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
        headers, config = scope["headers"], self.config
        try:
            token, source, without = split_credential(headers, config.header, config.is_key)
        except AuthenticationError as exc:
            self.verifier.counters.rejects[exc.reason] += 1
            token, without = None, without_credentials(headers, config.header, config.is_key)
        if token is not None:
            try:
                entry = await verify(self.verifier, token, source)
                # An exempt path never refuses and never spends: from outside its IP
                # allowlist the key goes on unseen; its limits are not touched.
                check_allowlist(entry.user, scope)
            except AuthenticationError as exc:
                self.verifier.counters.rejects[exc.reason] += 1
            else:
                scope["user"] = entry.user
                scope["auth"] = AuthCredentials(entry.auth_scopes)
                self.recorder.touch(entry.key_id, self.verifier.clock())
                if scope["type"] == "websocket":
                    receive, send = guard_websocket(self.verifier, entry.user, receive, send)
        if self.strip_credentials and without is not None:
            scope["headers"] = without
        await self.app(scope, receive, send)

    async def _pass_preflight(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Forward a keyless CORS preflight to the CORS responder inside, if there is one,
        and let out only a CORS preflight answer; whether one went out."""
        if self._cors_inside is None:
            self._cors_inside = has_cors_responder(self.app)
        if not self._cors_inside:
            return False
        answered: bool | None = None

        async def send_preflight_answer(message: Message) -> None:
            nonlocal answered
            if answered is None and message["type"] == "http.response.start":
                names = (name.lower() for name, _ in message.get("headers", ()))
                answered = _PREFLIGHT_ANSWER_HEADER in names
            if answered:
                await send(message)

        scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
        try:
            await self.app(scope, receive, send_preflight_answer)
        except Exception:
            if answered:
                raise
            logger.warning("keystile: the app failed on a CORS preflight; refusing it")
        return bool(answered)

    async def _deny(
        self, exc: AuthenticationError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The one place a refusal becomes a response: a WebSocket close, else the
        ``on_error`` response. A keyless CORS preflight is first offered to the CORS
        responder inside; only when none answers is it refused."""
        if (
            isinstance(exc, MissingCredentials)
            and self.config.allow_preflight
            and is_preflight(scope)
            and await self._pass_preflight(scope, receive, send)
        ):
            return
        self.verifier.counters.rejects[exc.reason] += 1
        if scope["type"] == "websocket":
            close = {"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION}
            await send({**close, "reason": error_code(exc)})
            return
        response = self.on_error(HTTPConnection(scope), exc)
        await response(scope, receive, send)

    def default_on_error(self, conn: HTTPConnection, exc: AuthenticationError) -> Response:
        return error_response(exc, realm=self.realm, header_name=self.header_name)

    # -- operator API ----------------------------------------------------------------

    def stats(self) -> KeystileStats:
        """A snapshot of the counters (see ``docs/operations.md`` for how to read them)."""
        return self.runtime.stats()

    def evict(self, key_id: str) -> None:
        """Drop a key from this process's cache at once."""
        self.verifier.on_change(key_id)

    async def aclose(self) -> None:
        """Stop background work, write pending ``last_used_at`` and close the store.

        Called by the lifespan shutdown; call it yourself when running without lifespan.
        Middlewares of the same configuration share this work: it starts again with the
        next request any of them serves.
        """
        await self.runtime.stop()

    # -- background work ---------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        stopped = False

        async def wrapped_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.runtime.start()
            return message

        async def wrapped_send(message: Message) -> None:
            nonlocal stopped
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                stopped = True
                await self.runtime.stop()
            await send(message)

        await self.app(scope, wrapped_receive, wrapped_send)
        if not stopped and self.runtime.is_background_alive:
            logger.warning(
                "keystile: the application ended the lifespan protocol before shutdown; "
                "background work (last_used_at writes, revocation listener, cache upkeep) "
                "keeps running. Call APIKeyMiddleware.aclose() at shutdown to write the "
                "last pending uses."
            )


APIKeyMiddleware.__signature__ = inspect.Signature(
    [
        inspect.Parameter("app", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None),
        *(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
            for f in dataclasses.fields(KeystileConfig)
            if f.init
        ),
    ]
)
