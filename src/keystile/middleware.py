"""APIKeyMiddleware: ASGI in, verifier, ASGI out.

A pure ASGI middleware (not ``BaseHTTPMiddleware``). It reads the credential, asks the
verifier, and either sets Starlette's ``scope["user"]``/``scope["auth"]`` and calls the
app, or answers with the RFC 6750 response from :mod:`keystile.responses`. It also owns
the background work (usage flushes, revocation listener, cache upkeep), started by the
lifespan protocol or, when a server runs without lifespan, lazily on the first request.
The background work belongs to the middleware, not to the lifespan call, so an app that
ends the lifespan protocol early does not stop it; a duty that fails is logged and
restarted.

Without a valid key nothing the app produces reaches the client, with two exceptions:
``exempt_paths`` (matched on the path the app routes on, without the proxy's
``root_path``; keystile credentials are still stripped there) and CORS preflights, which
are forwarded only to a ``CORSMiddleware`` inside this one and only let out when the
answer carries the CORS preflight headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

import anyio
from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import resolve_database_url
from .credentials import check_single_token, split_credential, without_credentials
from .errors import AuthenticationError, MissingCredentials, ServiceUnavailable, StoreError
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from .responses import WEBSOCKET_POLICY_VIOLATION, error_code, error_response
from .stats import KeystileStats
from .stores import store_from_url
from .stores.base import KeyStore, utcnow
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

__all__ = ["APIKeyMiddleware", "ErrorHandler"]

logger = logging.getLogger("keystile")

ErrorHandler = Callable[[HTTPConnection, AuthenticationError], Response]

DEFAULT_HEADER_NAME = "X-API-Key"
DEFAULT_REALM = "api"
#: With ``reap_every``: keys unused for longer than this are revoked.
DEFAULT_REAP_UNUSED_FOR = timedelta(days=90)
#: Seconds the final flush and store close may take at shutdown.
SHUTDOWN_TIMEOUT = 10.0
#: Cap of the delay before a failed background duty (or store open) is retried, seconds.
BACKGROUND_RETRY_MAX = 5.0
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
            per_key_pending=per_key_pending,
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
        self._is_key = key_matcher(key_prefixes)
        #: With required=False a bearer token that is not keystile's is not a credential.
        self._bearer_filter = None if required else self._is_key
        paths = list(exempt_paths)
        self._exempt_exact = frozenset(p for p in paths if not p.endswith("*"))
        self._exempt_prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        self._has_exemptions = bool(paths)
        self._cors_inside: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
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
            self._start_background()
        scope["keystile"] = self
        if self._has_exemptions and self._is_exempt(scope):
            await self._pass_exempt(scope, receive, send)
            return
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
        scope["user"] = entry.user
        scope["auth"] = AuthCredentials(entry.auth_scopes)
        self.recorder.touch(entry.user.key_id, self.verifier.clock())
        if self.strip_credentials and without is not None:
            scope["headers"] = without
        await self.app(scope, receive, send)

    def _is_exempt(self, scope: Scope) -> bool:
        path = route_path(scope)
        return path in self._exempt_exact or bool(
            self._exempt_prefixes and path.startswith(self._exempt_prefixes)
        )

    async def _pass_exempt(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A path that needs no key: the app runs anonymous, without keystile credentials
        (a key sent there must not reach an access log), other credentials untouched."""
        if self.strip_credentials:
            stripped = without_credentials(scope["headers"], self._header, self._is_key)
            if stripped is not None:
                scope["headers"] = stripped
        scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
        await self.app(scope, receive, send)

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
        stopped = False

        async def wrapped_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and self._loop is not (
                asyncio.get_running_loop()
            ):
                self._start_background()
            return message

        async def wrapped_send(message: Message) -> None:
            nonlocal stopped
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                stopped = True
                await self._stop()
            await send(message)

        await self.app(scope, wrapped_receive, wrapped_send)
        if not stopped and self._task is not None and not self._task.done():
            logger.warning(
                "keystile: the application ended the lifespan protocol before shutdown; "
                "background work (last_used_at writes, revocation listener, cache upkeep) "
                "keeps running. Call APIKeyMiddleware.aclose() at shutdown to write the "
                "last pending uses."
            )

    def _start_background(self) -> None:
        """(Re)start the background work on the running loop.

        Synchronous, so the change listener is subscribed before this request (or any
        other on this loop) can verify a key: a revocation is never missed in between.
        Background work of another event loop (a test client's previous loop) died with
        that loop; it starts afresh here.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = self.store.subscribe(self.verifier.on_change)
        task = loop.create_task(self._run_background(), name="keystile background work")
        task.add_done_callback(self._background_ended)
        self._task = task

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        if task is not self._task:
            return
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "keystile: background work stopped (%s); it restarts with the next request",
                task.exception(),
            )
        self._loop = None

    async def _run_background(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._supervise, "revocation listener", self._open_and_watch)
            tg.start_soon(self._supervise, "last_used_at writer", self.recorder.run)
            tg.start_soon(self._supervise, "cache upkeep", self._maintain_cache)
            if self.reap_every:
                tg.start_soon(self._supervise, "periodic reaper", self._reap_periodically)

    @staticmethod
    async def _supervise(name: str, duty: Callable[[], Awaitable[None]]) -> None:
        """Run ``duty`` until it returns; if it fails, log it and run it again."""
        delay = 0.5
        while True:
            try:
                await duty()
                return
            except Exception as exc:
                logger.error(
                    "keystile: %s failed (%s: %s); restarting it in %.1fs",
                    name,
                    type(exc).__name__,
                    exc,
                    delay,
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, BACKGROUND_RETRY_MAX)

    async def _open_and_watch(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.open()
                break
            except StoreError as exc:
                logger.warning("keystile: cannot open %s yet: %s", self.store.display_url, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, BACKGROUND_RETRY_MAX)
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

    async def _reap_periodically(self) -> None:
        assert self.reap_every is not None
        while True:
            await anyio.sleep(self.reap_every)
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
        task, self._task = self._task, None
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
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
