"""KeystileRuntime: the store, verifier and usage recorder behind the middleware, and
their background work.

One runtime serves every ``APIKeyMiddleware`` built from the same configuration in a
process. Frameworks that build a middleware per route (Litestar's ``DefineMiddleware``)
then still get one cache, one connection pool, one usage recorder and one set of
background tasks, so a key is proven with argon2 once per process, not once per route.

The background work belongs to the runtime, not to the lifespan call that started it:
an app that ends the lifespan protocol early does not stop it, and a duty that fails is
logged and run again. It runs on one event loop; when that loop ends (a test client's
loop per request) the next request starts it afresh on its own loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from .errors import AuthenticationError, InvalidToken, IPNotAllowed, ServiceUnavailable, StoreError
from .hashing import SecretHasher
from .limits import LimitEnforcer
from .memo import open_memo
from .principal import APIKeyUser
from .stats import KeystileStats
from .stores import store_from_url
from .stores.records import utcnow
from .usage import UsageRecorder
from .verifier import Verifier

if TYPE_CHECKING:
    from .config import KeystileConfig

__all__ = [
    "BACKGROUND_RETRY_MAX",
    "SHUTDOWN_TIMEOUT",
    "USAGE_PRUNE_BATCH",
    "USAGE_PRUNE_EVERY",
    "KeystileRuntime",
]

logger = logging.getLogger("keystile")

#: Seconds the final flush and store close may take at shutdown.
SHUTDOWN_TIMEOUT = 10.0
#: Cap of the delay before a failed background duty (or store open) is retried, seconds.
BACKGROUND_RETRY_MAX = 5.0
#: Seconds between deletions of usage rows older than ``usage_retention``.
USAGE_PRUNE_EVERY = 3600.0
#: Usage rows deleted per statement: short transactions, never one long lock.
USAGE_PRUNE_BATCH = 10_000
#: The actor the audit log records for keys the periodic reaper revokes.
REAPER_ACTOR = "keystile:reaper"


class KeystileRuntime:
    """Shared by the middlewares of one configuration: see the module docstring."""

    _shared: weakref.WeakValueDictionary[Hashable, KeystileRuntime] = weakref.WeakValueDictionary()
    _shared_lock = threading.Lock()

    def __init__(self, config: KeystileConfig) -> None:
        """The runtime of ``config``: its store (opened from ``database_url`` and owned,
        unless ``store`` was given), verifier and usage recorder."""
        self.config = config
        self.owns_store = config.store is None
        store = config.store
        if store is None:
            assert config.database_url is not None
            store = store_from_url(config.database_url)
        self.store = store
        legacy = config.legacy
        self.verifier = Verifier(
            self.store,
            hasher=SecretHasher(config.argon2) if legacy is None else legacy.hasher(config.argon2),
            memo=open_memo(config.verification_memo, config.memo_secret, ttl=config.memo_ttl),
            **config.verifier_options(),
        )
        if legacy is not None:
            self.verifier.parse = legacy.parse
            self.verifier.max_token_length = legacy.max_token_length
        self.recorder = UsageRecorder(
            self.store, flush_interval=config.flush_interval, flush_max=config.flush_max
        )
        #: Rejected attempts against a key id are counted in its usage, per minute.
        self.verifier.on_reject = self._count_reject
        #: The compiled hit path counts the uses of plain hits in the cache's table.
        if self.verifier.cache.compiled:
            self.recorder.attach(self.verifier.cache.table)
        #: Duties others attach (the metrics snapshot writer), and calls made at ``stop``.
        self.extra_duties: dict[str, Callable[[], Awaitable[None]]] = {}
        self.stop_hooks: list[Callable[[], None]] = []
        #: True while background work runs: the one check the request path makes.
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    @classmethod
    def for_config(cls, config: KeystileConfig) -> KeystileRuntime:
        """The runtime of ``config``, shared by every middleware whose config has the same
        ``runtime_key`` (store, cache, verification and background options)."""
        return cls.shared(config.runtime_key, lambda: cls(config))

    @classmethod
    def shared(cls, key: Hashable, build: Callable[[], KeystileRuntime]) -> KeystileRuntime:
        """The runtime for configuration ``key``, built on first use and kept while any
        middleware holds it."""
        with cls._shared_lock:
            runtime = cls._shared.get(key)
            if runtime is None:
                runtime = cls._shared[key] = build()
            return runtime

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """(Re)start the background work on the running loop.

        Synchronous, so the change listener is subscribed before the request that calls
        it (or any other on this loop) can verify a key: a revocation is never missed in
        between. Background work of another, finished event loop is replaced.
        """
        loop = asyncio.get_running_loop()
        if self.running and self._loop is loop:
            return
        self._loop = loop
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._unsubscribe = self.store.subscribe(self.verifier.on_change)
        task = loop.create_task(self._run_background(), name="keystile background work")
        task.add_done_callback(self._background_ended)
        self._task = task
        self.running = True

    @property
    def is_background_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        if task is not self._task:
            return
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "keystile: background work stopped (%s); it restarts with the next request",
                task.exception(),
            )
        self.running = False

    async def stop(self) -> None:
        """Stop background work, write pending ``last_used_at`` and close an owned store."""
        task, self._task = self._task, None
        self.running = False
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if task is not None and not task.done() and self._loop is current:
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
            if self.owns_store:
                await self.store.close()
            await self.verifier.memo.aclose()
        for hook in list(self.stop_hooks):
            try:
                hook()
            except Exception:
                logger.exception("keystile: a shutdown hook failed")

    # -- verification outside a request -------------------------------------------------

    def limits_for(self, config: KeystileConfig) -> LimitEnforcer:
        """The limit enforcer of ``config``'s limit options on this runtime, shared by every
        middleware (and ``verify``) with those options, so they spend the same limits."""
        return LimitEnforcer.shared(
            self.recorder,
            self.verifier.counters,
            storage=config.rate_limit_storage,
            default_rate_limit=config.default_rate_limit,
            on_error=config.rate_limit_on_error,
            headers=config.rate_limit_headers,
        )

    async def verify(
        self, token: str | bytes, *, client: tuple[str, int] | None = None
    ) -> APIKeyUser:
        """The key behind ``token``, verified as the middleware verifies a request's: the
        same cache (argon2 once per key per process), the key's IP allowlist (checked
        against ``client``, ``(host, port)``; without one, a key with an allowlist is
        refused), its limits, and its use counted in ``last_used_at`` and its usage.

        Raises the middleware's refusals: ``InvalidToken`` (401), ``IPNotAllowed`` (403),
        ``RateLimited`` / ``QuotaExceeded`` (429), ``ServiceUnavailable`` (503). For a
        WebSocket subprotocol, a task queue, another protocol: anything without headers.
        """
        if not self.running:
            self.start()
        if isinstance(token, str):
            if not token.isascii():
                raise InvalidToken("malformed")
            token = token.encode()
        verifier = self.verifier
        try:
            entry = verifier.hit(token) or await verifier.verify(token)
        except AuthenticationError:
            raise
        except Exception:
            logger.exception("keystile: unexpected error while verifying a key")
            raise ServiceUnavailable("internal_error") from None
        user = entry.user
        if user.ip_allowlist is not None and not user.ip_allowlist.allows(client):
            raise IPNotAllowed()
        limits = self.limits_for(self.config)
        if user.limits is not None or limits.limits_every_key:
            refusal = await limits.acheck(user) if limits.is_async else limits.check(user)
            if refusal is not None:
                raise limits.refused(user, refusal)
        self.recorder.touch(user.key_id, verifier.clock())
        return user

    # -- operator API -----------------------------------------------------------------

    def stats(self) -> KeystileStats:
        verifier = self.verifier
        return KeystileStats.of(
            verifier.counters,
            table_hits=verifier.cache.hits,
            argon2_in_flight=verifier.argon2_in_flight,
            cache_size=len(verifier.cache),
            cache_max_size=verifier.cache.max_size,
            memo_hits=verifier.memo.hits,
            memo_misses=verifier.memo.misses,
            memo_errors=verifier.memo.errors,
            **self.recorder.stats(),
        )

    # -- background duties --------------------------------------------------------------

    async def _run_background(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._supervise, "revocation listener", self._open_and_watch)
            tg.start_soon(self._supervise, "last_used_at writer", self.recorder.run)
            tg.start_soon(self._supervise, "cache upkeep", self._maintain_cache)
            if self.config.reap_every:
                tg.start_soon(self._supervise, "periodic reaper", self._reap_periodically)
            if self.config.usage_retention is not None:
                tg.start_soon(self._supervise, "usage retention", self._prune_usage_periodically)
            for name, duty in list(self.extra_duties.items()):
                tg.start_soon(self._supervise, name, duty)

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

    def _count_reject(self, key_id: str) -> None:
        self.recorder.reject(key_id, self.verifier.clock())

    async def _prune_usage_periodically(self) -> None:
        """Delete usage rows older than ``usage_retention``, in batches, now and then
        every ``USAGE_PRUNE_EVERY`` seconds. Every process does it; the deletes are
        idempotent, so the first to run does the work."""
        retention = self.config.usage_retention
        assert retention is not None
        prune = getattr(self.store, "prune_usage", None)
        if prune is None:  # a store of its own that keeps no usage
            return
        while True:
            before = utcnow() - retention
            try:
                total = 0
                while True:
                    deleted: int = await prune(before=before, limit=USAGE_PRUNE_BATCH)
                    total += deleted
                    if deleted < USAGE_PRUNE_BATCH:
                        break
                    await anyio.lowlevel.checkpoint()
                if total:
                    logger.info("keystile: deleted %d usage rows older than %s", total, before)
            except StoreError as exc:
                logger.warning("keystile: deleting old usage rows failed: %s", exc)
            await anyio.sleep(USAGE_PRUNE_EVERY)

    async def _reap_periodically(self) -> None:
        every, unused_for = self.config.reap_every, self.config.reap_unused_for
        assert every is not None
        while True:
            await anyio.sleep(every)
            now = utcnow()
            try:
                reaped = await self.store.reap(
                    unused_since=now - unused_for,
                    at=now,
                    dry_run=False,
                    actor=REAPER_ACTOR,
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
