"""argon2 verifications on at most ``size`` worker threads, the unsuspected first.

A miss waits for a turn on the event loop and then runs argon2 in a worker thread
(``anyio.to_thread`` behind a ``CapacityLimiter`` of the same size, so the thread pool
is bounded too). A free turn goes to the first waiting miss that is not suspect, and
only when none waits to the first suspect (``admission.py``): a tenant's first request
waits for the verifications running, not for a flood's queue. Turns are handed over on
the loop, so argon2 keeps pace with what the loop can answer rather than outrunning the
store reads behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread

__all__ = ["Argon2Pool"]

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Turn:
    """A miss waiting for a turn; ``granted`` once handed one (then it must give it back)."""

    suspect: bool
    ready: anyio.Event
    granted: bool = False


class Argon2Pool:
    """``await run(fn, suspect=...)``: ``fn`` in a worker thread once a turn is free."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("argon2_concurrency must be at least 1")
        self.size = size
        self._running = 0
        self._turns: list[_Turn] = []
        self._limiter: tuple[asyncio.AbstractEventLoop, anyio.CapacityLimiter] | None = None

    async def run(self, fn: Callable[[], T], *, suspect: bool) -> T:
        if self._running < self.size and not self._turns:
            self._running += 1
        else:
            turn = _Turn(suspect, anyio.Event())
            self._turns.append(turn)
            try:
                await turn.ready.wait()
            except BaseException:
                if turn.granted:
                    self._release()
                else:
                    self._turns.remove(turn)
                raise
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._get_limiter())
        finally:
            self._release()

    def _release(self) -> None:
        self._running -= 1
        if self._turns:
            turn = next((t for t in self._turns if not t.suspect), self._turns[0])
            self._turns.remove(turn)
            turn.granted = True
            self._running += 1
            turn.ready.set()

    def _get_limiter(self) -> anyio.CapacityLimiter:
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter[0] is not loop:
            self._limiter = (loop, anyio.CapacityLimiter(self.size))
        return self._limiter[1]
