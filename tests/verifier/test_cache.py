"""The verified-key cache: a constant-time scan checked against a plain reference oracle.

Every test runs on both tables, the compiled one (``keystile._speedups.Table``) and the
pure-Python one (``PyTable``), except the structural tests of the pure one's scan.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keystile.pytable
import keystile.tagscan
from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.principal import APIKeyUser
from keystile.tagscan import CHUNK_LANES

INITIAL_CAPACITY = 256
#: The structural tests of the pure-Python table's scan run on that table alone.
PURE_TABLE_ONLY = pytest.mark.parametrize("hit_path", ["pure"], indirect=True)


#: Every cache made in a test uses the table of the ``hit_path`` fixture.
pytestmark = pytest.mark.usefixtures("hit_path")


def entry(key_id: str) -> CachedKey:
    return CachedKey(
        APIKeyUser(key_id=key_id, owner="owner", name=f"name-{key_id}"),
        expires_at=None,
        checked_at=0.0,
    )


def same(found: CachedKey | None, entry: CachedKey | None) -> bool:
    """``found`` is ``entry``'s state: the same principal, expiry and read time (a lookup
    answers with a snapshot of the slot, not the object inserted); or both are None."""
    if found is None or entry is None:
        return found is entry
    return found == entry and found.user is entry.user


def digest_of(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def with_tag(tag: bytes, rest: bytes) -> bytes:
    assert len(tag) == 8 and len(rest) == 24
    return tag + rest


def fill(cache: VerifiedKeyCache, count: int, *, start: float = 0.0) -> list[bytes]:
    """Insert ``count`` keys ``k0…`` with digests ``digest_of("k0")…``; return the digests."""
    digests = []
    for i in range(count):
        digest = digest_of(f"k{i}")
        assert cache.insert(digest, entry(f"k{i}"), now=start + i, epoch=cache.epoch)
        digests.append(digest)
    return digests


# -- the reference oracle -------------------------------------------------------------


@dataclass
class Oracle:
    """What the cache must do, written the obvious way: a loop over every entry."""

    max_size: int
    digests: dict[str, bytes] = field(default_factory=dict)
    entries: dict[str, CachedKey] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)

    def lookup(self, digest: bytes, now: float) -> CachedKey | None:
        found = None
        for key_id, candidate in self.digests.items():
            if hmac.compare_digest(candidate, digest):
                found = key_id
        if found is None:
            return None
        self.seen[found] = now
        return self.entries[found]

    def insert(self, digest: bytes, item: CachedKey, now: float) -> None:
        if item.key_id not in self.entries and len(self.entries) >= self.max_size:
            self._drop(min(self.seen, key=self.seen.__getitem__))
        self.digests[item.key_id] = digest
        self.entries[item.key_id] = item
        self.seen[item.key_id] = now

    def evict(self, key_id: str) -> bool:
        if key_id not in self.entries:
            return False
        self._drop(key_id)
        return True

    def evict_idle(self, idle_since: float) -> int:
        idle = [k for k, t in self.seen.items() if t < idle_since]
        for key_id in idle:
            self._drop(key_id)
        return len(idle)

    def clear(self) -> None:
        self.digests.clear()
        self.entries.clear()
        self.seen.clear()

    def _drop(self, key_id: str) -> None:
        del self.digests[key_id], self.entries[key_id], self.seen[key_id]


# Digests drawn from a small grid of tags x tails, so many share their 8-byte tag.
TAGS = [bytes([t]) * 8 for t in range(3)]
TAILS = [bytes([100 + r]) * 24 for r in range(4)]
POOL = [with_tag(t, r) for t in TAGS for r in TAILS]
KEY_IDS = [f"id{i}" for i in range(8)]

inserts = st.tuples(st.just("insert"), st.sampled_from(KEY_IDS), st.sampled_from(POOL))
lookups_live = st.tuples(st.just("lookup_live"), st.integers(0, 10_000))
operations = st.lists(
    st.one_of(
        inserts,
        inserts,
        inserts,
        st.tuples(st.just("lookup"), st.sampled_from(POOL)),
        lookups_live,
        lookups_live,
        st.tuples(st.just("evict"), st.sampled_from(KEY_IDS)),
        st.tuples(st.just("evict_idle"), st.integers(0, 40)),
        st.tuples(st.just("bulk"), st.integers(1, 300)),
        st.just(("clear",)),
    ),
    max_size=40,
)


def _insert_allowed(oracle: Oracle, key_id: str, digest: bytes) -> bool:
    """Keep the workload inside what the design promises.

    A digest is never cached for two key ids (the token contains its key id), and at most
    two live entries share a tag: tags are 64 bits of a keyed BLAKE2b digest, so a third
    sharing one is not a case the scan (``find`` + ``rfind``) is built for.
    """
    others = {k: d for k, d in oracle.digests.items() if k != key_id}
    if digest in others.values():
        return False
    return sum(d[:8] == digest[:8] for d in others.values()) < 2


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations, max_size=st.sampled_from([1, 3, 8, 300, 100_000]))
def test_lookup_agrees_with_reference_oracle(ops: list[tuple[Any, ...]], max_size: int) -> None:
    """Under random inserts, evictions, clears and lookups the cache answers as the oracle does."""
    cache = VerifiedKeyCache(max_size=max_size)
    oracle = Oracle(max_size=max_size)
    clock = itertools.count(1)
    bulk_ids = itertools.count()
    for op in ops:
        kind = op[0]
        if kind == "insert":
            _, key_id, digest = op
            if not _insert_allowed(oracle, key_id, digest):
                continue
            item, now = entry(key_id), float(next(clock))
            assert cache.insert(digest, item, now=now, epoch=cache.epoch)
            oracle.insert(digest, item, now)
        elif kind == "bulk":
            for _ in range(op[1]):
                key_id = f"bulk{next(bulk_ids)}"
                item, now, digest = entry(key_id), float(next(clock)), digest_of(key_id)
                assert cache.insert(digest, item, now=now, epoch=cache.epoch)
                oracle.insert(digest, item, now)
        elif kind in ("lookup", "lookup_live"):
            if kind == "lookup":
                digest = op[1]
            elif oracle.digests:
                live = list(oracle.digests.values())
                digest = live[op[1] % len(live)]
            else:
                continue
            now = float(next(clock))
            assert same(cache.lookup(digest, now), oracle.lookup(digest, now))
        elif kind == "evict":
            assert cache.evict(op[1]) == oracle.evict(op[1])
        elif kind == "evict_idle":
            idle_since = float(op[1])
            assert cache.evict_idle(idle_since) == oracle.evict_idle(idle_since)
        else:
            cache.clear()
            oracle.clear()
        assert len(cache) == len(oracle.entries)
    for key_id, digest in oracle.digests.items():
        assert same(cache.get(key_id), oracle.entries[key_id])
        assert same(cache.lookup(digest, 0.0), oracle.entries[key_id])
    assert {e.key_id for e in cache} == set(oracle.entries)


# -- tag collisions -------------------------------------------------------------------


def test_tag_collision_never_authenticates() -> None:
    """A digest sharing only the 8-byte tag of a cached digest finds nothing."""
    cache = VerifiedKeyCache()
    cached = with_tag(b"T" * 8, b"a" * 24)
    impostor = with_tag(b"T" * 8, b"b" * 24)
    cache.insert(cached, entry("real"), now=1.0, epoch=cache.epoch)
    assert cache.lookup(impostor, 2.0) is None


def test_tag_collision_differing_only_in_last_byte() -> None:
    """A digest equal to a cached one except in its last byte finds nothing."""
    cache = VerifiedKeyCache()
    cached = digest_of("real")
    impostor = cached[:-1] + bytes([cached[-1] ^ 1])
    cache.insert(cached, entry("real"), now=1.0, epoch=cache.epoch)
    assert cache.lookup(impostor, 2.0) is None


@pytest.mark.parametrize("filler", [0, 5, 300])
def test_colliding_tags_each_find_their_own_entry(filler: int) -> None:
    """Two cached digests sharing a tag each find their own entry, wherever they sit."""
    cache = VerifiedKeyCache()
    fill(cache, filler)
    first = with_tag(b"T" * 8, b"a" * 24)
    second = with_tag(b"T" * 8, b"b" * 24)
    a, b = entry("a"), entry("b")
    cache.insert(first, a, now=1000.0, epoch=cache.epoch)
    fill_more = [digest_of(f"m{i}") for i in range(filler)]
    for i, digest in enumerate(fill_more):
        cache.insert(digest, entry(f"m{i}"), now=2000.0 + i, epoch=cache.epoch)
    cache.insert(second, b, now=3000.0, epoch=cache.epoch)
    assert same(cache.lookup(first, 4000.0), a)
    assert same(cache.lookup(second, 4001.0), b)
    assert cache.lookup(with_tag(b"T" * 8, b"c" * 24), 4002.0) is None


def test_zero_digest_does_not_match_the_dummy() -> None:
    """An all-zero digest with no cached match finds nothing (the no-match dummy is zeros)."""
    cache = VerifiedKeyCache()
    fill(cache, 3)
    assert cache.lookup(bytes(32), 10.0) is None
    assert VerifiedKeyCache().lookup(bytes(32), 10.0) is None


def test_zero_digest_can_be_cached() -> None:
    """A cached all-zero digest is found like any other."""
    cache = VerifiedKeyCache()
    zero = entry("zero")
    cache.insert(bytes(32), zero, now=1.0, epoch=cache.epoch)
    assert same(cache.lookup(bytes(32), 2.0), zero)


# -- epochs, swap-remove, size and idle bounds ----------------------------------------


def test_insert_with_stale_epoch_after_evict_is_refused() -> None:
    """An insert carrying the epoch read before the key's eviction is refused."""
    cache = VerifiedKeyCache()
    epoch = cache.epoch
    cache.evict("a")
    assert cache.insert(digest_of("a"), entry("a"), now=1.0, epoch=epoch) is False
    assert len(cache) == 0
    assert cache.lookup(digest_of("a"), 2.0) is None


