"""State changes racing verifications, and floods of misses, on every store."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread
import pytest

from keystile import (
    CHEAPEST_PARAMETERS,
    AuthenticationError,
    CreatedKey,
    KeyManager,
    KeyRecord,
    KeyStore,
    store_from_url,
)
from keystile.errors import InvalidToken, ServiceUnavailable
from keystile.hashing import SecretHasher
from keystile.tokens import generate_key
from keystile.verifier import Verifier

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]


class GatedHasher(SecretHasher):
    """argon2 that, for the hashes in ``gated``, waits until the test opens the gate, so a
    test can act while a verification is in flight."""

    __slots__ = ("entered", "gate", "gated")

    def __init__(self) -> None:
        super().__init__(CHEAPEST_PARAMETERS)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.gated: set[str] = set()

    def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        if secret_hash in self.gated:
            self.entered.release()
            self.gate.wait(10)
        return super().verify(secret_hash, secret)

    async def wait_entered(self, times: int = 1) -> None:
        for _ in range(times):
            assert await anyio.to_thread.run_sync(self.entered.acquire, True, 10)


class GatedReads:
    """A real store whose batched read, once armed, holds its result until released."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.armed = False
        self.read_done = anyio.Event()
        self.release = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        records = await self.inner.get_many(key_ids)
        if self.armed:
            self.read_done.set()
            await self.release.wait()
        return records


@pytest.fixture
async def manager(database_url: str) -> AsyncIterator[KeyManager]:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as manager:
        yield manager


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[KeyStore]:
    """The verifier's own store of the same database, as a middleware would have."""
    store = store_from_url(database_url)
    await store.open()
    yield store
    await store.close()


def listening(verifier: Verifier) -> Any:
    """Subscribe the verifier to the store's changes, as the middleware does."""
    return verifier.store.subscribe(verifier.on_change)


async def test_revoke_during_verification_refuses_later_requests(
    manager: KeyManager, store: KeyStore
) -> None:
    """A request that joins a verification in flight after revoke() returned is refused."""
    key = await manager.create(owner="acme", name="ci")
    hasher = GatedHasher()
    hasher.gated.add(key.record.secret_hash)
    v = Verifier(store, hasher=hasher)
    unsubscribe = listening(v)
    outcomes: dict[str, object] = {}

    async def request(label: str) -> None:
        try:
            outcomes[label] = await v.verify(key.key.encode())
        except AuthenticationError as exc:
            outcomes[label] = exc

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "before")
            await hasher.wait_entered()
            assert await manager.revoke(key.id, owner="acme") is True
            tg.start_soon(request, "after")
            await anyio.sleep(0)  # let it join the flight before argon2 finishes
            hasher.gate.set()
    finally:
        unsubscribe()
    after = outcomes["after"]
    assert isinstance(after, InvalidToken) and after.reason == "revoked"
    assert isinstance(outcomes["before"], InvalidToken)
    assert v.cache.get(key.id) is None


async def test_state_refresh_overlapping_rotation_keeps_the_grace_expiry(
    manager: KeyManager, store: KeyStore
) -> None:
    """A batched refresh that read the key before a rotation does not write back the old
    (unlimited) expiry over the grace expiry cached after it."""
    key = await manager.create(owner="acme", name="deploy")
    gated = GatedReads(store)
    now = [1000.0]
    wall = [0.0]
    v = Verifier(
        gated,  # type: ignore[arg-type]
        hasher=SecretHasher(CHEAPEST_PARAMETERS),
        cache_ttl=10,
        monotonic=lambda: now[0],
        clock=lambda: anyio_wall(wall),
    )
    unsubscribe = listening(v)
    try:
        await v.verify(key.key.encode())
        now[0] += 6  # older than half the TTL: due for a background refresh
        gated.armed = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(v.refresh_stale)
            await gated.read_done.wait()  # it holds the pre-rotation state
            await manager.rotate(key.id, owner="acme", grace=timedelta(seconds=1))
            await v.verify(key.key.encode())  # re-proven, with the grace expiry
            gated.release.set()
        entry = v.cache.get(key.id)
        assert entry is not None and entry.expires_at is not None
        wall[0] += 2  # past the grace period
        with pytest.raises(InvalidToken) as refused:
            await v.verify(key.key.encode())
        assert refused.value.reason == "expired"
    finally:
        unsubscribe()


def anyio_wall(offset: list[float]) -> float:
    import time

    return time.time() + offset[0]


async def test_one_key_flood_does_not_starve_other_keys(
    manager: KeyManager, store: KeyStore
) -> None:
    """Distinct wrong secrets for one key id get 503 past a small per-id queue, and another
    key's first request is still verified."""
    flooded = await manager.create(owner="tenant-a", name="ci")
    other = await manager.create(owner="tenant-b", name="ci")
    hasher = GatedHasher()
    hasher.gated.add(flooded.record.secret_hash)
    v = Verifier(store, hasher=hasher, argon2_concurrency=2, max_pending_verifications=8)
    statuses: list[str] = []

    async def guess() -> None:
        wrong, _ = generate_key("ks", flooded.id)
        try:
            await v.verify(wrong.encode())
            statuses.append("ok")
        except ServiceUnavailable:
            statuses.append("503")
        except InvalidToken:
            statuses.append("401")

    result: list[CreatedKey | str] = []
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(guess)
        await hasher.wait_entered()
        with anyio.fail_after(5):
            while statuses.count("503") < 20 - 1 - v.per_key_pending:
                await anyio.sleep(0.01)
        try:
            entry = await v.verify(other.key.encode())
            result.append(entry.key_id)
        except ServiceUnavailable:
            result.append("503")
        hasher.gate.set()
    assert result == [other.id]
    assert statuses.count("503") == 20 - 1 - v.per_key_pending
    assert statuses.count("401") == 1 + v.per_key_pending


async def test_overload_answer_does_not_depend_on_key_existence(
    manager: KeyManager, store: KeyStore
) -> None:
    """With every miss slot taken, a real key id and an unknown one both get 503."""
    busy = [await manager.create(owner="acme", name=f"busy-{i}") for i in range(2)]
    real = await manager.create(owner="acme", name="probe")
    hasher = GatedHasher()
    hasher.gated.update(k.record.secret_hash for k in busy)
    v = Verifier(store, hasher=hasher, argon2_concurrency=2, max_pending_verifications=2)
    answers: dict[str, str] = {}

    async def probe(label: str, token: str) -> None:
        try:
            await v.verify(token.encode())
            answers[label] = "200"
        except AuthenticationError as exc:
            answers[label] = f"{exc.status_code} {exc.reason}"

    async with anyio.create_task_group() as tg:
        for k in busy:
            tg.start_soon(v.verify, k.key.encode())
        await hasher.wait_entered(2)
        await probe("real id, wrong secret", generate_key("ks", real.id)[0])
        await probe("unknown id", generate_key("ks")[0])
        hasher.gate.set()
    assert answers == {
        "real id, wrong secret": "503 overloaded",
        "unknown id": "503 overloaded",
    }
