"""The argon2 threads: bounded, unsuspected work first, errors and cancellation carried."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest

from keystile.argon2_pool import Argon2Pool

pytestmark = pytest.mark.anyio


class Gate:
    """A job that blocks its thread until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self) -> str:
        self.entered.set()
        assert self.open.wait(10)
        return "gate"

    async def wait_entered(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, 10)


async def test_waiting_jobs_of_unsuspected_ids_run_first() -> None:
    """With the one thread busy, a clean job queued after suspect ones runs before them."""
    pool = Argon2Pool(1)
    gate = Gate()
    order: list[str] = []

    def job(name: str) -> str:
        order.append(name)
        return name

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: pool.run(gate, suspect=True))
        await gate.wait_entered()
        for name, suspect in (("s1", True), ("s2", True), ("clean", False), ("s3", True)):
            tg.start_soon(lambda n=name, s=suspect: pool.run(lambda: job(n), suspect=s))
            await anyio.sleep(0)  # queued in this order
        gate.open.set()
    assert order == ["clean", "s1", "s2", "s3"]


async def test_never_more_threads_than_its_size() -> None:
    """Twenty jobs on a pool of two run at most two at a time, and all return."""
    pool = Argon2Pool(2)
    lock = threading.Lock()
    running = [0, 0]

    def job(i: int) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        threading.Event().wait(0.005)
        with lock:
            running[0] -= 1
        return i

    results: list[int] = []

    async def run(i: int) -> None:
        results.append(await pool.run(lambda: job(i), suspect=i % 2 == 0))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(run, i)
    assert sorted(results) == list(range(20))
    assert running[1] <= 2


async def test_an_error_in_the_job_is_raised_to_the_caller() -> None:
    """An exception in the thread reaches the awaiting task."""

    def boom() -> None:
        raise ValueError("bad hash")

    with pytest.raises(ValueError, match="bad hash"):
        await Argon2Pool(1).run(boom, suspect=False)


async def test_a_cancelled_caller_s_job_is_skipped_if_not_started() -> None:
    """A caller that goes away before its turn costs no argon2 run."""
    pool = Argon2Pool(1)
    gate = Gate()
    ran: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: pool.run(gate, suspect=False))
        await gate.wait_entered()
        async with anyio.create_task_group() as leaving:
            leaving.start_soon(lambda: pool.run(lambda: ran.append("abandoned"), suspect=False))
            await anyio.sleep(0)  # queued behind the gate
            leaving.cancel_scope.cancel()
        gate.open.set()
    assert await pool.run(lambda: "next", suspect=False) == "next"
    assert ran == []


def test_size_must_be_positive() -> None:
    """A pool of no threads would never verify anything."""
    with pytest.raises(ValueError):
        Argon2Pool(0)