def test_eviction_of_another_key_does_not_refuse_an_insert() -> None:
    """Only an eviction of the same key id makes an earlier epoch stale for it."""
    cache = VerifiedKeyCache()
    epoch = cache.epoch
    cache.evict("some-other-key")
    assert cache.changed_since("a", epoch) is False
    assert cache.insert(digest_of("a"), entry("a"), now=1.0, epoch=epoch) is True


def test_replace_state_after_eviction_is_refused() -> None:
    """State read before a key's eviction is not written back over what came after it."""
    cache = VerifiedKeyCache()
    before = cache.epoch
    cache.evict("a")
    after = cache.epoch
    newer = entry("a")
    cache.insert(digest_of("a"), newer, now=1.0, epoch=after)
    assert cache.replace_state(entry("a"), epoch=before) is False
    assert same(cache.get("a"), newer)


def test_forgetting_eviction_history_is_conservative() -> None:
    """Past the remembered evictions, every older epoch counts as changed for every key."""
    cache = VerifiedKeyCache()
    epoch = cache.epoch
    for i in range(5000):
        cache.evict(f"other-{i}")
    assert cache.changed_since("a", epoch) is True
    assert cache.changed_since("a", cache.epoch) is False


def test_insert_with_stale_epoch_after_clear_is_refused() -> None:
    """``clear`` also makes earlier epochs stale."""
    cache = VerifiedKeyCache()
    epoch = cache.epoch
    cache.clear()
    assert cache.insert(digest_of("a"), entry("a"), now=1.0, epoch=epoch) is False
    assert len(cache) == 0


