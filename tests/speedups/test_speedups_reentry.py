"""Finalizers that use the cache while one of its operations is under way.

Dropping a reference runs the finalizer of what it frees, and up to Python 3.11 allocating
an object can run the collector, and so any garbage's finalizer. A finalizer may use the
cache: insert, evict, clear. Whatever it does, the operation it interrupts must not crash,
hand out another key's principal, or leave the table and the cache's index of key ids
disagreeing. Each scenario runs in a child process of its own, so that a crash fails its
test instead of ending the run, and changing the collector's thresholds stays there.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hitpaths import COMPILED_AVAILABLE, HIT_PATHS
from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.principal import APIKeyUser
from keystile.tokens import MAX_TOKEN_LENGTH

KEY = bytes(range(32))
Scenario = Callable[[str], None]

compiled_only = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")
#: From 3.12 on the collector runs between bytecodes, never inside an allocation.
collector_in_allocations = pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="the collector never runs inside an allocation here"
)


def run_alone(scenario: Scenario, path: str) -> None:
    """Run ``scenario(path)`` in a child process; a crash or a failed assert fails the test."""
    here = Path(__file__).resolve().parent
    folders = (str(here), str(here.parent), os.environ.get("PYTHONPATH"))
    pythonpath = os.pathsep.join(p for p in folders if p)
    code = f"import {Path(__file__).stem} as m; m.checked({scenario.__name__!r}, {path!r})"
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr}"
    assert done.stdout.strip() == "ok", done.stdout + done.stderr


def checked(name: str, path: str) -> None:
    """The child's side: the scenario, and no exception swallowed in a finalizer."""
    swallowed: list[BaseException | None] = []
    sys.unraisablehook = lambda info: swallowed.append(info.exc_value)
    globals()[name](path)
    gc.collect()
    assert not swallowed, f"exceptions in finalizers: {swallowed!r}"
    print("ok")


# -- tools ----------------------------------------------------------------------------------


class OnCollect:
    """Garbage in a reference cycle: only the collector frees it, running ``action``."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.cycle = self

    def __del__(self) -> None:
        self.action()


class Now:
    """A monotonic clock that notes when the table reads it (as its call begins)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def __call__(self) -> float:
        self.events.append("call")
        return 1.0


@contextmanager
def collector_armed() -> Iterator[Callable[[], None]]:
    """Yields ``arm``: once called, the next new tracked object runs the collector.

    The free list of lists is emptied first, so the next list made is a new tracked
    object. Between ``arm()`` and the call under test nothing may be allocated.
    """
    threshold = gc.get_threshold()
    gc.disable()
    gc.collect()
    spare: list[list[object]] = [[] for _ in range(100)]

    def arm() -> None:
        gc.set_threshold(1)
        gc.enable()

    try:
        yield arm
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
        del spare


def compiled_table(now: Callable[[], float] | None = None) -> Any:
    from keystile import _speedups

    table = _speedups.Table(KEY, MAX_TOKEN_LENGTH)
    table.set_clocks(now, None)
    return table


def token(name: str) -> bytes:
    return f"token-{name}".encode()


class Releasing(APIKeyUser):
    """A principal that runs ``on_release`` when its last reference is dropped."""

    def __init__(self, key_id: str, on_release: Callable[[], object]) -> None:
        super().__init__(key_id=key_id, owner="o", name=key_id)
        object.__setattr__(self, "on_release", on_release)

    def __del__(self) -> None:
        self.on_release()  # type: ignore[attr-defined]


def put(table: Any, user: APIKeyUser, checked_at: Any = 0.0, now: float = 0.0) -> None:
    """``user`` into the compiled table under its token."""
    digest = table.digest(token(user.key_id))
    table.insert(digest, (user.key_id, user, (), None, checked_at, True), now, 100)


def users(table: Any) -> list[APIKeyUser]:
    return [state[0] for state in table.states()]


def insert(
    cache: VerifiedKeyCache,
    key_id: str,
    on_release: Callable[[], object] = lambda: None,
    *,
    now: float = 0.0,
) -> None:
    entry = CachedKey(Releasing(key_id, on_release), None, 0.0)
    assert cache.insert(cache.digest(token(key_id)), entry, now=now, epoch=cache.epoch)


def assert_holds(cache: VerifiedKeyCache, expected: set[str], names: str) -> None:
    """The cache holds exactly ``expected``: each found by its token as itself, by its id,
    and counted once; every other name in ``names`` found by neither."""
    assert sorted(e.key_id for e in cache) == sorted(expected)
    assert len(cache) == len(expected)
    for name in names:
        found = cache.lookup(cache.digest(token(name)), 1.0)
        by_id = cache.get(name)
        if name in expected:
            assert found is not None and found.key_id == name, (name, found)
            assert by_id is not None and by_id.key_id == name, (name, by_id)
        else:
            assert found is None and by_id is None, (name, found, by_id)


