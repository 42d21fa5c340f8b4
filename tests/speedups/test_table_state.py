"""Each key's state and usage in the table: the compiled table against the pure-Python one.

The compiled table holds what used to be a Python object per key (the principal, expiry,
when the state was read, when the key was last used) and counts a plain hit's use itself.
Two differential checks hold it to the pure-Python path, which keeps the old shape (a
lookup, then ``UsageRecorder.touch``):

* the caches: random inserts, state replacements, lookups, evictions, idle evictions,
  invalidations and clears answer alike, snapshot for snapshot;
* the middleware: the same requests through a compiled and a pure middleware, with the
  same clocks (state TTL, expiry, minute boundaries, ``flush_max``), the same changes
  (eviction, revocation, rotation of state) and the same flushes, give the same statuses,
  the same hit and miss counts and the same ``last_used_at`` and per-minute rows.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hitpaths import COMPILED_AVAILABLE, using
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, MemoryKeyStore
from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.principal import APIKeyUser
from keystile.stores.records import UsageCounts

pytestmark = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")

KEY = bytes(range(32))
IDS = [f"id{i}" for i in range(6)]


def pair(max_size: int) -> tuple[VerifiedKeyCache, VerifiedKeyCache]:
    return (
        VerifiedKeyCache(max_size=max_size, compiled=True, key=KEY),
        VerifiedKeyCache(max_size=max_size, compiled=False, key=KEY),
    )


def alike(a: CachedKey | None, b: CachedKey | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b and a.user is b.user


cache_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("insert"),
            st.integers(0, 5),
            st.integers(0, 1),
            st.one_of(st.none(), st.floats(0, 100)),
            st.floats(0, 100),
        ),
        st.tuples(st.just("replace"), st.integers(0, 5), st.one_of(st.none(), st.floats(0, 100))),
        st.tuples(st.just("lookup"), st.integers(0, 11)),
        st.tuples(st.just("evict"), st.integers(0, 5)),
        st.tuples(st.just("evict_idle"), st.integers(0, 60)),
        st.tuples(st.just("stale"), st.floats(0, 100)),
        st.just(("invalidate",)),
        st.just(("clear",)),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(ops=cache_ops, max_size=st.sampled_from([1, 3, 100]))
def test_caches_keep_the_same_state(ops: list[tuple[Any, ...]], max_size: int) -> None:
    """After every step the compiled and the pure cache hold the same keys with the same
    principal, expiry and read time, found alike by token and by key id."""
    compiled, pure = pair(max_size)
    users = {key_id: APIKeyUser(key_id=key_id, owner="o", name=key_id) for key_id in IDS}
    tokens = [f"token-{i}".encode() for i in range(12)]  # two per key id
    clock = iter(range(1, 10**6))
    for op in ops:
        kind = op[0]
        if kind == "insert":
            _, index, which, expires, checked = op
            entry = CachedKey(users[IDS[index]], expires, checked)
            digest = compiled.digest(tokens[2 * index + which])
            now = float(next(clock))
            assert compiled.insert(digest, entry, now=now, epoch=compiled.epoch)
            assert pure.insert(digest, entry, now=now, epoch=pure.epoch)
        elif kind == "replace":
            fresh = APIKeyUser(key_id=IDS[op[1]], owner="o", name="fresh")
            entry = CachedKey(fresh, op[2], float(next(clock)))
            assert compiled.replace_state(entry, epoch=compiled.epoch) == pure.replace_state(
                entry, epoch=pure.epoch
            )
        elif kind == "lookup":
            digest = compiled.digest(tokens[op[1]])
            now = float(next(clock))
            assert alike(compiled.lookup(digest, now), pure.lookup(digest, now))
        elif kind == "evict":
            assert compiled.evict(IDS[op[1]]) == pure.evict(IDS[op[1]])
        elif kind == "evict_idle":
            assert compiled.evict_idle(float(op[1])) == pure.evict_idle(float(op[1]))
        elif kind == "stale":
            assert sorted(compiled.checked_before(op[1])) == sorted(pure.checked_before(op[1]))
        elif kind == "invalidate":
            compiled.invalidate()
            pure.invalidate()
        else:
            compiled.clear()
            pure.clear()
        assert len(compiled) == len(pure)
        assert sorted(compiled, key=lambda e: e.key_id) == sorted(pure, key=lambda e: e.key_id)
        for key_id in IDS:
            assert alike(compiled.get(key_id), pure.get(key_id))


def test_a_snapshot_reads_no_expiry_as_none_and_keeps_the_read_time() -> None:
    """What goes in comes out: ``None`` for no expiry, the floats as given."""
    for cache in pair(10):
        user = APIKeyUser(key_id="a", owner="o", name="a")
        assert cache.insert(b"\x01" * 32, CachedKey(user, None, 3.5), now=1.0, epoch=0)
        assert cache.get("a") == (user, None, 3.5)
        cache.invalidate()
        got = cache.get("a")
        assert got is not None and got.checked_at == -math.inf and got.expires_at is None


# -- the middleware, compiled and pure ------------------------------------------------------


class Clocks:
    """The wall and monotonic clocks both middlewares read, moved by the test."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class RecordingStore(MemoryKeyStore):
    """A memory store that keeps what each flush wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: list[dict[str, datetime]] = []
        self.counted: list[dict[tuple[str, datetime], tuple[int, int]]] = []

    async def touch_many(
        self, touches: Mapping[str, datetime], uses: Mapping[str, int] | None = None
    ) -> Any:
        self.touched.append(dict(touches))
        return await super().touch_many(touches, uses)

    async def add_usage(self, counts: UsageCounts) -> None:
        self.counted.append(dict(counts))
        await super().add_usage(counts)


def scope_for(token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "root_path": "",
        "headers": [(b"host", b"h"), (b"x-api-key", token.encode())],
        "client": ("127.0.0.1", 5000),
    }


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def status_of(app: APIKeyMiddleware, token: str) -> int:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope_for(token), receive, send)
    return int(sent[0]["status"])


def build(path: str, store: RecordingStore, clocks: Clocks, flush_max: int) -> APIKeyMiddleware:
    with using(path):
        app = APIKeyMiddleware(
            ok_app,
            store=store,
            argon2=CHEAPEST_PARAMETERS,
            cache_ttl=30.0,
            cache_idle=3600.0,
            negative_ttl=0,
            flush_interval=3600.0,
            flush_max=flush_max,
        )
    assert app.verifier.cache.compiled == (path == "compiled")
    app.verifier.clock = clocks.time
    app.verifier.monotonic = clocks.monotonic
    app.recorder.flush_max = flush_max
    return app


async def keys_in(store: RecordingStore, clocks: Clocks) -> list[str]:
    """Three plain keys, one with an IP allowlist, one with a (never reached) rate limit,
    one that expires a minute after the test starts."""
    expires = datetime.fromtimestamp(clocks.wall + 90, timezone.utc)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    made = [await manager.create(owner="o", name=f"plain{i}") for i in range(3)]
    made.append(await manager.create(owner="o", name="allow", ip_allowlist=["127.0.0.0/8"]))
    made.append(await manager.create(owner="o", name="limited", rate_limit="100000/minute"))
    made.append(await manager.create(owner="o", name="expiring", expires_at=expires))
    return [k.key for k in made]


middleware_ops = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.integers(0, 5), st.integers(1, 4)),
        st.tuples(st.just("wall"), st.floats(0.5, 75)),
        st.tuples(st.just("mono"), st.floats(0.5, 40)),
        st.tuples(st.just("evict"), st.integers(0, 5)),
        st.just(("flush",)),
        st.just(("invalidate",)),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=middleware_ops, flush_max=st.sampled_from([1, 2, 1000]))
def test_compiled_and_pure_middlewares_count_alike(
    ops: list[tuple[Any, ...]], flush_max: int
) -> None:
    """The same traffic, clocks and changes through both middlewares: the same statuses,
    the same hits and misses, and the same ``last_used_at`` and per-minute rows written
    (the compiled hit counts a plain key's use in its table, the pure path in the
    recorder's dicts)."""
    asyncio.run(_run_both(ops, flush_max))


async def _run_both(ops: list[tuple[Any, ...]], flush_max: int) -> None:
    clocks = Clocks()
    stores = {path: RecordingStore() for path in ("compiled", "pure")}
    tokens = {path: await keys_in(store, clocks) for path, store in stores.items()}
    apps = {path: build(path, stores[path], clocks, flush_max) for path in stores}
    try:
        for op in ops:
            kind = op[0]
            if kind == "request":
                for _ in range(op[2]):
                    statuses = {p: await status_of(apps[p], tokens[p][op[1]]) for p in apps}
                    assert statuses["compiled"] == statuses["pure"], op
            elif kind == "wall":
                clocks.wall += op[1]
            elif kind == "mono":
                clocks.mono += op[1]
            elif kind == "evict":
                for path, app in apps.items():
                    app.evict(tokens[path][op[1]].split("_")[1])
            elif kind == "invalidate":
                for app in apps.values():
                    app.verifier.on_change(None)
            else:
                for app in apps.values():
                    await app.recorder.flush()
            compiled, pure = (apps[p].stats() for p in ("compiled", "pure"))
            assert (compiled.cache_hits, compiled.cache_misses) == (
                pure.cache_hits,
                pure.cache_misses,
            ), op
        for app in apps.values():
            await app.recorder.flush()
    finally:
        for app in apps.values():
            await app.aclose()
    by_name = {}
    for path, store in stores.items():
        names = {r.id: r.name for r in await store.list_keys("o")}
        by_name[path] = (
            {names[k]: v for batch in store.touched for k, v in batch.items()},
            _rows(store.counted, names),
        )
    assert by_name["compiled"] == by_name["pure"]


def _rows(
    batches: list[dict[tuple[str, datetime], tuple[int, int]]], names: dict[str, str]
) -> dict[tuple[str, datetime], tuple[int, int]]:
    rows: dict[tuple[str, datetime], tuple[int, int]] = {}
    for batch in batches:
        for (key_id, minute), (requests, rejected) in batch.items():
            old = rows.get((names[key_id], minute), (0, 0))
            rows[(names[key_id], minute)] = (old[0] + requests, old[1] + rejected)
    return rows


@pytest.mark.anyio
async def test_a_plain_hit_is_counted_by_the_table() -> None:
    """On the compiled path a plain key's hits write no dict: the table counts them, and
    the recorder harvests them into one row and one ``last_used_at``."""
    clocks = Clocks()
    store = RecordingStore()
    token = (await keys_in(store, clocks))[0]
    app = build("compiled", store, clocks, 1000)
    table = app.verifier.cache.table
    try:
        assert await status_of(app, token) == 200  # a miss: argon2, then touch
        assert await status_of(app, token) == 200  # the minute starts in Python
        before = dict(app.recorder._pending)
        for _ in range(5):
            clocks.wall += 1
            assert await status_of(app, token) == 200
        assert table.pending == 1 and app.recorder._pending == before
        assert app.stats().cache_hits == 6
        await app.recorder.flush()
    finally:
        await app.aclose()
    key_id = token.split("_")[1]
    assert store.touched[-1] == {key_id: datetime.fromtimestamp(clocks.wall, timezone.utc)}
    assert sum(r[0] for (k, _), r in store.counted[-1].items() if k == key_id) == 7