def test_insert_with_current_epoch_is_accepted() -> None:
    """An insert with the current epoch is cached and found."""
    cache = VerifiedKeyCache()
    cache.evict("x")
    item = entry("a")
    assert cache.insert(digest_of("a"), item, now=1.0, epoch=cache.epoch) is True
    assert same(cache.lookup(digest_of("a"), 2.0), item)


def test_entry_moved_by_swap_remove_is_found() -> None:
    """Evicting the first slot moves the last entry into it, and that entry is still found."""
    cache = VerifiedKeyCache()
    digests = fill(cache, 5)
    assert cache.evict("k0")
    assert same(cache.lookup(digests[4], 10.0), cache.get("k4"))
    assert cache.get("k4") is not None and cache.get("k4").key_id == "k4"
    assert cache.lookup(digests[0], 11.0) is None
    for i in (1, 2, 3):
        assert same(cache.lookup(digests[i], 12.0), cache.get(f"k{i}"))


def test_evict_unknown_key_returns_false() -> None:
    """Evicting a key that is not cached reports ``False`` and changes nothing."""
    cache = VerifiedKeyCache()
    fill(cache, 2)
    assert cache.evict("absent") is False
    assert len(cache) == 2


def test_reinsert_same_key_replaces_digest() -> None:
    """Inserting a key id again replaces its digest: the old digest no longer finds it."""
    cache = VerifiedKeyCache()
    old, new = digest_of("old"), digest_of("new")
    cache.insert(old, entry("a"), now=1.0, epoch=cache.epoch)
    item = entry("a")
    cache.insert(new, item, now=2.0, epoch=cache.epoch)
    assert len(cache) == 1
    assert cache.lookup(old, 3.0) is None
    assert same(cache.lookup(new, 4.0), item)


