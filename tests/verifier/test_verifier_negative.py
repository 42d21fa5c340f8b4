"""The negative cache and its key id index: what a change event forgets, and that the
index never names an entry that is gone."""

from __future__ import annotations

import dataclasses

import pytest

from keystile import CHEAPEST_PARAMETERS, KeyManager, KeyRecord, MemoryKeyStore
from keystile.errors import InvalidToken
from keystile.hashing import SecretHasher
from keystile.negative import NegativeCache
from keystile.stores.records import utcnow
from keystile.tokens import generate_key
from keystile.verifier import Verifier

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def digest(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_ttl_expiry_leaves_the_index_with_nothing_gone() -> None:
    """Entries past their TTL leave the cache and the index alike."""
    clock = Clock()
    cache = NegativeCache(maxsize=100, ttl=10.0, timer=clock)
    cache.remember(digest(1), "revoked", "A")
    cache.remember(digest(2), "wrong_secret")
    clock.now = 5.0
    cache.remember(digest(3), "expired", "B")
    clock.now = 11.0
    cache.remember(digest(4), "unknown")  # a write sweeps what expired
    assert cache.get(digest(1)) is None and cache.get(digest(2)) is None
    assert cache.key_ids() == {"B"}
    assert len(cache) == 2
    clock.now = 16.0
    assert cache.get(digest(3)) is None  # expired when asked
    assert cache.key_ids() == frozenset()
    assert cache.forget_key("A") == cache.forget_key("B") == 0


def test_size_eviction_leaves_the_index_with_nothing_gone() -> None:
    """Past maxsize the least recently asked entry leaves, from the index too."""
    cache = NegativeCache(maxsize=3, ttl=60.0, timer=Clock())
    for n, key_id in enumerate("ABCDE"):
        cache.remember(digest(n), "revoked", key_id)
        if n == 2:
            assert cache.get(digest(0)) == ("revoked", "A")  # asked: B and C are older now
    assert len(cache) == 3
    assert cache.key_ids() == {"A", "D", "E"}
    assert cache.forget_key("B") == cache.forget_key("C") == 0


def test_remembering_again_moves_an_entry_between_keys() -> None:
    """A digest remembered anew keeps one entry, indexed under its latest key only."""
    cache = NegativeCache(maxsize=10, ttl=60.0, timer=Clock())
    cache.remember(digest(1), "disabled", "A")
    cache.remember(digest(1), "wrong_secret")
    assert cache.key_ids() == frozenset() and len(cache) == 1
    cache.remember(digest(1), "revoked", "B")
    assert cache.key_ids() == {"B"}


def test_forgetting_a_key_touches_that_key_only() -> None:
    """forget_key drops that key's state-decided refusals and nothing else."""
    cache = NegativeCache(maxsize=100, ttl=60.0, timer=Clock())
    cache.remember(digest(1), "revoked", "A")
    cache.remember(digest(2), "expired", "A")
    cache.remember(digest(3), "revoked", "B")
    cache.remember(digest(4), "wrong_secret")
    assert cache.forget_key("A") == 2
    assert [cache.get(digest(n)) for n in (1, 2)] == [None, None]
    assert cache.get(digest(3)) == ("revoked", "B")
    assert cache.get(digest(4)) == ("wrong_secret", None)
    assert cache.forget_state_decided() == 1
    assert cache.get(digest(4)) == ("wrong_secret", None) and len(cache) == 1


class CountingStore(MemoryKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get(self, key_id: str) -> KeyRecord | None:
        self.gets += 1
        return await super().get(key_id)


async def refused(v: Verifier, token: str) -> str:
    with pytest.raises(InvalidToken) as err:
        await v.verify(token.encode())
    return err.value.reason


async def test_change_event_forgets_exactly_that_key_s_remembered_refusals() -> None:
    """A change of key A makes A's state-decided refusal ask the store again; B's, and
    a wrong secret for A, are still answered from memory."""
    store = CountingStore()
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    a = await manager.create(owner="acme", name="a")
    b = await manager.create(owner="acme", name="b")
    for k in (a, b):
        store._rows[k.id] = dataclasses.replace(store._rows[k.id], revoked_at=utcnow())
    v = Verifier(store, hasher=SecretHasher(CHEAPEST_PARAMETERS))
    guess = generate_key(key_id=a.id)[0]
    for token in (a.key, b.key, guess):
        await refused(v, token)
    reads = store.gets
    v.on_change(a.id)
    assert await refused(v, b.key) == "revoked" and store.gets == reads
    assert await refused(v, guess) == "wrong_secret" and store.gets == reads
    assert await refused(v, a.key) == "revoked" and store.gets == reads + 1


async def test_gap_in_change_events_forgets_every_state_decided_refusal() -> None:
    """on_change(None) forgets every key's state-decided refusals, not the guesses."""
    store = CountingStore()
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    a = await manager.create(owner="acme", name="a")
    store._rows[a.id] = dataclasses.replace(store._rows[a.id], disabled_at=utcnow())
    v = Verifier(store, hasher=SecretHasher(CHEAPEST_PARAMETERS))
    unknown = generate_key()[0]
    assert await refused(v, a.key) == "disabled"
    await refused(v, unknown)
    reads = store.gets
    v.on_change(None)
    await refused(v, unknown)
    assert store.gets == reads
    assert await refused(v, a.key) == "disabled" and store.gets == reads + 1
