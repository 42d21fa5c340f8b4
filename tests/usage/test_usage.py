"""UsageRecorder: touches coalesce in memory and reach the store in batches."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone

import anyio
import pytest
from starlette.testclient import TestClient

from apps import protect
from keystile import CHEAPEST_PARAMETERS, KeyManager, KeyStore, StoreError
from keystile.stores import store_from_url
from keystile.usage import UsageRecorder

pytestmark = pytest.mark.anyio


class RecordingStore:
    """Wraps a store: records each touch_many batch and can fail on demand."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.batches: list[dict[str, datetime]] = []
        self.failures_left = 0

    async def touch_many(self, touches: Mapping[str, datetime]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise StoreError("down")
        await self.inner.touch_many(touches)
        self.batches.append(dict(touches))


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


async def make_keys(store: KeyStore, n: int) -> list[str]:
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    return [(await manager.create(owner="acme", name=f"k{i}")).id for i in range(n)]


async def test_touches_coalesce_latest_wins(store: KeyStore) -> None:
    """Many touches of few keys become one batch with the latest time per key."""
    ids = await make_keys(store, 3)
    wrapped = RecordingStore(store)
    recorder = UsageRecorder(wrapped)  # type: ignore[arg-type]
    for i in range(300):
        recorder.touch(ids[i % 3], 1_000_000 + i)
    recorder.touch(ids[0], 5)  # an older touch never wins
    assert recorder.pending == 3
    assert await recorder.flush() == 3
    assert len(wrapped.batches) == 1
    for key_id, expected in zip(ids, (1_000_297, 1_000_298, 1_000_299), strict=True):
        record = await store.get(key_id)
        assert record is not None and record.last_used_at == at(expected)


async def test_failed_flush_keeps_batch_and_merges_newer(store: KeyStore) -> None:
    """A failed flush loses nothing; touches made meanwhile merge, the newest winning."""
    ids = await make_keys(store, 2)
    wrapped = RecordingStore(store)
    wrapped.failures_left = 2
    recorder = UsageRecorder(wrapped)  # type: ignore[arg-type]
    recorder.touch(ids[0], 2_000_000)
    recorder.touch(ids[1], 2_000_000)
    for _ in range(2):
        with pytest.raises(StoreError):
            await recorder.flush()
    recorder.touch(ids[0], 2_000_100)
    assert recorder.pending == 2
    await recorder.flush()
    assert recorder.flush_failures == 2
    assert wrapped.batches == [{ids[0]: at(2_000_100), ids[1]: at(2_000_000)}]


async def test_flush_max_triggers_early_flush(store: KeyStore) -> None:
    """Reaching flush_max pending keys wakes the background task before the interval."""
    ids = await make_keys(store, 4)
    wrapped = RecordingStore(store)
    recorder = UsageRecorder(wrapped, flush_interval=3600, flush_max=4)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(recorder.run)
        await anyio.sleep(0)
        for key_id in ids:
            recorder.touch(key_id, 3_000_000)
        with anyio.fail_after(5):
            while not wrapped.batches:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert len(wrapped.batches[0]) == 4


async def test_background_retries_until_store_returns(store: KeyStore) -> None:
    """The background task retries a failing flush with backoff until it succeeds."""
    ids = await make_keys(store, 1)
    wrapped = RecordingStore(store)
    wrapped.failures_left = 3
    recorder = UsageRecorder(wrapped, flush_interval=0.01, max_backoff=0.05)  # type: ignore[arg-type]
    recorder.touch(ids[0], 4_000_000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(recorder.run)
        with anyio.fail_after(5):
            while not wrapped.batches:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert recorder.flush_failures == 3
    assert wrapped.batches == [{ids[0]: at(4_000_000)}]


def test_lifespan_shutdown_flushes_pending(sqlite_database_url: str) -> None:
    """Touches still pending at shutdown are written by the lifespan shutdown."""

    async def mint() -> str:
        store = store_from_url(sqlite_database_url)
        manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
        async with manager:
            return (await manager.create(owner="acme", name="k")).key

    key = anyio.run(mint)
    app = protect(store_from_url(sqlite_database_url), flush_interval=3600)
    with TestClient(app) as tc:
        assert tc.get("/whoami", headers={"X-API-Key": key}).status_code == 200
        assert app.recorder.pending == 1

    async def read() -> datetime | None:
        store = store_from_url(sqlite_database_url)
        await store.open()
        try:
            record = await store.get(key.split("_")[1])
            return record.last_used_at if record else None
        finally:
            await store.close()

    assert app.recorder.pending == 0
    assert anyio.run(read) is not None


async def test_pending_counts_a_flush_under_way(store: KeyStore) -> None:
    """A batch being written still counts as pending until it lands."""
    ids = await make_keys(store, 2)
    seen: list[int] = []

    class Observing(RecordingStore):
        async def touch_many(self, touches: Mapping[str, datetime]) -> None:
            seen.append(recorder.pending)
            await super().touch_many(touches)

    recorder = UsageRecorder(Observing(store))  # type: ignore[arg-type]
    recorder.touch(ids[0], 5_000_000)
    recorder.touch(ids[1], 5_000_000)
    await recorder.flush()
    assert seen == [2]
    assert recorder.pending == 0