def test_growth_past_initial_capacity_keeps_every_entry() -> None:
    """Past the initial 256 slots every entry is still found, first to last."""
    cache = VerifiedKeyCache()
    digests = fill(cache, INITIAL_CAPACITY * 2 + 1)
    assert len(cache) == INITIAL_CAPACITY * 2 + 1
    for i, digest in enumerate(digests):
        found = cache.lookup(digest, 10_000.0)
        assert found is not None and found.key_id == f"k{i}"


def test_max_size_evicts_least_recently_seen() -> None:
    """At ``max_size`` an insert evicts the entry least recently inserted or looked up."""
    cache = VerifiedKeyCache(max_size=2)
    a, b, c = digest_of("a"), digest_of("b"), digest_of("c")
    cache.insert(a, entry("a"), now=1.0, epoch=cache.epoch)
    cache.insert(b, entry("b"), now=2.0, epoch=cache.epoch)
    assert cache.lookup(a, 3.0) is not None
    cache.insert(c, entry("c"), now=4.0, epoch=cache.epoch)
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.lookup(b, 5.0) is None
    assert cache.lookup(a, 6.0) is not None
    assert cache.lookup(c, 7.0) is not None


def test_max_size_must_be_positive() -> None:
    """A cache that can hold nothing is a configuration mistake."""
    with pytest.raises(ValueError):
        VerifiedKeyCache(max_size=0)


def test_evict_idle_drops_only_idle_entries() -> None:
    """``evict_idle`` removes entries unseen since the bound and counts them."""
    cache = VerifiedKeyCache()
    digests = fill(cache, 6)  # seen at 0..5
    cache.lookup(digests[1], 100.0)
    assert cache.evict_idle(4.0) == 3  # k0, k2, k3
    assert sorted(e.key_id for e in cache) == ["k1", "k4", "k5"]
    for i in (1, 4, 5):
        assert same(cache.lookup(digests[i], 200.0), cache.get(f"k{i}"))


def test_clear_empties_the_cache() -> None:
    """After ``clear`` nothing is found and the cache is empty."""
    cache = VerifiedKeyCache()
    digests = fill(cache, 3)
    cache.clear()
    assert len(cache) == 0
    assert all(cache.lookup(d, 10.0) is None for d in digests)


