"""What this process knows of each budget's remaining quota (a key's, or its rotation
chain's: the book is keyed by ``LimitPolicy.budget``).

The remaining count lives in the key store. Uses are counted in memory and taken from it
by the usage recorder's batched flush (the same statement that writes ``last_used_at``),
which returns what is left; each process enforces against the last remaining count it
learnt minus its own uses since. Other processes' uses are unseen until they flush and
this one flushes after them, so with ``memory://`` the quota may be overshot by at most
about ``workers * flush_interval * rate`` (docs/operations.md). With Redis the counter is
exact and the store follows it in the same batches.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

from ..stores.records import QuotaState
from ..usage import UsageRecorder
from .policy import QuotaPolicy

__all__ = ["QuotaBook"]


class QuotaBook:
    """What this process knows of each key's remaining quota, shared by every enforcer on
    one usage recorder: the count learnt last (from the key's state, or from the flush
    that took this process's uses) and the uses counted since."""

    __slots__ = ("__weakref__", "_slots", "recorder")

    _books: weakref.WeakKeyDictionary[UsageRecorder, QuotaBook] = weakref.WeakKeyDictionary()

    def __init__(self, recorder: UsageRecorder) -> None:
        self.recorder = recorder
        #: key id → [quota, refill, period start, known remaining, used since, period end]
        self._slots: dict[str, list[Any]] = {}
        recorder.on_quota(self._synced)

    @classmethod
    def of(cls, recorder: UsageRecorder) -> QuotaBook:
        book = cls._books.get(recorder)
        if book is None:
            book = cls._books[recorder] = cls(recorder)
        return book

    def _slot(self, key_id: str, q: QuotaPolicy, now: float) -> list[Any]:
        slot = self._slots.get(key_id)
        if slot is None or slot[0] != q.quota or slot[1] != q.refill or q.reset_at > slot[2]:
            # First sight, or the quota was changed (an update starts a new period).
            used = self.recorder.unwritten_uses(key_id) if slot is not None else 0
            end = q.reset_at + q.refill if q.refill else math.inf
            slot = self._slots[key_id] = [q.quota, q.refill, q.reset_at, q.remaining, used, end]
        elif q.reset_at == slot[2] and q.remaining < slot[3]:
            # A newer read of the same period (remaining only falls within one).
            slot[3] = q.remaining
            slot[4] = self.recorder.unwritten_uses(key_id)
        if now >= slot[5]:
            refill = slot[1]
            periods = int((now - slot[5]) // refill) + 1
            slot[2] = slot[5] + (periods - 1) * refill
            slot[5] = slot[2] + refill
            slot[3], slot[4] = slot[0], 0
        return slot

    def wait(self, budget: str, q: QuotaPolicy, now: float, cost: int = 1) -> float | None:
        """``None`` if ``cost`` uses are left, else the seconds until the refill (``inf``:
        never)."""
        slot = self._slot(budget, q, now)
        if slot[3] - slot[4] >= cost:
            return None
        return float(slot[5] - now)

    def use(self, budget: str, n: int = 1) -> None:
        """Count ``n`` uses (after ``wait`` said one is left)."""
        slot = self._slots.get(budget)
        if slot is not None:
            slot[4] += n
        self.recorder.count_use(budget, n)

    def left(self, key_id: str) -> int | None:
        slot = self._slots.get(key_id)
        return None if slot is None else max(0, slot[3] - slot[4])

    def period(self, budget: str, q: QuotaPolicy, now: float) -> tuple[float, int]:
        """The current period's start (epoch seconds) and what this process knows is left
        in it: the count the store last said (the key's state, or a flush's answer) minus
        this process's uses since. A Redis counter that was lost (restart, failover,
        eviction) starts again from this."""
        slot = self._slot(budget, q, now)
        return slot[2], max(0, slot[3] - slot[4])

    def _synced(self, states: Mapping[str, QuotaState]) -> None:
        for key_id, state in states.items():
            slot = self._slots.get(key_id)
            if slot is None:
                continue
            reset = state.reset_at.timestamp() if state.reset_at is not None else slot[2]
            if reset < slot[2]:
                continue  # written for a period this process has already left
            if reset > slot[2] and slot[1]:
                slot[2], slot[5] = reset, reset + slot[1]
            slot[3] = state.remaining
            slot[4] = self.recorder.unwritten_uses(key_id)
