"""Admission of cache misses: which may read the store and run argon2, decided before either.

A miss (a well-formed key the cache does not hold) costs a store read and an argon2
verification in a worker thread. Key ids are public and an owner may hold many keys (a
self-service plan mints dozens), so a flood of fresh wrong secrets over many known ids
must not take that work from everyone else. Every bound is decided before the store is
read, and an unknown id's refusal counts as a failure just as a wrong secret does, so no
answer depends on whether an id exists:

* **Per key id**: one verification at a time, ``per_key_pending`` more waiting; past
  that, ``503 overloaded``. A real client has one secret per id (and one token is one
  single flight however many requests carry it), so only guessing queues here.
* **In all**: ``max_pending_verifications`` misses; past that, ``503 overloaded``.
* **A failure budget per key id**: each failed verification of an id (wrong secret, or
  no such key) adds one to a bucket that drains one every ``failure_refill`` seconds.
  At ``failure_budget``, while other misses wait, the id's misses are refused before the
  store read with ``503 too_many_failures`` (the status and body of ``overloaded``) until
  one has drained; a proven secret empties it. Once its first burst is spent, a flood
  gets one verification per id and second, however many clients send. With no other
  miss waiting, an exhausted id is still verified: there is nobody to protect, and a
  refusal could only turn away its owner (nor does a lone client guessing one secret
  after another ever see a 5xx).
* **Suspects**: a miss of an id with failures in its bucket, or one queued behind
  another token of its id, is suspect. Suspects hold at most a quarter of the miss slots
  (never less than one id's wait list), so the rest stays for ids with no recent
  failure; only ``SUSPECTS_AT_ONCE`` of them read the store and verify at a time; and
  argon2 runs every waiting verification of an unsuspected id first (``argon2_pool.py``).
  So a tenant's first request waits for the work running, not for a flood's queue: not
  in the store's connection pool, not for a thread.

The trade-off of a budget per public id: a flood of wrong secrets for an id also refuses
that id's owner while it lasts, when the owner's key is not in this process's cache
(a cached key is answered before admission and never meets the budget). It is bounded
on purpose: the refusal is a ``503`` with ``Retry-After``, never the ``401`` of a wrong
secret, and is never remembered by the negative cache, so the owner's client retries
and is served within ``failure_refill`` of the flood ending; the per-id wait list
refused that owner during such a flood already. No lane can let "the right secret"
through instead: telling it from a guess is the argon2 verification the budget saves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from cachetools import TTLCache

from .errors import ServiceUnavailable

__all__ = [
    "DEFAULT_FAILURE_BUDGET",
    "DEFAULT_FAILURE_REFILL",
    "FAILURE_MEMORY",
    "SUSPECTS_AT_ONCE",
    "Admission",
    "FailureBudget",
]

#: Failed verifications an id may take in a burst: its wait list, tested once in full.
DEFAULT_FAILURE_BUDGET = 4
#: Seconds for one failure to drain from an id's bucket.
DEFAULT_FAILURE_REFILL = 1.0
#: Key ids whose failures are remembered at most (the least recently failed leave first).
FAILURE_MEMORY = 10_000
#: Suspect misses reading the store or verifying at once: enough to keep an argon2 thread
#: busy, few enough that a tenant's store read never queues behind a flood's.
SUSPECTS_AT_ONCE = 2


class FailureBudget:
    """Per key id, a bucket of recent failed verifications that drains with time."""

    __slots__ = ("_buckets", "_timer", "budget", "refill")

    def __init__(
        self,
        *,
        budget: int = DEFAULT_FAILURE_BUDGET,
        refill: float = DEFAULT_FAILURE_REFILL,
        timer: Callable[[], float],
        maxsize: int = FAILURE_MEMORY,
    ) -> None:
        if budget < 1 or refill <= 0:
            raise ValueError("failure_budget must be at least 1 and failure_refill positive")
        self.budget = budget
        self.refill = refill
        self._timer = timer
        #: Key id → (level, when it was that). A full bucket drains in budget x refill.
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(
            maxsize=maxsize, ttl=budget * refill, timer=timer
        )

    def level(self, key_id: str) -> float:
        """The failures in ``key_id``'s bucket now (0 when it has none)."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return 0.0
        level, at = bucket
        return max(0.0, level - (self._timer() - at) / self.refill)

    def exhausted(self, key_id: str) -> bool:
        return self.level(key_id) > self.budget - 1

    def failed(self, key_id: str) -> None:
        self._buckets[key_id] = (self.level(key_id) + 1.0, self._timer())

    def succeeded(self, key_id: str) -> None:
        self._buckets.pop(key_id, None)


