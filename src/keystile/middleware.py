"""APIKeyMiddleware: ASGI in, verifier, ASGI out.

A pure ASGI middleware (not ``BaseHTTPMiddleware``). It reads the credential, asks the
verifier, and either sets Starlette's ``scope["user"]``/``scope["auth"]`` and calls the
app, or answers with the RFC 6750 response from :mod:`keystile.responses`. It also owns
the background work (usage flushes, revocation listener, cache upkeep), started by the
lifespan protocol or, when a server runs without lifespan, lazily on the first request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import anyio
from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import resolve_database_url
from .credentials import check_single_token, split_credential
from .errors import AuthenticationError, MissingCredentials, ServiceUnavailable, StoreError
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from .responses import WEBSOCKET_POLICY_VIOLATION, error_code, error_response
from .stats import KeystileStats
from .stores import store_from_url
from .stores.base import KeyStore, utcnow
from .usage import DEFAULT_FLUSH_INTERVAL, DEFAULT_FLUSH_MAX, UsageRecorder
from .verifier import (
    DEFAULT_ARGON2_CONCURRENCY,
    DEFAULT_CACHE_IDLE,
    DEFAULT_CACHE_MAX_SIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_PENDING_VERIFICATIONS,
    DEFAULT_NEGATIVE_MAX_SIZE,
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_STALE_IF_ERROR,
    Verifier,
)

__all__ = ["APIKeyMiddleware", "ErrorHandler"]

logger = logging.getLogger("keystile")

ErrorHandler = Callable[[HTTPConnection, AuthenticationError], Response]

DEFAULT_HEADER_NAME = "X-API-Key"
DEFAULT_REALM = "api"
#: With ``reap_every``: keys unused for longer than this are revoked.
DEFAULT_REAP_UNUSED_FOR = timedelta(days=90)
#: Seconds the final flush and store close may take at shutdown.
SHUTDOWN_TIMEOUT = 10.0


class APIKeyMiddleware:
    """Require a valid API key on every HTTP and WebSocket request.

    ``app.add_middleware(APIKeyMiddleware, database_url="sqlite:///keys.db")``

    The database comes from ``store=`` (a ``KeyStore``), else ``database_url=``, else the
    ``KEYSTILE_DATABASE_URL`` environment variable, else ``sqlite:///keystile.db``: the
    same order as the ``keystile`` CLI, so both see the same keys. Every option is
    documented in ``docs/operations.md``.
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
        exempt_paths: Iterable[str] = (),
        required: bool = True,
        header_name: str = DEFAULT_HEADER_NAME,
        realm: str = DEFAULT_REALM,
        allow_preflight: bool = True,
        strip_credentials: bool = True,
        on_error: ErrorHandler | None = None,
        reap_every: float | None = None,
        reap_unused_for: timedelta = DEFAULT_REAP_UNUSED_FOR,
    ) -> None:
        self.app = app
        self._owns_store = store is None
        if store is None:
            store = store_from_url(resolve_database_url(database_url))
        self.store = store
        self.verifier = Verifier(
            self.store,
            hasher=SecretHasher(argon2),
            cache_ttl=cache_ttl,
            cache_idle=cache_idle,
            cache_max_size=cache_max_size,
            negative_ttl=negative_ttl,
            negative_max_size=negative_max_size,
            stale_if_error=stale_if_error,
            argon2_concurrency=argon2_concurrency,
            max_pending_verifications=max_pending_verifications,
        )
        self.recorder = UsageRecorder(
            self.store, flush_interval=flush_interval, flush_max=flush_max
        )
        self.required = required
        self.header_name = header_name
        self.realm = realm
        self.allow_preflight = allow_preflight
        self.strip_credentials = strip_credentials
        self.on_error = on_error or self.default_on_error
        self.reap_every = reap_every
        self.reap_unused_for = reap_unused_for
        self._header = header_name.lower().encode("latin-1")
        paths = list(exempt_paths)
        self._exempt_exact = frozenset(p for p in paths if not p.endswith("*"))
        self._exempt_prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        self._has_exemptions = bool(paths)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: anyio.CancelScope | None = None
        self._background_done: anyio.Event | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._loop is not asyncio.get_running_loop():
            self._start_lazily()
        scope["keystile"] = self
        if (self._has_exemptions or scope.get("method") == "OPTIONS") and self._is_exempt(scope):
            scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
            await self.app(scope, receive, send)
            return
        try:
            token, source, without_credentials = split_credential(scope["headers"], self._header)
            if token is None and self.required:
                raise MissingCredentials()
        except AuthenticationError as exc:
            await self._deny(exc, scope, receive, send)
            return
        if token is None:
            scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
            await self.app(scope, receive, send)
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
        scope["user"] = entry.user
        scope["auth"] = entry.auth
        self.recorder.touch(entry.user.key_id, self.verifier.clock())
        if self.strip_credentials and without_credentials is not None:
            scope["headers"] = without_credentials
        await self.app(scope, receive, send)

    def _is_exempt(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path in self._exempt_exact or (
            self._exempt_prefixes and path.startswith(self._exempt_prefixes)
        ):
            return True
        if self.allow_preflight and scope.get("method") == "OPTIONS":
            return any(name == b"access-control-request-method" for name, _ in scope["headers"])
        return False

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
        c = self.verifier.counters
        lookups = c.cache_hits + c.cache_misses
        return KeystileStats(
            cache_hits=c.cache_hits,
            cache_misses=c.cache_misses,
            hit_ratio=c.cache_hits / lookups if lookups else 0.0,
            negative_hits=c.negative_hits,
            argon2_verifications=c.argon2_verifications,
            argon2_seconds=c.argon2_seconds,
            argon2_in_flight=self.verifier.argon2_in_flight,
            cache_size=len(self.verifier.cache),
            cache_max_size=self.verifier.cache.max_size,
            state_refreshes=c.state_refreshes,
            stale_served=c.stale_served,
            revocation_events=c.revocation_events,
            cache_resets=c.cache_resets,
            rejects=dict(c.rejects),
            pending_touches=self.recorder.pending,
            flushes=self.recorder.flushes,
            flush_failures=self.recorder.flush_failures,
            touches_written=self.recorder.touches_written,
        )

    def evict(self, key_id: str) -> None:
        """Drop a key from this process's cache at once."""
        self.verifier.on_change(key_id)

    async def aclose(self) -> None:
        """Stop background work, write pending ``last_used_at`` and close the store.

        Called by the lifespan shutdown; call it yourself when running without lifespan.
        """
        await self._stop()

    # -- background work ---------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def wrapped_receive() -> Message:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await tg.start(self._run_background)
                return message

            async def wrapped_send(message: Message) -> None:
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    await self._stop()
                await send(message)

            try:
                await self.app(scope, wrapped_receive, wrapped_send)
            finally:
                if self._background is not None:
                    self._background.cancel()

    def _start_lazily(self) -> None:
        # Background work of another event loop (a test client's previous loop) died
        # with that loop; start afresh in this one.
        self._background = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        task = loop.create_task(self._run_background())
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def _run_background(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        self._loop = asyncio.get_running_loop()
        done = self._background_done = anyio.Event()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = self.store.subscribe(self.verifier.on_change)
        try:
            with anyio.CancelScope() as cancel_scope:
                self._background = cancel_scope
                task_status.started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._open_and_watch)
                    tg.start_soon(self.recorder.run)
                    tg.start_soon(self._maintain_cache)
                    if self.reap_every:
                        tg.start_soon(self._reap_periodically, self.reap_every)
        finally:
            done.set()

    async def _open_and_watch(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.open()
                break
            except StoreError as exc:
                logger.warning("keystile: cannot open %s yet: %s", self.store.display_url, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)
        await self.store.watch()

    async def _maintain_cache(self) -> None:
        period = max(0.5, min(self.verifier.cache_ttl / 4, 30.0))
        while True:
            await anyio.sleep(period)
            self.verifier.evict_idle()
            try:
                await self.verifier.refresh_stale()
            except StoreError as exc:
                logger.debug("keystile: state refresh deferred, store unavailable: %s", exc)

    async def _reap_periodically(self, every: float) -> None:
        while True:
            await anyio.sleep(every)
            now = utcnow()
            try:
                reaped = await self.store.reap(
                    unused_since=now - self.reap_unused_for, at=now, dry_run=False
                )
            except StoreError as exc:
                logger.warning("keystile: periodic reap failed: %s", exc)
                continue
            if reaped:
                logger.info(
                    "keystile: reaped %d stale or expired keys: %s",
                    len(reaped),
                    ", ".join(r.id for r in reaped),
                )

    async def _stop(self) -> None:
        if self._background is not None and self._loop is asyncio.get_running_loop():
            self._background.cancel()
            if self._background_done is not None:
                await self._background_done.wait()
        self._background = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._loop = None
        with anyio.move_on_after(SHUTDOWN_TIMEOUT, shield=True):
            try:
                await self.recorder.flush()
            except Exception as exc:
                logger.error(
                    "keystile: could not write last_used_at for %d keys at shutdown: %s",
                    self.recorder.pending,
                    exc,
                )
            if self._owns_store:
                await self.store.close()
