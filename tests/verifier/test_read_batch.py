"""ReadBatcher (``read_batch.py``): point reads that arrive together become one read."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from keystile.read_batch import ReadBatcher

pytestmark = pytest.mark.anyio


class Source:
    """``read_many`` over a dict, recording each call; reads wait while ``gate`` is shut."""

    def __init__(self, values: Mapping[str, int]) -> None:
        self.values = dict(values)
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def read_many(self, keys: list[str]) -> dict[str, int]:
        self.calls.append(keys)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: self.values[k] for k in keys if k in self.values}


async def settle() -> None:
    """Let every ready task run until none is left."""
    for _ in range(10):
        await asyncio.sleep(0)


async def gets(batcher: ReadBatcher[str, int], *keys: str) -> list[asyncio.Task[int | None]]:
    """``get``s of ``keys`` started, run as far as they go."""
    tasks = [asyncio.create_task(batcher.get(key)) for key in keys]
    await settle()
    return tasks


async def held(
    batcher: ReadBatcher[str, int], source: Source, key: str
) -> asyncio.Task[int | None]:
    """A ``get`` of ``key`` whose read is in flight, held at the source's shut gate."""
    source.gate.clear()
    (task,) = await gets(batcher, key)
    return task


async def test_a_lone_read_asks_for_its_key_alone_and_at_once() -> None:
    source = Source({"a": 1})
    batcher = ReadBatcher(source.read_many)
    assert await batcher.get("a") == 1
    assert await batcher.get("missing") is None
    assert source.calls == [["a"], ["missing"]]


async def test_the_gets_that_come_while_a_read_is_in_flight_share_one_read() -> None:
    source = Source({f"k{i}": i for i in range(20)})
    batcher = ReadBatcher(source.read_many, max_in_flight=1)
    first = await held(batcher, source, "k0")
    rest = await gets(batcher, *(f"k{i}" for i in range(1, 20)), "nobody")
    assert source.calls == [["k0"]]
    source.gate.set()
    assert await first == 0
    assert [await t for t in rest] == [*range(1, 20), None]
    assert source.calls == [["k0"], [*(f"k{i}" for i in range(1, 20)), "nobody"]]
    assert (batcher.reads, batcher.keys_read) == (2, 21)


async def test_a_burst_joins_one_read_without_waiting_for_the_one_in_flight() -> None:
    """Below ``max_in_flight``, a batch waits for the ready tasks, not for earlier reads."""
    source = Source({f"k{i}": i for i in range(6)})
    batcher = ReadBatcher(source.read_many, max_in_flight=4)
    slow = await held(batcher, source, "k0")
    burst = await gets(batcher, *(f"k{i}" for i in range(1, 6)))
    assert source.calls == [["k0"], ["k1", "k2", "k3", "k4", "k5"]]
    source.gate.set()
    assert [await t for t in burst] == [1, 2, 3, 4, 5]
    assert await slow == 0


async def test_one_slow_read_holds_up_no_other() -> None:
    source = Source({"slow": 1, "quick": 2})
    blocked = asyncio.Event()

    async def read_many(keys: list[str]) -> dict[str, int]:
        if keys == ["slow"]:
            await blocked.wait()
        return await source.read_many(keys)

    batcher = ReadBatcher(read_many)
    slow = asyncio.create_task(batcher.get("slow"))
    await settle()
    assert await asyncio.wait_for(batcher.get("quick"), 5) == 2
    assert not slow.done()
    blocked.set()
    assert await slow == 1


async def test_a_failed_read_fails_every_caller_of_its_batch_with_its_own_copy() -> None:
    source = Source({"a": 1, "b": 2})
    batcher = ReadBatcher(source.read_many, max_in_flight=1)
    first = await held(batcher, source, "a")
    joined = await gets(batcher, "a", "b")
    source.fail = RuntimeError("store down")
    source.gate.set()
    errors = await asyncio.gather(first, *joined, return_exceptions=True)
    assert all(isinstance(e, RuntimeError) and str(e) == "store down" for e in errors)
    assert errors[1] is not errors[2]
    source.fail = None
    assert await batcher.get("b") == 2


async def test_a_leader_cancelled_before_it_read_leaves_its_batch_to_read_again() -> None:
    source = Source({"a": 1, "b": 2})
    batcher = ReadBatcher(source.read_many, max_in_flight=1)
    first = await held(batcher, source, "a")
    (leader,) = await gets(batcher, "a")
    (follower,) = await gets(batcher, "b")
    leader.cancel()
    await settle()
    source.gate.set()
    assert await asyncio.wait_for(follower, 5) == 2
    assert await first == 1
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_a_full_batch_starts_another() -> None:
    source = Source({f"k{i}": i for i in range(5)})
    batcher = ReadBatcher(source.read_many, max_batch=2, max_in_flight=1)
    source.gate.clear()
    tasks = [asyncio.create_task(batcher.get(f"k{i}")) for i in range(5)]
    await settle()
    source.gate.set()
    assert [await t for t in tasks] == [0, 1, 2, 3, 4]
    assert all(len(keys) <= 2 for keys in source.calls)
    assert sorted(k for keys in source.calls for k in keys) == [f"k{i}" for i in range(5)]


def test_a_read_left_in_flight_by_a_closed_loop_is_not_waited_for() -> None:
    """A loop closed with a read unfinished (its task never resumed) blocks no later loop."""
    source = Source({"a": 1})
    batcher = ReadBatcher(source.read_many, max_in_flight=1)
    dead = asyncio.new_event_loop()
    source.gate = asyncio.Event()
    stuck = dead.create_task(batcher.get("a"))
    dead.run_until_complete(asyncio.sleep(0.01))
    assert not stuck.done()
    dead.close()

    async def later() -> int | None:
        source.gate = asyncio.Event()
        source.gate.set()
        return await asyncio.wait_for(batcher.get("a"), 5)

    assert asyncio.run(later()) == 1


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReadBatcher(Source({}).read_many, max_batch=0)
    with pytest.raises(ValueError, match="at least 1"):
        ReadBatcher(Source({}).read_many, max_in_flight=0)