# -- the compiled table: hit, states, clear, insert ------------------------------------------


def hit_while_the_key_moves(path: str) -> None:
    events: list[str] = []
    table = compiled_table(Now(events))
    a, b = APIKeyUser(key_id="a", owner="o", name="a"), APIKeyUser(key_id="b", owner="o", name="b")
    put(table, a)
    put(table, b)
    headers = [(b"x-api-key", token("a"))]

    def remove_a() -> None:
        events.append("finalizer")
        table.evict("a")  # b moves into a's slot

    with collector_armed() as arm:
        OnCollect(remove_a)
        arm()
        found = table.hit(headers, b"x-api-key", None, True)
    assert events == ["call", "finalizer"], events
    assert found is None, f"token a answered with {found[0]!r}"
    assert table.hit(headers, b"x-api-key", None, True) is None
    assert table.hit([(b"x-api-key", token("b"))], b"x-api-key", None, True)[0] is b


def hit_while_the_table_is_cleared(path: str) -> None:
    events: list[str] = []
    table = compiled_table(Now(events))
    put(table, APIKeyUser(key_id="a", owner="o", name="a"))
    headers = [(b"host", b"h"), (b"x-api-key", token("a"))]

    def clear() -> None:
        events.append("finalizer")
        table.clear()

    with collector_armed() as arm:
        OnCollect(clear)
        arm()
        found = table.hit(headers, b"x-api-key", None, True)
    assert events == ["call", "finalizer"], events
    assert found is None
    assert len(table) == 0 and table.states() == []
    assert table.hits == 0 and table.harvest() == []  # nothing counted for a declined hit


def hit_while_the_headers_change(path: str) -> None:
    events: list[str] = []
    table = compiled_table(Now(events))
    a = APIKeyUser(key_id="a", owner="o", name="a")
    put(table, a)
    headers = [(b"host", b"h"), (b"x-api-key", token("a")), (b"accept", b"*/*")]

    def empty_the_headers() -> None:
        events.append("finalizer")
        headers.clear()

    with collector_armed() as arm:
        OnCollect(empty_the_headers)
        arm()
        found = table.hit(headers, b"x-api-key", None, True)
    assert events == ["call", "finalizer"], events
    assert found is None


def states_while_the_table_shrinks(path: str) -> None:
    table = compiled_table()
    kept = [APIKeyUser(key_id=f"k{i}", owner="o", name="n") for i in range(4)]
    for user in kept:
        put(table, user)
    events: list[str] = []

    def remove_two() -> None:
        events.append("finalizer")
        table.evict("k0")
        table.evict("k3")

    with collector_armed() as arm:
        OnCollect(remove_two)
        arm()
        events.append("call")
        out = table.states()
    assert events == ["call", "finalizer"], events
    assert len(out) == len(table) == 2
    assert all(state[0] is not None for state in out)
    assert {state[0].key_id for state in out} == {"k1", "k2"}


def clear_while_a_release_inserts(path: str) -> None:
    table = compiled_table()
    x, y = APIKeyUser(key_id="x", owner="o", name="x"), APIKeyUser(key_id="y", owner="o", name="y")

    def refill() -> None:
        table.clear()  # again, from inside the first
        put(table, x)
        put(table, y)

    put(table, Releasing("a", refill))
    put(table, APIKeyUser(key_id="b", owner="o", name="b"))
    put(table, APIKeyUser(key_id="c", owner="o", name="c"))
    table.clear()
    assert len(table) == 2
    assert users(table) == [x, y]
    for name, user in (("x", x), ("y", y)):
        assert table.lookup(table.digest(token(name)), 1.0)[0] is user
        assert table.get(name)[0] is user
    for name in "abc":
        assert table.lookup(table.digest(token(name)), 1.0) is None
        assert table.get(name) is None


def clear_without_memory(path: str) -> None:
    import _testcapi  # type: ignore[import-not-found]

    table = compiled_table()
    for name in "abc":
        put(table, APIKeyUser(key_id=name, owner="o", name=name))
    _testcapi.set_nomemory(0, 1)  # the next allocation fails
    try:
        table.clear()
    finally:
        _testcapi.remove_mem_hooks()
    assert len(table) == 0 and table.states() == []
    assert table.lookup(table.digest(token("a")), 1.0) is None
    assert table.get("a") is None