def test_checked_before_lists_stale_entries() -> None:
    """``checked_before`` returns the key ids whose state was read before the bound."""
    cache = VerifiedKeyCache()
    old = CachedKey(APIKeyUser(key_id="old", owner="o", name="n"), None, checked_at=1.0)
    fresh = CachedKey(APIKeyUser(key_id="fresh", owner="o", name="n"), None, checked_at=9.0)
    cache.insert(digest_of("old"), old, now=1.0, epoch=cache.epoch)
    cache.insert(digest_of("fresh"), fresh, now=1.0, epoch=cache.epoch)
    assert cache.checked_before(5.0) == ["old"]


def test_replace_state_keeps_digest() -> None:
    """``replace_state`` swaps the entry found by the same digest."""
    cache = VerifiedKeyCache()
    digest = digest_of("a")
    cache.insert(digest, entry("a"), now=1.0, epoch=cache.epoch)
    fresh = entry("a")
    cache.replace_state(fresh, epoch=cache.epoch)
    assert same(cache.lookup(digest, 2.0), fresh)


# -- the keyed digest -----------------------------------------------------------------


def test_digest_is_keyed_per_cache() -> None:
    """Two caches give different digests for the same token."""
    token = b"ks_0123456789ab_secret"
    assert VerifiedKeyCache().digest(token) != VerifiedKeyCache().digest(token)


def test_digest_is_stable_within_a_cache() -> None:
    """One cache digests the same token to the same 32 bytes every time."""
    cache = VerifiedKeyCache()
    first = cache.digest(b"token")
    assert cache.digest(b"token") == first
    assert len(first) == 32
    assert cache.digest(b"token2") != first


def test_digest_is_not_a_plain_hash() -> None:
    """The digest is not the unkeyed BLAKE2b of the token."""
    cache = VerifiedKeyCache()
    assert cache.digest(b"token") != hashlib.blake2b(b"token", digest_size=32).digest()


# -- structure: the scan reads every entry --------------------------------------------


@PURE_TABLE_ONLY
def test_scan_does_the_same_work_wherever_the_match_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed scan covers every chunk of tags with the same operations, and one
    ``compare_digest`` follows, for a match in the first, middle or last slot or none
    (the pure-Python table's scan; ``speedups/test_speedups.py``: the C one)."""
    size = 2 * CHUNK_LANES + 44
    cache = VerifiedKeyCache()
    digests = fill(cache, size)
    cache.lookup(digest_of("absent"), 1e6)  # pack the tags before recording
    scanned: list[int] = []
    compared: list[bytes] = []
    real_zero_lanes, real_compare = keystile.tagscan.zero_lanes, hmac.compare_digest

    def recording_zero_lanes(x: int, flag: int) -> int:
        scanned.append(flag.bit_length())
        return real_zero_lanes(x, flag)

    def recording_compare(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real_compare(a, b)

    monkeypatch.setattr(keystile.tagscan, "zero_lanes", recording_zero_lanes)
    monkeypatch.setattr(keystile.pytable, "_compare", recording_compare)
    traces = {}
    for where, probe in {
        "first": digests[0],
        "middle": digests[size // 2],
        "last": digests[-1],
        "absent": digest_of("absent"),
    }.items():
        scanned.clear()
        compared.clear()
        found = cache.lookup(probe, 1e6)
        assert (found is None) == (where == "absent")
        traces[where] = (tuple(scanned), len(compared))
    chunks = -(-size // CHUNK_LANES)
    assert chunks == 3
    assert set(traces.values()) == {((72 * CHUNK_LANES - 6,) * chunks, 1)}


@PURE_TABLE_ONLY
@pytest.mark.parametrize("where", ["first", "last", "absent"])
def test_small_scan_compares_every_entry(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below SMALL_SCAN_SIZE, compare_digest runs once per entry wherever the match is
    (the pure-Python table's small scan)."""
    from keystile.cache import SMALL_SCAN_SIZE

    cache = VerifiedKeyCache()
    digests = fill(cache, SMALL_SCAN_SIZE)
    probe = {"first": digests[0], "last": digests[-1], "absent": digest_of("absent")}[where]
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(keystile.pytable, "_compare", counting)
    found = cache.lookup(probe, 1.0)
    assert (found is None) == (where == "absent")
    assert len(calls) == SMALL_SCAN_SIZE
