"""Delivery by whole processes on one database: two workers on Postgres (and on SQLite)
send each delivery once; a worker killed mid-delivery leaves it to the next one, which
sends it once its claim has run out."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.stores import store_from_url
from loopback import serving
from webhook_receiver import Receiver

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).resolve().parents[1] / "webhook_receiver.py"


@contextmanager
def workers(database_url: str, count: int, *options: str) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` delivery processes on ``database_url``, each ready when yielded."""
    argv = [sys.executable, str(WORKER), "--database-url", database_url, *options]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == '"ready"'
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


async def changes(database_url: str, receiver: Receiver, base: str, count: int) -> None:
    """A webhook to the receiver, then ``count`` created keys (one delivery each)."""
    store = store_from_url(database_url)
    await store.open()
    try:
        keys = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
        created = await keys.add_webhook(base + "/hook", allow_private_networks=True)
        receiver.secret = created.secret
        for n in range(count):
            await keys.create(owner="acme", name=f"k{n}")
    finally:
        await store.close()


async def two_workers_send_each_once(database_url: str) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        with workers(database_url, 2):
            await changes(database_url, receiver, base, 30)
            await receiver.wait_for(30, timeout=60)
            # Give a second send a chance to show up before counting.
            await changes_settled(database_url, 30)
    assert receiver.refused == 0
    assert len(receiver.ids) == 30
    assert set(receiver.ids.values()) == {1}, receiver.ids.most_common(3)


async def changes_settled(database_url: str, count: int, timeout: float = 30.0) -> None:
    """Wait until ``count`` deliveries are recorded as delivered."""
    store = store_from_url(database_url)
    await store.open()
    try:
        with anyio.fail_after(timeout):
            while [d.status for d in await store.list_deliveries()].count("delivered") < count:
                await anyio.sleep(0.05)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_two_processes_on_postgres_send_each_delivery_once(
    postgres_database_url: str,
) -> None:
    await two_workers_send_each_once(postgres_database_url)


async def test_two_processes_on_sqlite_send_each_delivery_once(sqlite_database_url: str) -> None:
    await two_workers_send_each_once(sqlite_database_url)


async def test_a_delivery_whose_process_was_killed_arrives_after_a_restart_sqlite(
    sqlite_database_url: str,
) -> None:
    await killed_mid_delivery(sqlite_database_url)


@pytest.mark.postgres
async def test_a_delivery_whose_process_was_killed_arrives_after_a_restart_postgres(
    postgres_database_url: str,
) -> None:
    await killed_mid_delivery(postgres_database_url)


async def killed_mid_delivery(database_url: str) -> None:
    receiver = Receiver()
    receiver.hold = anyio.Event()
    lease = ("--lease", "2", "--timeout", "1")
    async with serving(receiver.app()) as base:
        with workers(database_url, 1, *lease) as [first]:
            await changes(database_url, receiver, base, 1)
            with anyio.fail_after(30):
                await receiver.arrived.wait()
            first.kill()
            first.wait(timeout=10)
        receiver.hold.set()
        receiver.hold = None
        assert receiver.received == []
        with workers(database_url, 1, *lease):
            [message] = await receiver.wait_for(1, timeout=60)
            await changes_settled(database_url, 1)
    assert message["type"] == "key.created"
    assert len(receiver.ids) == 1