@dataclass(slots=True)
class _Line:
    """Misses waiting for a lock (one key id's) or a semaphore (the suspects'). Made on
    first use and dropped when nobody waits, so it never outlives its event loop."""

    gate: anyio.Lock | anyio.Semaphore
    users: int = 0


class Admission:
    """The bounds a miss passes before the store is read."""

    def __init__(
        self,
        *,
        max_pending: int,
        per_key_pending: int,
        budget: FailureBudget,
    ) -> None:
        self.max_pending = max_pending
        self.per_key_pending = per_key_pending
        self.budget = budget
        #: Suspect misses admitted at most: a quarter, or one id's wait list if more.
        self.suspect_max = max(per_key_pending + 1, max_pending // 4)
        #: Misses admitted and not yet answered, and how many of them are suspect.
        self.pending = 0
        self.suspect_pending = 0
        self._queues: dict[str, _Line] = {}
        self._suspects: _Line | None = None

    def suspect(self, key_id: str) -> bool:
        """Whether ``key_id`` has failures in its bucket or more than one miss admitted."""
        queue = self._queues.get(key_id)
        return (queue is not None and queue.users > 1) or self.budget.level(key_id) > 0

    @asynccontextmanager
    async def admitted(self, key_id: str) -> AsyncIterator[None]:
        """Hold the miss slot of ``key_id``, or raise ``ServiceUnavailable`` at once.

        The budget is checked again once the id's lock is held: a miss that waited
        behind a verification that failed must see that failure before reading the store.
        A suspect then waits for one of ``SUSPECTS_AT_ONCE`` turns.
        """
        self._check_budget(key_id, others=self.pending)
        if self.pending >= self.max_pending:
            raise ServiceUnavailable("overloaded")
        queue = self._queues.get(key_id)
        suspect = queue is not None or self.budget.level(key_id) > 0
        if queue is not None and queue.users > self.per_key_pending:
            raise ServiceUnavailable("overloaded")
        if suspect and self.suspect_pending >= self.suspect_max:
            raise ServiceUnavailable("overloaded")
        if queue is None:
            queue = self._queues[key_id] = _Line(anyio.Lock(fast_acquire=True))
        queue.users += 1
        self.pending += 1
        self.suspect_pending += suspect
        try:
            async with queue.gate:
                self._check_budget(key_id, others=self.pending - 1)
                # Asked again: a burst's other tokens for this id arrive while the first
                # takes the lock, and make it as suspect as they are.
                if suspect or self.suspect(key_id):
                    async with self._suspect_turn():
                        yield
                else:
                    yield
        finally:
            self.pending -= 1
            self.suspect_pending -= suspect
            queue.users -= 1
            if not queue.users:
                del self._queues[key_id]

    @asynccontextmanager
    async def _suspect_turn(self) -> AsyncIterator[None]:
        line = self._suspects
        if line is None:
            line = self._suspects = _Line(anyio.Semaphore(SUSPECTS_AT_ONCE))
        line.users += 1
        try:
            async with line.gate:
                yield
        finally:
            line.users -= 1
            if not line.users:
                self._suspects = None

    def _check_budget(self, key_id: str, *, others: int) -> None:
        """Refuse an exhausted id while ``others`` misses wait: with none, its verification
        takes nothing from anyone, and refusing it could only turn away its owner."""
        if others > 0 and self.budget.exhausted(key_id):
            raise ServiceUnavailable("too_many_failures")
