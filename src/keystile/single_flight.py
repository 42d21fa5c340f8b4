"""SingleFlight: one run of a piece of work per key at a time; callers that ask for the
same key meanwhile wait for that run and share its answer.

The verifier proves each token once however many requests bring it at once, and
refreshes a key's state once however many hits find it stale. A refusal
(``AuthenticationError``) is shared with the waiters, each getting its own copy; a leader
that was cancelled or failed otherwise shares nothing, and its waiters run the work again.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

from .errors import AuthenticationError

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _Interrupted(Exception):
    """The leader of a single flight was cancelled; followers retry."""


@dataclass(slots=True)
class _Flight(Generic[T]):
    #: Made by the first follower: a flight nobody waits for makes no event.
    done: anyio.Event | None = None
    result: T | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class SingleFlight(Generic[T]):
    flights: dict[Hashable, _Flight[T]] = field(default_factory=dict)

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        while True:
            flight = self.flights.get(key)
            if flight is None:
                break
            if flight.done is None:
                flight.done = anyio.Event()
            await flight.done.wait()
            if isinstance(flight.error, _Interrupted):
                continue
            if flight.error is not None:
                raise copy.copy(flight.error)
            assert flight.result is not None
            return flight.result
        flight = self.flights[key] = _Flight()
        try:
            flight.result = await work()
            return flight.result
        except AuthenticationError as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.error = _Interrupted()
            raise
        finally:
            del self.flights[key]
            if flight.done is not None:
                flight.done.set()
