"""Rate limits in this process (``memory://``), and the shape every rate limiter has.

Rate limits use GCRA (the generic cell rate algorithm): per key one number, the
theoretical arrival time (TAT) of the next request. A request at ``now`` passes when
``TAT - now <= period - period/count`` and moves the TAT ``period/count`` later; so
``count`` requests may arrive at once, and after that one every ``period/count`` seconds.
No window edges, no counters to reset, and a refusal knows exactly when to come back.

In this process the TAT is a float in a per-key slot; a check is a dict lookup and a few
float operations. N processes allow N times the limit (``redis://`` shares one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .policy import NamedRate, Rate

__all__ = ["MemoryRateLimiter", "RateLimiter"]

#: Idle GCRA slots are dropped when the slot table grows past this.
_SLOT_PRUNE_AT = 10_000


class RateLimiter(Protocol):
    """Where rate-limit state lives: this process (``memory://``) or Redis."""

    async def acquire(self, key_id: str, rate: Rate) -> float:
        """Take one request of ``key_id`` under ``rate``: ``0.0`` if it passes, else the
        seconds until one would (nothing taken)."""

    def state(self, key_id: str, rate: Rate) -> tuple[int, float]:
        """What is left after the last decision: requests, and seconds until all are."""

    async def aclose(self) -> None: ...


class MemoryRateLimiter:
    """GCRA in this process: per key a slot ``[TAT, rate]``, all on the monotonic clock."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self._slots: dict[str, list[Any]] = {}

    def take(self, key_id: str, rate: Rate, now: float, cost: int = 1) -> float:
        """The synchronous decision: ``0.0`` and the request counted (``cost`` times), or
        the wait (``wait`` and the spending, inlined: this runs on every limited request)."""
        slot = self._slots.get(key_id)
        if slot is None or slot[1] is not rate:
            wait = self.wait(key_id, rate, now, cost)
            if not wait:
                self._slots[key_id][0] = now + rate.interval * cost
            return wait
        tat: float = slot[0]
        if tat < now:
            tat = now
        ahead = tat - now
        if cost != 1:
            ahead += (cost - 1) * rate.interval
        tau: float = rate.tau
        if ahead > tau:
            return ahead - tau
        slot[0] = tat + (rate.interval if cost == 1 else rate.interval * cost)
        return 0.0

    def take_all(self, rates: Sequence[NamedRate], now: float, cost: int = 1) -> tuple[int, float]:
        """Every one of ``rates`` at once: ``(-1, 0.0)`` and each counted (``cost`` times),
        or the index of the rate with the longest wait and that wait, nothing counted.
        Two passes over the slots, checking then spending, so nothing is allocated."""
        slots = self._slots
        worst: float = 0.0
        refusing = None
        for limit in rates:
            rate = limit.rate
            slot = slots.get(limit.slot)
            if slot is None or slot[1] is not rate:
                self.wait(limit.slot, rate, now, cost)  # a fresh slot under this rate
                slot = slots[limit.slot]
            ahead: float = slot[0] - now if slot[0] > now else 0.0
            if cost != 1:
                ahead += (cost - 1) * rate.interval
            if ahead > rate.tau and ahead - rate.tau > worst:
                worst, refusing = ahead - rate.tau, limit
        if refusing is not None:
            return rates.index(refusing), worst
        for limit in rates:
            slot = slots[limit.slot]
            tat: float = slot[0]
            slot[0] = (tat if tat > now else now) + limit.rate.interval * cost
        return -1, 0.0

    def wait(self, key_id: str, rate: Rate, now: float, cost: int = 1) -> float:
        """``0.0`` if a request weighing ``cost`` fits now (nothing taken), else the wait."""
        slot = self._slots.get(key_id)
        if slot is None or slot[1] is not rate:
            # A new key, or its limit changed: a fresh budget under the new limit.
            if slot is None and len(self._slots) >= _SLOT_PRUNE_AT:
                self._prune(now)
            slot = self._slots[key_id] = [now, rate]
        ahead: float = max(slot[0] - now, 0.0) + (cost - 1) * rate.interval
        return ahead - rate.tau if ahead > rate.tau else 0.0

    async def acquire(self, key_id: str, rate: Rate) -> float:
        return self.take(key_id, rate, self.monotonic())

    def state(self, key_id: str, rate: Rate) -> tuple[int, float]:
        now = self.monotonic()
        slot = self._slots.get(key_id)
        tat = slot[0] if slot is not None and slot[1] is rate and slot[0] > now else now
        return _remaining(rate, tat - now), tat - now

    def _prune(self, now: float) -> None:
        """Drop slots whose TAT has passed: they hold nothing a fresh slot would not."""
        for key_id in [k for k, slot in self._slots.items() if slot[0] <= now]:
            del self._slots[key_id]

    async def aclose(self) -> None:
        return None


def _remaining(rate: Rate, ahead: float) -> int:
    """Requests that would still pass when the TAT is ``ahead`` seconds in the future."""
    return max(0, min(rate.count, int((rate.period - ahead) / rate.interval + 1e-9)))
