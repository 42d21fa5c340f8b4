"""Verifier: the request pipeline of ``docs/architecture.md`` without ASGI."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

import anyio
import pytest
from prometheus_client import CollectorRegistry

from apps import client, protect
from keystile import (
    CHEAPEST_PARAMETERS,
    Argon2Parameters,
    CreatedKey,
    KeyManager,
    KeyRecord,
    MemoryKeyStore,
    StoreError,
)
from keystile.errors import InvalidToken, ServiceUnavailable
from keystile.hashing import SecretHasher
from keystile.metrics import PrometheusMetrics
from keystile.stores.records import utcnow
from keystile.tokens import generate_key
from keystile.verifier import Verifier

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]


class CountingStore(MemoryKeyStore):
    """A memory store that counts reads and can be switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.batch_reads: list[int] = []
        self.down = False

    async def get(self, key_id: str) -> KeyRecord | None:
        self.gets += 1
        if self.down:
            raise StoreError("down")
        return await super().get(key_id)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        self.batch_reads.append(len(key_ids))
        if self.down:
            raise StoreError("down")
        return await super().get_many(key_ids)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
async def key(store: CountingStore) -> CreatedKey:
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    created = await manager.create(owner="acme", name="laptop", scopes=["read"])
    store.gets = 0
    return created


def verifier(store: CountingStore, **options: object) -> Verifier:
    return Verifier(store, hasher=SecretHasher(CHEAPEST_PARAMETERS), **options)  # type: ignore[arg-type]


@pytest.fixture
def built_by_a_fixture(store: CountingStore) -> Verifier:
    return verifier(store)


async def test_the_hit_path_reaches_what_fixtures_build(
    built_by_a_fixture: Verifier, hit_path: str
) -> None:
    """``usefixtures("hit_path")`` sets the path before any fixture a test names, so a
    verifier a fixture builds is on it too: this module's tests hold on both paths."""
    assert built_by_a_fixture.cache.compiled == (hit_path == "compiled")


async def test_second_verify_is_a_cache_hit(store: CountingStore, key: CreatedKey) -> None:
    """The first verify reads the store and runs argon2; the second does neither."""
    v = verifier(store)
    first = await v.verify(key.key.encode())
    second = await v.verify(key.key.encode())
    assert first == second and first.user is second.user  # the same principal, not re-read
    assert v.counters.argon2_verifications == 1
    assert (v.counters.cache_misses, v.counters.cache_hits) == (1, 1)
    assert store.gets == 1