def insert_whose_time_clears_the_table(path: str) -> None:
    table = compiled_table()
    for name in "abc":
        put(table, APIKeyUser(key_id=name, owner="o", name=name))

    class Clearing:
        def __float__(self) -> float:
            table.clear()
            return 1.0

    d = APIKeyUser(key_id="d", owner="o", name="d")
    put(table, d, checked_at=Clearing())  # converted before any slot is looked for
    assert len(table) == 1 and users(table) == [d]
    assert table.lookup(table.digest(token("d")), 1.0)[0] is d
    for name in "abc":
        assert table.lookup(table.digest(token(name)), 1.0) is None and name not in table
    assert not table.set_state(("a", d, (), None, Clearing(), True))  # a is gone


@compiled_only
@collector_in_allocations
@pytest.mark.parametrize(
    "scenario",
    [
        hit_while_the_key_moves,
        hit_while_the_table_is_cleared,
        hit_while_the_headers_change,
        states_while_the_table_shrinks,
    ],
)
def test_collection_inside_an_allocation(scenario: Scenario) -> None:
    """A finalizer run by a collection inside ``hit`` or ``states`` (evicting the key that
    matched, clearing, emptying the header list) never makes a token answer with another
    key's principal or crash: ``hit`` declines (and counts nothing), ``states`` lists what
    the table holds."""
    run_alone(scenario, "compiled")


@compiled_only
@pytest.mark.parametrize(
    "scenario", [clear_while_a_release_inserts, insert_whose_time_clears_the_table]
)
def test_python_code_inside_a_compiled_mutation(scenario: Scenario) -> None:
    """``clear`` takes the slots out before releasing them, so a finalizer that clears
    and inserts leaves a consistent table; ``insert`` and ``set_state`` find the key's slot
    after their arguments' conversions, which may change the table."""
    run_alone(scenario, "compiled")


@compiled_only
def test_clear_empties_the_table_without_memory() -> None:
    """Without memory to take the entries out, ``clear`` still empties the table (one at a
    time) rather than fail and leave every key cached."""
    pytest.importorskip("_testcapi")
    run_alone(clear_without_memory, "compiled")


# -- the cache, on both tables -----------------------------------------------------------------


def make_cache(path: str, max_size: int = 100) -> VerifiedKeyCache:
    return VerifiedKeyCache(max_size=max_size, compiled=path == "compiled", key=KEY)


def evict_while_a_release_evicts_the_moved_key(path: str) -> None:
    cache = make_cache(path)
    insert(cache, "a", lambda: cache.evict("c"))
    insert(cache, "b")
    insert(cache, "c")  # last: it moves into a's slot
    assert cache.evict("a")
    assert_holds(cache, {"b"}, "abc")


def clear_while_a_release_inserts_keys(path: str) -> None:
    cache = make_cache(path)

    def refill() -> None:
        insert(cache, "x")
        insert(cache, "y")

    insert(cache, "a", refill)
    insert(cache, "b")
    insert(cache, "c")
    cache.clear()
    assert_holds(cache, {"x", "y"}, "abcxyz")
    insert(cache, "z")
    assert_holds(cache, {"x", "y", "z"}, "abcxyz")


def insert_while_the_oldest_release_inserts_the_same_key(path: str) -> None:
    cache = make_cache(path, max_size=2)
    insert(cache, "a", lambda: insert(cache, "k"), now=0.0)
    insert(cache, "b", now=1.0)
    insert(cache, "k", now=2.0)  # a, the least recently used, makes room
    assert_holds(cache, {"b", "k"}, "abk")
    cache.evict("k")
    assert_holds(cache, {"b"}, "abk")


def evict_idle_while_a_release_evicts(path: str) -> None:
    cache = make_cache(path)
    insert(cache, "a", now=0.0)
    insert(cache, "x", now=100.0)
    insert(cache, "b", lambda: cache.evict("a"), now=0.0)
    insert(cache, "d", now=100.0)
    assert cache.evict_idle(50.0) == 2
    assert_holds(cache, {"x", "d"}, "abdx")


@pytest.mark.parametrize(
    "scenario",
    [
        evict_while_a_release_evicts_the_moved_key,
        clear_while_a_release_inserts_keys,
        insert_while_the_oldest_release_inserts_the_same_key,
        evict_idle_while_a_release_evicts,
    ],
)
@pytest.mark.parametrize("path", HIT_PATHS)
def test_a_released_entry_finds_the_cache_consistent(scenario: Scenario, path: str) -> None:
    """An entry's finalizer that evicts, inserts or re-inserts keys runs once the cache's
    table and index agree again: an evicted key is never found afterwards, nor a key under
    another's token, and nothing is left that no key id leads to."""
    run_alone(scenario, path)


def test_a_child_crash_fails() -> None:
    """The child-process runner reports a crash as a failure (it is what the tests rely on)."""
    with pytest.raises(AssertionError, match="exit status"):
        run_alone(crash, "compiled")


def crash(path: str) -> None:
    import ctypes

    ctypes.string_at(0)
