"""APIKeyMiddleware: ASGI in, verifier, ASGI out.

A pure ASGI middleware (not ``BaseHTTPMiddleware``). It reads the credential, asks the
verifier, and either sets Starlette's ``scope["user"]``/``scope["auth"]`` and calls the
app, or answers with the RFC 6750 response from :mod:`keystile.responses`. It also owns
the background work (usage flushes, revocation listener, cache upkeep), started by the
lifespan protocol or, when a server runs without lifespan, lazily on the first request.
The background work belongs to the middleware, not to the lifespan call, so an app that
ends the lifespan protocol early does not stop it; a duty that fails is logged and
restarted.

A WebSocket lives only while its key is valid: ``socket_guard`` checks the key at each
message and closes the socket once it is revoked, disabled or expired.

Without a valid key nothing the app produces reaches the client, with two exceptions:
``exempt_paths`` (matched on the path the app routes on, without the proxy's
``root_path``; keystile credentials are still stripped there) and CORS preflights, which
are forwarded only to a ``CORSMiddleware`` inside this one and only let out when the
answer carries the CORS preflight headers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .cache import CachedKey
from .config import resolve_database_url
from .credentials import check_single_token, split_credential, without_credentials
from .errors import AuthenticationError, IPNotAllowed, MissingCredentials, ServiceUnavailable
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from .limits import DEFAULT_RATE_LIMIT_STORAGE, LimitEnforcer, OnError, send_with_headers
from .principal import APIKeyUser
from .responses import WEBSOCKET_POLICY_VIOLATION, error_code, error_response
from .runtime import KeystileRuntime, configuration_key
from .socket_guard import guard_websocket
from .stats import KeystileStats
from .stores import store_from_url
from .stores.protocol import KeyStore
from .tokens import DEFAULT_PREFIX, key_matcher
from .usage import DEFAULT_FLUSH_INTERVAL, DEFAULT_FLUSH_MAX, UsageRecorder
from .verifier import (
    DEFAULT_ARGON2_CONCURRENCY,
    DEFAULT_CACHE_IDLE,
    DEFAULT_CACHE_MAX_SIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_PENDING_VERIFICATIONS,
    DEFAULT_NEGATIVE_MAX_SIZE,
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_PER_KEY_PENDING,
    DEFAULT_STALE_IF_ERROR,
    Verifier,
)

if TYPE_CHECKING:
    from .metrics import PrometheusMetrics

__all__ = ["APIKeyMiddleware", "ErrorHandler"]

logger = logging.getLogger("keystile")

ErrorHandler = Callable[[HTTPConnection, AuthenticationError], Response]

DEFAULT_HEADER_NAME = "X-API-Key"
DEFAULT_REALM = "api"
#: With ``reap_every``: keys unused for longer than this are revoked.
DEFAULT_REAP_UNUSED_FOR = timedelta(days=90)
#: Per-key usage rows older than this are deleted in the background (``None``: kept).
DEFAULT_USAGE_RETENTION = timedelta(days=90)
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

    The database comes from ``store=`` (a ``KeyStore``), else ``database_url=``, else the
    ``KEYSTILE_DATABASE_URL`` environment variable, else ``sqlite:///keystile.db``: the
    same order as the ``keystile`` CLI, so both see the same keys. Every option is
    documented in ``docs/operations.md``.

    With ``required=False`` a request without a key goes on as anonymous, and so does a
    bearer token that is not keystile's (see ``key_prefixes``), untouched, for the app's
    own OAuth layer; a keystile key that is not valid is still refused.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        database_url: str | None = None,
        store: KeyStore | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_idle: float = DEFAULT_CACHE_IDLE,
        cache_max_size: int = DEFAULT_CACHE_MAX_SIZE,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        negative_max_size: int = DEFAULT_NEGATIVE_MAX_SIZE,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        flush_max: int = DEFAULT_FLUSH_MAX,
        argon2: Argon2Parameters = DEFAULT_PARAMETERS,
        argon2_concurrency: int = DEFAULT_ARGON2_CONCURRENCY,
        max_pending_verifications: int = DEFAULT_MAX_PENDING_VERIFICATIONS,
        per_key_pending: int = DEFAULT_PER_KEY_PENDING,
        exempt_paths: Iterable[str] = (),
        required: bool = True,
        header_name: str = DEFAULT_HEADER_NAME,
        realm: str = DEFAULT_REALM,
        key_prefixes: Iterable[str] = (DEFAULT_PREFIX,),
        allow_preflight: bool = True,
        strip_credentials: bool = True,
        on_error: ErrorHandler | None = None,
        reap_every: float | None = None,
        reap_unused_for: timedelta = DEFAULT_REAP_UNUSED_FOR,
        rate_limit_storage: str = DEFAULT_RATE_LIMIT_STORAGE,
        default_rate_limit: str | None = None,
        rate_limit_on_error: OnError = "allow",
        rate_limit_headers: bool = False,
        usage_retention: timedelta | None = DEFAULT_USAGE_RETENTION,
        metrics: bool | PrometheusMetrics = False,
    ) -> None:
        self.app = app
        runtime_options: dict[str, Any] = {
            "store": store,
            "database_url": None if store is not None else resolve_database_url(database_url),
            "cache_ttl": cache_ttl,
            "cache_idle": cache_idle,
            "cache_max_size": cache_max_size,
            "negative_ttl": negative_ttl,
            "negative_max_size": negative_max_size,
            "stale_if_error": stale_if_error,
            "flush_interval": flush_interval,
            "flush_max": flush_max,
            "argon2": argon2,
            "argon2_concurrency": argon2_concurrency,
            "max_pending_verifications": max_pending_verifications,
            "per_key_pending": per_key_pending,
            "reap_every": reap_every,
            "reap_unused_for": reap_unused_for,
            "usage_retention": usage_retention,
        }
        self.runtime = KeystileRuntime.shared(
            configuration_key(runtime_options), lambda: _build_runtime(**runtime_options)
        )
        self.store = self.runtime.store
        self.verifier = self.runtime.verifier
        self.recorder = self.runtime.recorder
        self.required = required
        self.header_name = header_name
        self.realm = realm
        self.allow_preflight = allow_preflight
        self.strip_credentials = strip_credentials
        self.on_error = on_error or self.default_on_error
        self.reap_every = reap_every
        self.reap_unused_for = reap_unused_for
        self._header = header_name.lower().encode("latin-1")
        key_prefixes = tuple(key_prefixes)
        self._is_key = key_matcher(key_prefixes)
        #: With required=False a bearer token that is not keystile's is not a credential.
        self._bearer_filter = None if required else self._is_key
        #: The compiled hit path (``None`` on the pure-Python path), and the bearer tokens
        #: it may take as keys with required=False; it leaves any other token to Python.
        self._hit_request = self.verifier.hit_request if self.verifier.cache.compiled else None
        self._bearer_starts = None if required else tuple(f"{p}_".encode() for p in key_prefixes)
        paths = list(exempt_paths)
        self._exempt_exact = frozenset(p for p in paths if not p.endswith("*"))
        self._exempt_prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        self._has_exemptions = bool(paths)
        self._cors_inside: bool | None = None
        #: Usage limits, checked after a key is verified (docs/operations.md, "Limits").
        self.limits = LimitEnforcer.shared(
            self.recorder,
            self.verifier.counters,
            storage=rate_limit_storage,
            default_rate_limit=default_rate_limit,
            on_error=rate_limit_on_error,
            headers=rate_limit_headers,
        )
        self._limit_every_key = self.limits.limits_every_key
        if metrics:
            # Read at scrape time from the runtime's counters: the hit path pays nothing.
            from .metrics import PrometheusMetrics

            exporter = metrics if isinstance(metrics, PrometheusMetrics) else PrometheusMetrics()
            exporter.install(self.runtime)

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
        found = (
            self._hit_request(scope["headers"], self._header, self._bearer_starts)
            if self._hit_request is not None
            else None
        )
        entry: CachedKey | None
        without: list[tuple[bytes, bytes]] | None
        if found is not None:
            entry, without = found
        else:
            try:
                token, source, without = split_credential(
                    scope["headers"], self._header, self._bearer_filter
                )
            except AuthenticationError as exc:
                await self._deny(exc, scope, receive, send)
                return
            if token is None:
                if not self.required:
                    scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
                    await self.app(scope, receive, send)
                elif self.allow_preflight and is_preflight(scope):
                    await self._pass_preflight(scope, receive, send)
                else:
                    await self._deny(MissingCredentials(), scope, receive, send)
                return
            entry = self.verifier.hit(token)
            if entry is None:
                try:
                    check_single_token(token, source)
                    entry = await self.verifier.verify(token)
                except AuthenticationError as exc:
                    exc.source = source
                    await self._deny(exc, scope, receive, send)
                    return
                except Exception:
                    logger.exception("keystile: unexpected error while verifying a key; refusing")
                    error = ServiceUnavailable("internal_error", source=source)
                    await self._deny(error, scope, receive, send)
                    return
        user = scope["user"] = entry.user
        scope["auth"] = AuthCredentials(entry.auth_scopes)
        # A key without an IP allowlist or limits pays these attribute checks alone.
        limited = user.limits is not None or self._limit_every_key
        if limited or user.ip_allowlist is not None:
            refusal = await self._refusal(user, scope)
            if refusal is not None:
                await self._deny(refusal, scope, receive, send)
                return
            if limited and self.limits.headers:
                send = send_with_headers(send, self.limits.success_headers(user))
        self.recorder.touch(user.key_id, self.verifier.clock())
        if self.strip_credentials and without is not None:
            scope["headers"] = without
        if kind == "websocket":
            receive, send = guard_websocket(self.verifier, entry, receive, send)
        await self.app(scope, receive, send)

    def _is_exempt(self, scope: Scope) -> bool:
        path = route_path(scope)
        return path in self._exempt_exact or bool(
            self._exempt_prefixes and path.startswith(self._exempt_prefixes)
        )

    async def _pass_exempt(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A path that needs no key. A valid key sent there is still verified, so the route
        sees it (``OptionalKey``, ``request.user``); a key that is not valid, or cannot be
        checked now, is dropped and the request goes on anonymous (the refusal is counted).
        keystile credentials never reach the app (nor its access log); others stay."""
        scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
        try:
            token, source, without = split_credential(scope["headers"], self._header, self._is_key)
        except AuthenticationError as exc:
            self.verifier.counters.rejects[exc.reason] += 1
            token, without = None, without_credentials(scope["headers"], self._header, self._is_key)
        if token is not None:
            entry = self.verifier.hit(token)
            if entry is None:
                try:
                    check_single_token(token, source)
                    entry = await self.verifier.verify(token)
                except AuthenticationError as exc:
                    self.verifier.counters.rejects[exc.reason] += 1
                except Exception:
                    logger.exception("keystile: unexpected error while verifying a key")
            if entry is not None:
                user = entry.user
                refusal = await self._refusal(user, scope)
                if refusal is not None:
                    # An exempt path never refuses: over its limits, or from outside its
                    # IP allowlist, the key goes on unseen.
                    self.verifier.counters.rejects[refusal.reason] += 1
                else:
                    scope["user"] = user
                    scope["auth"] = AuthCredentials(entry.auth_scopes)
                    self.recorder.touch(user.key_id, self.verifier.clock())
                    if scope["type"] == "websocket":
                        receive, send = guard_websocket(self.verifier, entry, receive, send)
        if self.strip_credentials and without is not None:
            scope["headers"] = without
        await self.app(scope, receive, send)

    async def _refusal(self, user: APIKeyUser, scope: Scope) -> AuthenticationError | None:
        """What refuses a verified key here, if anything: a client outside the key's IP
        allowlist (parsed when the key was cached; ``scope["client"]`` is what the server
        says, behind a proxy its proxy-header handling, never ``X-Forwarded-For``), then
        the key's rate limit or quota."""
        allowlist = user.ip_allowlist
        if allowlist is not None and not allowlist.allows(scope.get("client")):
            return IPNotAllowed()
        if user.limits is not None or self._limit_every_key:
            limits = self.limits
            return await limits.acheck(user) if limits.is_async else limits.check(user)
        return None

    async def _pass_preflight(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward a keyless CORS preflight to the CORS responder inside, if there is one,
        and let out only a CORS preflight answer; anything else becomes the 401."""
        if self._cors_inside is None:
            self._cors_inside = has_cors_responder(self.app)
        if not self._cors_inside:
            await self._deny(MissingCredentials(), scope, receive, send)
            return
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
        if not answered:
            await self._deny(MissingCredentials(), scope, receive, send)

    async def _deny(
        self, exc: AuthenticationError, scope: Scope, receive: Receive, send: Send
    ) -> None:
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


def _build_runtime(
    *,
    store: KeyStore | None,
    database_url: str | None,
    argon2: Argon2Parameters,
    flush_interval: float,
    flush_max: int,
    reap_every: float | None,
    reap_unused_for: timedelta,
    usage_retention: timedelta | None,
    **verifier_options: Any,
) -> KeystileRuntime:
    owns_store = store is None
    if store is None:
        assert database_url is not None
        store = store_from_url(database_url)
    verifier = Verifier(store, hasher=SecretHasher(argon2), **verifier_options)
    recorder = UsageRecorder(store, flush_interval=flush_interval, flush_max=flush_max)
    return KeystileRuntime(
        store,
        verifier,
        recorder,
        owns_store=owns_store,
        reap_every=reap_every,
        reap_unused_for=reap_unused_for,
        usage_retention=usage_retention,
    )