class GatedStore(CountingStore):
    """Reads wait until ``gate`` opens: a store whose round trips take time."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()

    async def get(self, key_id: str) -> KeyRecord | None:
        await self.gate.wait()
        return await super().get(key_id)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        await self.gate.wait()
        return await super().get_many(key_ids)


async def test_misses_that_arrive_together_share_store_reads() -> None:
    """A burst of misses costs a few store reads, not one each, and each miss is answered
    with its own key: the unknown id among them alone is refused."""
    store = GatedStore()
    store.gate.set()
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    keys = [await manager.create(owner="acme", name=f"k{i}") for i in range(30)]
    store.gate, store.gets = anyio.Event(), 0
    unknown = generate_key()[0]
    v = verifier(store)
    answers: dict[int, object] = {}

    async def miss(i: int, token: str) -> None:
        try:
            answers[i] = (await v.verify(token.encode())).key_id
        except InvalidToken as exc:
            answers[i] = exc.reason

    async with anyio.create_task_group() as tg:
        for i, token in enumerate([*(k.key for k in keys), unknown]):
            tg.start_soon(miss, i, token)
        for _ in range(1000):
            if v.pending_verifications == 31:
                break
            await anyio.sleep(0)
        assert v.pending_verifications == 31
        store.gate.set()
    assert answers == {**{i: k.id for i, k in enumerate(keys)}, 30: "unknown"}
    assert store.gets + sum(store.batch_reads) == 31
    assert store.gets + len(store.batch_reads) <= 8


async def test_concurrent_first_requests_share_one_argon2(
    store: CountingStore, key: CreatedKey
) -> None:
    """200 concurrent first requests with one key cause exactly one argon2 verify."""
    app = protect(store)
    statuses: list[int] = []
    async with client(app) as c:

        async def call() -> None:
            r = await c.get("/whoami", headers={"X-API-Key": key.key})
            statuses.append(r.status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)
    await app.aclose()
    assert statuses == [200] * 200
    assert app.verifier.counters.argon2_verifications == 1
    assert store.gets == 1


async def test_malformed_never_reaches_store(store: CountingStore) -> None:
    """Malformed and bad-checksum tokens are rejected without a store read."""
    v = verifier(store)
    good, _ = generate_key()
    for token, reason in [(b"nope", "malformed"), (good[:-1].encode() + b"!", "malformed")]:
        with pytest.raises(InvalidToken) as err:
            await v.verify(token)
        assert err.value.reason == reason
    flipped = good[:-1] + ("A" if good[-1] != "A" else "B")
    with pytest.raises(InvalidToken) as err:
        await v.verify(flipped.encode())
    assert err.value.reason == "bad_checksum"
    assert store.gets == 0


async def test_negative_cache_answers_repeats(store: CountingStore, key: CreatedKey) -> None:
    """A rejected token is answered from the negative cache until negative_ttl passes."""
    now = [0.0]
    v = verifier(store, negative_ttl=10)
    v.monotonic = lambda: now[0]
    wrong, _ = generate_key(key_id=key.id)
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await v.verify(wrong.encode())
    assert v.counters.argon2_verifications == 1
    assert v.counters.negative_hits == 2
    now[0] = 11
    with pytest.raises(InvalidToken):
        await v.verify(wrong.encode())
    assert v.counters.argon2_verifications == 2


async def test_replayed_refusals_leave_the_hit_ratio_alone(store: CountingStore) -> None:
    """A revoked, an unknown and a malformed key replayed many times count as negative-cache
    answers (or rejects), never as cache misses: the hit ratio, in stats() and in the
    Prometheus gauge, stays where the keys the cache can hold put it."""
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    valid = await manager.create(owner="acme", name="api")
    revoked = await manager.create(owner="acme", name="old")
    await manager.revoke(revoked.id, owner="acme")
    registry = CollectorRegistry()
    app = protect(store, metrics=PrometheusMetrics(registry))
    unknown = generate_key()[0]
    async with client(app) as http:

        async def send(key: str, times: int) -> set[int]:
            return {
                (await http.get("/whoami", headers={"X-API-Key": key})).status_code
                for _ in range(times)
            }

        assert await send(valid.key, 10) == {200}
        assert await send(revoked.key, 1) == await send(unknown, 1) == {401}
        before = app.stats()
        assert (before.cache_hits, before.cache_misses) == (9, 3)
        assert await send(revoked.key, 50) == await send(unknown, 50) == {401}
        assert await send(unknown[:-1] + "!", 20) == {401}
        after = app.stats()
    await app.aclose()
    assert (after.cache_hits, after.cache_misses) == (9, 3)
    assert after.hit_ratio == before.hit_ratio == 0.75
    assert after.negative_hits == before.negative_hits + 100
    assert registry.get_sample_value("keystile_cache_hit_ratio") == 0.75
    assert registry.get_sample_value("keystile_negative_hits_total") == after.negative_hits


async def test_wrong_secret_and_unknown_share_a_description(
    store: CountingStore, key: CreatedKey
) -> None:
    """wrong_secret and unknown differ only in the internal reason."""
    v = verifier(store)
    wrong, _ = generate_key(key_id=key.id)
    unknown, _ = generate_key()
    with pytest.raises(InvalidToken) as a:
        await v.verify(wrong.encode())
    with pytest.raises(InvalidToken) as b:
        await v.verify(unknown.encode())
    assert (a.value.reason, b.value.reason) == ("wrong_secret", "unknown")
    assert a.value.description == b.value.description


async def test_overload_refuses_quickly(store: CountingStore, key: CreatedKey) -> None:
    """Past max_pending_verifications, a miss is refused with 503 instead of queueing."""
    v = verifier(store, max_pending_verifications=0)
    with pytest.raises(ServiceUnavailable) as err:
        await v.verify(key.key.encode())
    assert err.value.reason == "overloaded"
    assert v.counters.argon2_verifications == 0


async def test_store_down_on_miss(store: CountingStore, key: CreatedKey) -> None:
    """A store error on a miss is ServiceUnavailable, and is not negative-cached."""
    v = verifier(store)
    store.down = True
    with pytest.raises(ServiceUnavailable):
        await v.verify(key.key.encode())
    store.down = False
    assert (await v.verify(key.key.encode())).key_id == key.id


async def test_state_refresh_after_ttl_without_argon2(
    store: CountingStore, key: CreatedKey
) -> None:
    """After cache_ttl the state is re-read from the store; argon2 does not run again."""
    now = [0.0]
    v = verifier(store, cache_ttl=10)
    v.monotonic = lambda: now[0]
    await v.verify(key.key.encode())
    now[0] = 11
    await v.verify(key.key.encode())
    assert v.counters.argon2_verifications == 1
    assert v.counters.state_refreshes == 1
    assert store.gets == 2


async def test_stale_entry_served_while_store_down(store: CountingStore, key: CreatedKey) -> None:
    """A proven key keeps working through an outage for stale_if_error past the TTL."""
    now = [0.0]
    v = verifier(store, cache_ttl=10, stale_if_error=100)
    v.monotonic = lambda: now[0]
    await v.verify(key.key.encode())
    store.down = True
    now[0] = 50
    assert (await v.verify(key.key.encode())).key_id == key.id
    assert v.counters.stale_served == 1
    now[0] = 111
    with pytest.raises(ServiceUnavailable):
        await v.verify(key.key.encode())


async def test_batched_refresh_reads_many_in_one_call(store: CountingStore) -> None:
    """refresh_stale re-reads every ageing entry in one get_many call."""
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    keys = [await manager.create(owner="acme", name=f"k{i}") for i in range(5)]
    now = [0.0]
    v = verifier(store, cache_ttl=10)
    v.monotonic = lambda: now[0]
    store.gets = 0
    for k in keys:
        await v.verify(k.key.encode())
    await manager.revoke(keys[0].id, owner="acme")  # the bus is not wired: cache unaware
    now[0] = 6
    assert await v.refresh_stale() == 5
    assert store.batch_reads == [5]
    assert len(v.cache) == 4
    for k in keys[1:]:
        await v.verify(k.key.encode())
    assert store.gets == 5  # no per-request reads after the batch refresh


async def test_idle_entries_leave(store: CountingStore, key: CreatedKey) -> None:
    """An entry unused for cache_idle leaves the cache."""
    now = [0.0]
    v = verifier(store, cache_idle=100)
    v.monotonic = lambda: now[0]
    await v.verify(key.key.encode())
    now[0] = 50
    assert v.evict_idle() == 0
    now[0] = 151
    assert v.evict_idle() == 1
    assert len(v.cache) == 0


async def test_cache_max_size_is_honoured(store: CountingStore) -> None:
    """The cache never holds more than cache_max_size keys."""
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    v = verifier(store, cache_max_size=3)
    for i in range(6):
        created = await manager.create(owner="acme", name=f"k{i}")
        await v.verify(created.key.encode())
        assert len(v.cache) <= 3
    assert len(v.cache) == 3


async def test_on_change_none_rereads_every_key_without_argon2(
    store: CountingStore, key: CreatedKey
) -> None:
    """A gap in change events (listener reconnect) makes every cached key's state stale:
    the next use reads the store again, and argon2 does not run again."""
    v = verifier(store)
    await v.verify(key.key.encode())
    reads = store.gets
    v.on_change(None)
    assert v.counters.cache_resets == 1
    assert v.hit(key.key.encode()) is None  # not served from the cache as it was
    await v.verify(key.key.encode())
    assert store.gets == reads + 1
    assert v.counters.argon2_verifications == 1


async def test_on_change_none_makes_a_revocation_missed_meanwhile_count(
    store: CountingStore, key: CreatedKey
) -> None:
    """A key revoked while nobody listened is refused after the gap is reported."""
    v = verifier(store)
    await v.verify(key.key.encode())
    store._rows[key.id] = dataclasses.replace(store._rows[key.id], revoked_at=utcnow())
    v.on_change(None)
    with pytest.raises(InvalidToken) as refused:
        await v.verify(key.key.encode())
    assert refused.value.reason == "revoked"


async def test_revoked_during_verification_is_not_cached(
    store: CountingStore, key: CreatedKey
) -> None:
    """A revocation committed while argon2 runs refuses that verification and caches nothing."""

    class RevokingHasher(SecretHasher):
        __slots__ = ()

        def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
            result = super().verify(secret_hash, secret)
            # Another process commits a revoke, and its NOTIFY evicts the key here.
            record = store._rows[key.id]
            store._rows[key.id] = dataclasses.replace(record, revoked_at=utcnow())
            v.cache.evict(key.id)
            return result

    v = Verifier(store, hasher=RevokingHasher(CHEAPEST_PARAMETERS))
    with pytest.raises(InvalidToken) as refused:
        await v.verify(key.key.encode())
    assert refused.value.reason == "revoked"
    assert len(v.cache) == 0


async def test_eviction_during_verification_rereads_and_caches_fresh_state(
    store: CountingStore, key: CreatedKey
) -> None:
    """An eviction while argon2 runs makes the verifier read the key again before caching."""

    class EvictingHasher(SecretHasher):
        __slots__ = ()

        def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
            result = super().verify(secret_hash, secret)
            v.cache.evict(key.id)
            return result

    v = Verifier(store, hasher=EvictingHasher(CHEAPEST_PARAMETERS))
    await v.verify(key.key.encode())
    assert store.gets == 2
    assert len(v.cache) == 1


async def test_old_hash_parameters_upgraded_on_verify(store: CountingStore) -> None:
    """A key hashed with weaker argon2 parameters is rehashed on its next successful verify."""
    old = Argon2Parameters(time_cost=1, memory_cost=8, parallelism=1, hash_len=16, salt_len=8)
    created = await KeyManager(store, argon2=old).create(owner="acme", name="old")
    v = Verifier(store, hasher=SecretHasher(Argon2Parameters(time_cost=2, memory_cost=16)))
    await v.verify(created.key.encode())
    stored = await store.get(created.id)
    assert stored is not None and "m=16,t=2" in stored.secret_hash


async def test_expired_key_rejected_on_miss(store: CountingStore) -> None:
    """A key past expires_at is rejected on a miss, and told so once its secret is proven."""
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    created = await manager.create(owner="acme", name="x", expires_in=timedelta(seconds=30))
    assert created.record.expires_at is not None
    v = verifier(store)
    v.clock = lambda: created.record.expires_at.timestamp() + 1  # type: ignore[union-attr]
    with pytest.raises(InvalidToken) as err:
        await v.verify(created.key.encode())
    assert err.value.reason == "expired"
    assert v.counters.argon2_verifications == 1


async def test_outage_retries_the_store_at_most_once_a_second(
    store: CountingStore, key: CreatedKey
) -> None:
    """While the store is down, a stale cached key is served without a store call per request."""
    from keystile.verifier import STALE_RETRY_INTERVAL

    now = [0.0]
    v = verifier(store, cache_ttl=10, stale_if_error=100)
    v.monotonic = lambda: now[0]
    await v.verify(key.key.encode())
    store.down = True
    now[0] = 20
    store.gets = 0
    for _ in range(50):
        assert (await v.verify(key.key.encode())).key_id == key.id
    assert store.gets == 1
    now[0] += STALE_RETRY_INTERVAL
    await v.verify(key.key.encode())
    assert store.gets == 2


async def test_slow_store_failure_refuses_misses_at_once_for_a_moment(
    store: CountingStore, key: CreatedKey
) -> None:
    """After a store read fails slowly (a black-holed host), misses get 503 without waiting."""
    from keystile.verifier import STALE_RETRY_INTERVAL

    class SlowDownStore(CountingStore):
        async def get(self, key_id: str) -> KeyRecord | None:
            self.gets += 1
            await anyio.sleep(0.05)  # stands for a connect timeout
            raise StoreError("timeout")

    slow = SlowDownStore()
    v = verifier(slow)
    v.slow_store_failure = 0.01
    for _ in range(5):
        with pytest.raises(ServiceUnavailable):
            await v.verify(key.key.encode())
    assert slow.gets == 1  # the first read failed slowly; the other misses did not wait
    assert STALE_RETRY_INTERVAL >= 0.5


async def test_fast_store_failure_keeps_trying(store: CountingStore, key: CreatedKey) -> None:
    """A store that refuses at once is asked again on the next miss (no breaker)."""
    store.down = True
    v = verifier(store)
    for _ in range(3):
        with pytest.raises(ServiceUnavailable):
            await v.verify(key.key.encode())
    assert store.gets == 3
