"""Verifier: presented token → cached principal, or one exception per failure reason.

The pipeline (``docs/architecture.md``, "The request path")::

    digest ─► constant-time cache scan ─► hit: expiry check, state refresh after cache_ttl
                                       └► miss: parse (malformed / bad checksum: no store
                                          access) ─► negative cache ─► single flight per
                                          token: store.get (with the memo's GET sent
                                          alongside) ─► the fleet's memo (memo.py), else
                                          argon2 in a worker thread ─► cache insert

It knows nothing of ASGI. The store reads of misses that arrive together are one read
(``read_batch.py``). argon2 runs at most once per token at a time, in at most
``argon2_concurrency`` worker threads (``argon2_pool.py``). Misses are admitted before
any store access (``admission.py``): one verification per key id with ``per_key_pending``
waiting, ``max_pending_verifications`` in all, and a failure budget per key id, so an id
whose recent attempts all failed is refused before the store read while other misses
wait. Suspects (such ids, and ids with several tokens in flight) hold a quarter of the
slots, read the store a few at a time and verify after everyone else: a flood of wrong
secrets over many public key ids leaves other tenants their argon2 time. Each refusal
there is a ``503`` with ``Retry-After``, the same for an id that exists and one that does
not, and none is remembered by the negative cache: the owner of a flooded id is served
within a second of the flood ending.

Counting: a hit is a request the verified-key cache answered; a miss, a well-formed key
that neither it nor the negative cache answered. A refusal repeated from the negative
cache counts in ``negative_hits`` alone, so one client replaying a revoked key does not
read as a cache too small. A change event forgets its own key's remembered refusals
(``negative.py``: indexed by key id), never walks the others'.

A key's state changes (revoke, rotation, expiry) evict it from the cache while a
verification or a state refresh of it may be reading the store. Each reader notes the
cache's epoch before it reads; if the key was evicted since, what it read may predate
the change, so it reads again before it answers and never writes the old state back.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

from .admission import DEFAULT_FAILURE_BUDGET, DEFAULT_FAILURE_REFILL, Admission, FailureBudget
from .argon2_pool import Argon2Pool
from .cache import CachedKey, VerifiedKeyCache
from .errors import InvalidToken, ServiceUnavailable, StoreError
from .hashing import DEFAULT_PARAMETERS, SecretHasher
from .memo import NullMemo, VerificationMemo
from .negative import NegativeCache
from .principal import APIKeyUser
from .read_batch import ReadBatcher
from .single_flight import SingleFlight
from .stats import Counters
from .stores.protocol import KeyStore
from .stores.records import KeyRecord
from .tokens import MAX_TOKEN_LENGTH, ParsedKey, parse_key

__all__ = [
    "DEFAULT_ARGON2_CONCURRENCY",
    "DEFAULT_CACHE_IDLE",
    "DEFAULT_CACHE_MAX_SIZE",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_MAX_PENDING_VERIFICATIONS",
    "DEFAULT_NEGATIVE_MAX_SIZE",
    "DEFAULT_NEGATIVE_TTL",
    "DEFAULT_PER_KEY_PENDING",
    "DEFAULT_STALE_IF_ERROR",
    "Verifier",
]

logger = logging.getLogger("keystile")

#: Seconds a cached key's state (revoked, expiry, scopes) may be old before it is re-read.
DEFAULT_CACHE_TTL = 60.0
#: Seconds a cached key may go unused before it leaves the cache.
DEFAULT_CACHE_IDLE = 3600.0
DEFAULT_CACHE_MAX_SIZE = 100_000
#: Seconds a rejected token is answered from the negative cache.
DEFAULT_NEGATIVE_TTL = 30.0
DEFAULT_NEGATIVE_MAX_SIZE = 10_000
#: Seconds past ``cache_ttl`` a cached key keeps working while the store is unreachable.
DEFAULT_STALE_IF_ERROR = 300.0
#: Seconds between store retries during an outage: for a cached key served stale, and for
#: misses after a store read that failed slowly.
STALE_RETRY_INTERVAL = 1.0
#: A failed store read slower than this (seconds) means misses are refused at once for
#: ``STALE_RETRY_INTERVAL`` rather than each waiting for the same timeout.
SLOW_STORE_FAILURE = 0.5
#: argon2 verifications at once: half the cores, so misses never take every core from
#: the event loop serving cache hits.
DEFAULT_ARGON2_CONCURRENCY = max(1, (os.cpu_count() or 2) // 2)
#: Misses allowed to wait for argon2 before new ones get 503 (about 1 s of work at 4 ms).
DEFAULT_MAX_PENDING_VERIFICATIONS = 256
#: Misses of one key id allowed to wait behind the one being verified. Only distinct
#: tokens for the same id queue here (one token is one single flight), and a real client
#: has one secret per id, so anything past a few is a guessing flood.
DEFAULT_PER_KEY_PENDING = 3
#: What the cache keeps a copy of: the verifier passes a new value on.
_CACHE_SETTINGS = frozenset({"cache_ttl", "clock", "monotonic"})
#: Re-reads of a key whose state keeps changing while it is verified, before the last
#: state read is used without being cached.
_SETTLE_ATTEMPTS = 3


class Verifier:
    def __init__(
        self,
        store: KeyStore,
        *,
        hasher: SecretHasher | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_idle: float = DEFAULT_CACHE_IDLE,
        cache_max_size: int = DEFAULT_CACHE_MAX_SIZE,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        negative_max_size: int = DEFAULT_NEGATIVE_MAX_SIZE,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        argon2_concurrency: int = DEFAULT_ARGON2_CONCURRENCY,
        max_pending_verifications: int = DEFAULT_MAX_PENDING_VERIFICATIONS,
        per_key_pending: int = DEFAULT_PER_KEY_PENDING,
        failure_budget: int = DEFAULT_FAILURE_BUDGET,
        failure_refill: float = DEFAULT_FAILURE_REFILL,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        memo: VerificationMemo | None = None,
    ) -> None:
        if cache_ttl <= 0 or cache_idle <= 0:
            raise ValueError("cache_ttl and cache_idle must be positive")
        self.store = store
        self.hasher = hasher or SecretHasher(DEFAULT_PARAMETERS)
        self.cache_idle = cache_idle
        self.stale_if_error = stale_if_error
        self.argon2_concurrency = argon2_concurrency
        self._argon2 = Argon2Pool(argon2_concurrency)
        self.memo: VerificationMemo = memo or NullMemo()
        #: Seconds a cached key's state may be old before it is read again.
        self.cache_ttl = cache_ttl
        #: The wall clock (expiry, usage) and the monotonic clock (TTLs, idle times);
        #: tests may replace them.
        self.clock = clock
        self.monotonic = monotonic
        self.cache = VerifiedKeyCache(max_size=cache_max_size, ttl=cache_ttl)
        self.cache.set_clocks(monotonic, clock, ttl=cache_ttl)
        self.counters = Counters()
        self.argon2_in_flight = 0
        self.admission = Admission(
            max_pending=max_pending_verifications,
            per_key_pending=per_key_pending,
            budget=FailureBudget(
                budget=failure_budget, refill=failure_refill, timer=lambda: self.monotonic()
            ),
        )
        #: Recently refused tokens: the reason, and for a reason decided by the key's state
        #: (expired, disabled, revoked) its key id, so a change of that key forgets it.
        self._negative = (
            NegativeCache(
                maxsize=negative_max_size, ttl=negative_ttl, timer=lambda: self.monotonic()
            )
            if negative_ttl > 0 and negative_max_size > 0
            else None
        )
        self._flights: SingleFlight[CachedKey] = SingleFlight()
        #: The misses of one moment read their records in one store read.
        self._records: ReadBatcher[str, KeyRecord] = ReadBatcher(self._read_many)
        #: Monotonic time a state refresh last failed (store down), per cached key id.
        self._refresh_failed: dict[str, float] = {}
        #: A store read that fails after this many seconds opens a short breaker.
        self.slow_store_failure = SLOW_STORE_FAILURE
        self._store_down_until = -math.inf
        #: Told the key id of every attempt refused against an existing key (wrong secret,
        #: revoked, expired, disabled): the usage recorder counts them per key and minute.
        #: Unknown ids and malformed keys are nobody's, so they are not reported.
        self.on_reject: Callable[[str], None] | None = None
        #: How a miss reads a token, and the longest taken (``keystile.legacy`` widens both).
        self.parse: Callable[[bytes], ParsedKey] = parse_key
        self.max_token_length = MAX_TOKEN_LENGTH

    @property
    def max_pending_verifications(self) -> int:
        return self.admission.max_pending

    @property
    def per_key_pending(self) -> int:
        return self.admission.per_key_pending

    @property
    def pending_verifications(self) -> int:
        """Misses admitted and not yet answered (reading the store, waiting or verifying)."""
        return self.admission.pending

    def __setattr__(self, name: str, value: Any) -> None:
        """Set ``name``; the cache keeps its own copy of the clocks and ``cache_ttl`` (the
        compiled hit path reads them without calling back), so a new one is passed on.
        Plain attributes: the hit path reads them with no property call."""
        object.__setattr__(self, name, value)
        if name in _CACHE_SETTINGS and "cache" in self.__dict__:
            self.cache.set_clocks(self.monotonic, self.clock, ttl=self.cache_ttl)

    # -- the request path -----------------------------------------------------------

    def hit(self, token: bytes) -> CachedKey | None:
        """The hit path without a coroutine: the entry if ``token`` is cached, unexpired
        and fresh, else ``None`` (then ``verify`` decides). Counts only the hits it returns."""
        if len(token) > self.max_token_length:
            return None
        now = self.monotonic()
        entry = self.cache.lookup(self.cache.digest(token), now)
        if entry is None or now - entry.checked_at > self.cache_ttl or self._expired(entry):
            return None
        self.counters.cache_hits += 1
        return entry

    async def verify(self, token: bytes) -> CachedKey:
        """Return the cached principal for ``token`` or raise an ``AuthenticationError``."""
        if len(token) > self.max_token_length:
            raise InvalidToken("malformed")
        digest = self.cache.digest(token)
        now = self.monotonic()
        entry = self.cache.lookup(digest, now)
        if entry is None:
            return await self._verify_miss(token, digest)
        self.counters.cache_hits += 1
        if self._expired(entry):
            raise self._rejected(entry.key_id, "expired")
        if now - entry.checked_at > self.cache_ttl:
            stale = entry
            entry = await self._flights.run(b"refresh:" + digest, lambda: self._reload(stale))
            if self._expired(entry):
                raise self._rejected(entry.key_id, "expired")
        return entry

    async def _verify_miss(self, token: bytes, digest: bytes) -> CachedKey:
        parsed = self.parse(token)
        if self._negative is not None:
            remembered = self._negative.get(digest)
            if remembered is not None:
                self.counters.negative_hits += 1
                if remembered[0] != "unknown":
                    raise self._rejected(parsed.key_id, remembered[0])
                raise InvalidToken(remembered[0])
        self.counters.cache_misses += 1
        return await self._flights.run(digest, lambda: self._prove(parsed, digest))

    async def _prove(self, parsed: ParsedKey, digest: bytes) -> CachedKey:
        epoch = self.cache.epoch
        key_id = parsed.key_id
        budget = self.admission.budget
        async with self.admission.admitted(key_id):
            asked = self.memo.ask(parsed)
            record = await self._read(key_id)
            if record is None or record.prefix != parsed.prefix:
                budget.failed(key_id)
                raise self._remember(digest, "unknown")
            recalled = await self.memo.recall(
                parsed, record.secret_hash, self.hasher.upgrades, asked
            )
            matched, upgraded = (True, None) if recalled else await self._by_argon2(parsed, record)
            # Counted while the id's lock is held, so its next miss sees the outcome.
            if matched:
                budget.succeeded(key_id)
            else:
                budget.failed(key_id)
        if not matched:
            self._rejected(record.id, "wrong_secret")
            raise self._remember(digest, "wrong_secret")
        if upgraded is not None:
            await self._upgrade_hash(record, upgraded)
        settled, settled_epoch = await self._settle(record, epoch)
        if settled is None:
            raise self._remember(digest, "unknown")
        status = settled.status(datetime.fromtimestamp(self.clock(), timezone.utc))
        if status != "active":
            self._rejected(settled.id, status)
            raise self._remember(digest, status, settled.id)
        if not recalled:
            await self.memo.remember(parsed, upgraded or record.secret_hash)
        entry = self._entry(settled)
        if settled_epoch is not None:
            self.cache.insert(digest, entry, now=entry.checked_at, epoch=settled_epoch)
        return entry

    async def _by_argon2(self, parsed: ParsedKey, record: KeyRecord) -> tuple[bool, str | None]:
        """argon2 in a worker thread, counted: ``(matched, upgraded hash or None)``."""
        self.argon2_in_flight += 1
        try:
            matched, upgraded, seconds = await self._argon2.run(
                partial(self._timed_verify, record.secret_hash, parsed.secret),
                suspect=self.admission.suspect(record.id),
            )
        finally:
            self.argon2_in_flight -= 1
        self.counters.count_argon2(seconds)
        return matched, upgraded

    async def _settle(self, record: KeyRecord, epoch: int) -> tuple[KeyRecord | None, int | None]:
        """``record`` if its key was not evicted since ``epoch``, else its state read again.

        Returns the state to answer with and the epoch it is current for, or ``None`` as
        the epoch when the key kept changing (answer with the last read, cache nothing).
        """
        current: KeyRecord | None = record
        for _ in range(_SETTLE_ATTEMPTS):
            if not self.cache.changed_since(record.id, epoch):
                return current, epoch
            epoch = self.cache.epoch
            current = await self._read(record.id)
        return current, None if self.cache.changed_since(record.id, epoch) else epoch

    def _timed_verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None, float]:
        """Verify in the worker thread, timing the work alone (not the wait for a thread)."""
        started = time.perf_counter()
        matched, upgraded = self.hasher.verify(secret_hash, secret)
        return matched, upgraded, time.perf_counter() - started

    async def _reload(self, entry: CachedKey) -> CachedKey:
        now = self.monotonic()
        servable = now - entry.checked_at <= self.cache_ttl + self.stale_if_error
        if servable and now - self._refresh_failed.get(entry.key_id, -math.inf) < (
            STALE_RETRY_INTERVAL
        ):
            # The store just failed for this key: serve the stale state without making
            # every request wait for another connect timeout.
            self.counters.stale_served += 1
            return entry
        try:
            for _ in range(_SETTLE_ATTEMPTS):
                epoch = self.cache.epoch
                record = await self.store.get(entry.key_id)
                if not self.cache.changed_since(entry.key_id, epoch):
                    break
        except StoreError as exc:
            if servable and not self.cache.changed_since(entry.key_id, epoch):
                if len(self._refresh_failed) >= self.cache.max_size:
                    self._refresh_failed.clear()
                self._refresh_failed[entry.key_id] = now
                self.counters.stale_served += 1
                return entry
            raise ServiceUnavailable("store_unavailable") from exc
        self.counters.state_refreshes += 1
        self._refresh_failed.pop(entry.key_id, None)
        fresh = self._apply(entry.key_id, record, epoch)
        if fresh is None:
            disabled = record is not None and record.revoked_at is None
            raise self._rejected(entry.key_id, "disabled" if disabled else "revoked")
        return fresh

    # -- background work ------------------------------------------------------------

    async def refresh_stale(self) -> int:
        """Re-read, in one batched store read, the state of every cached key older than
        half the TTL, so hits rarely wait for a refresh. Returns how many were read."""
        stale = self.cache.checked_before(self.monotonic() - self.cache_ttl / 2)
        if not stale:
            return 0
        epoch = self.cache.epoch
        records = await self.store.get_many(stale)
        self.counters.state_refreshes += len(stale)
        for key_id in stale:
            self._apply(key_id, records.get(key_id), epoch)
        return len(stale)

    def evict_idle(self) -> int:
        return self.cache.evict_idle(self.monotonic() - self.cache_idle)

    def on_change(self, key_id: str | None) -> None:
        """A store listener: evict a key whose state changed; with ``None`` (changes may
        have been missed) make every cached key's state stale, so it is read again before
        its next use: a store read, not a second argon2 verification.

        Refusals remembered for that key's state (expired, disabled) are forgotten too:
        an ``enable`` or a new expiry must take effect at once, not after ``negative_ttl``.
        """
        if key_id is None:
            self.counters.cache_resets += 1
            self.cache.invalidate()
        else:
            self.counters.revocation_events += 1
            self.cache.evict(key_id)
        negative = self._negative
        if negative is not None:
            if key_id is None:
                negative.forget_state_decided()
            else:
                negative.forget_key(key_id)

    # -- helpers --------------------------------------------------------------------

    async def _read(self, key_id: str) -> KeyRecord | None:
        started = time.monotonic()
        if started < self._store_down_until:
            raise ServiceUnavailable("store_unavailable")
        try:
            return await self._records.get(key_id)
        except StoreError as exc:
            failed = time.monotonic()
            if failed - started >= self.slow_store_failure:
                # A store that fails slowly (a black-holed host: connect timeouts) would
                # make every miss wait as long; refuse misses at once for a moment.
                self._store_down_until = failed + STALE_RETRY_INTERVAL
            logger.warning("keystile: key store unavailable on a cache miss: %s", exc)
            raise ServiceUnavailable("store_unavailable") from exc

    async def _read_many(self, key_ids: list[str]) -> dict[str, KeyRecord]:
        if len(key_ids) > 1:
            return await self.store.get_many(key_ids)
        record = await self.store.get(key_ids[0])
        return {} if record is None else {key_ids[0]: record}

    async def _upgrade_hash(self, record: KeyRecord, secret_hash: str) -> None:
        try:
            await self.store.update_hash(record.id, secret_hash, replacing=record.secret_hash)
        except StoreError as exc:
            logger.warning("keystile: could not upgrade the hash of key %s: %s", record.id, exc)

    def _rejected(self, key_id: str, reason: str) -> InvalidToken:
        """Report an attempt refused against ``key_id`` to ``on_reject``; the refusal."""
        on_reject = self.on_reject
        if on_reject is not None:
            on_reject(key_id)
        return InvalidToken(reason)

    def _remember(self, digest: bytes, reason: str, key_id: str | None = None) -> InvalidToken:
        if self._negative is not None:
            self._negative.remember(digest, reason, key_id)
        return InvalidToken(reason)

    def _expired(self, entry: CachedKey) -> bool:
        return entry.expires_at is not None and self.clock() >= entry.expires_at

    def _entry(self, record: KeyRecord) -> CachedKey:
        expires = record.expires_at.timestamp() if record.expires_at is not None else None
        return CachedKey(APIKeyUser.from_record(record), expires, self.monotonic())

    def _apply(self, key_id: str, record: KeyRecord | None, epoch: int) -> CachedKey | None:
        """Fold state read at ``epoch`` into the cache; ``None`` when the key is gone.

        A key evicted since ``epoch`` keeps what the eviction left (nothing, or state
        read after it): the record in hand may predate the change.
        """
        if record is None or record.revoked_at is not None or record.disabled_at is not None:
            self.cache.evict(key_id)
            return None
        fresh = self._entry(record)
        self.cache.replace_state(fresh, epoch=epoch)
        return fresh
