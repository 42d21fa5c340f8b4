"""ReadBatcher: the point reads that arrive together, made as one read of many.

After a deploy every worker gets a burst of misses at once. Each reads its key's record
from the store and, with a verification memo, its entry from Redis. One at a time, every
miss pays a round trip, a pool checkout and the client library's per-call work: with the
memo, that is most of what a fleet's warm-up costs (``benchmarks/fleet.py``).

A caller that finds no read in flight reads at once, alone: a lone miss waits for
nobody. One that finds reads in flight leads a batch that every caller coming meanwhile
joins: it lets the tasks that are ready run once (the rest of a burst), and if
``max_in_flight`` reads are still in flight it waits for one to finish, the batch open
all the while; then it makes one read for all of them and hands each its value. So the
busier the loop, the larger the batches: a burst costs a few reads, not one per miss,
and one slow read holds up no other.

A failed read fails every caller of the batch with a copy of its exception. A leader
cancelled before it answered fails nobody: the others read again.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_IN_FLIGHT", "ReadBatcher"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Keys one read asks for at most; a caller that finds the open batch full leads another.
DEFAULT_MAX_BATCH = 128
#: Reads in flight at once, per event loop.
DEFAULT_MAX_IN_FLIGHT = 4


class _Interrupted(Exception):
    """The leader was cancelled before it read: its followers read again."""


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


@dataclass(slots=True, eq=False)
class _Batch(Generic[K, V]):
    keys: dict[K, None] = field(default_factory=dict)
    #: One future per caller that joined (none for a lone read: nothing to make).
    joined: list[asyncio.Future[None]] = field(default_factory=list)
    values: Mapping[K, V] | None = None
    error: BaseException | None = None


@dataclass(slots=True, eq=False)
class _Read:
    """A read in flight, and the leaders waiting for it to end."""

    loop: asyncio.AbstractEventLoop
    waiting: list[asyncio.Future[None]] = field(default_factory=list)


class ReadBatcher(Generic[K, V]):
    """``await batcher.get(key)``: ``read_many(keys)``'s value for ``key``, or ``None``
    when it has none, shared with every ``get`` that arrived meanwhile."""

    def __init__(
        self,
        read_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self.read_many = read_many
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        #: Reads made, and keys they asked for: their ratio is the mean batch.
        self.reads = 0
        self.keys_read = 0
        self._open: _Batch[K, V] | None = None
        self._in_flight: list[_Read] = []

    async def get(self, key: K) -> V | None:
        while True:
            batch = self._open
            if batch is None or len(batch.keys) >= self.max_batch:
                return await self._lead(key)
            batch.keys[key] = None
            joined = asyncio.get_running_loop().create_future()
            batch.joined.append(joined)
            await joined
            if isinstance(batch.error, _Interrupted):
                continue
            if batch.error is not None:
                raise copy.copy(batch.error)
            assert batch.values is not None
            return batch.values.get(key)

    async def _lead(self, key: K) -> V | None:
        batch: _Batch[K, V] = _Batch()
        batch.keys[key] = None
        self._open = batch
        read: _Read | None = None
        try:
            try:
                read = await self._turn()
            finally:
                if self._open is batch:
                    self._open = None
            keys = list(batch.keys)
            self.reads += 1
            self.keys_read += len(keys)
            batch.values = values = await self.read_many(keys)
        except Exception as exc:
            batch.error = exc
            raise
        except BaseException:
            batch.error = _Interrupted()
            raise
        finally:
            _wake(batch.joined)
            if read is not None:
                if read in self._in_flight:
                    self._in_flight.remove(read)
                _wake(read.waiting)
        return values.get(key)

    async def _turn(self) -> _Read:
        """Wait for a free place among the reads in flight; then this caller's read is
        one. With reads in flight, the tasks that are ready run once first, so a burst's
        misses join. Reads left in flight by another loop (one that closed without
        finishing them) are forgotten, not waited for."""
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            mine = [read for read in self._in_flight if read.loop is loop]
            if len(mine) < len(self._in_flight):
                self._in_flight = mine
            if len(mine) >= self.max_in_flight:
                ended = loop.create_future()
                mine[0].waiting.append(ended)
                await ended
            elif mine and not waited:
                await asyncio.sleep(0)
            else:
                break
            waited = True
        read = _Read(loop)
        self._in_flight.append(read)
        return read
