"""The compiled hit path (``keystile._speedups``) against the pure-Python one, its oracle.

The reference for ``Table.hit`` is what the middleware does without it:
``split_credential`` and a lookup in a pure-Python cache holding the same entries under
the same BLAKE2b key. Where the compiled path answers, it must answer the same; where it
declines (``None``), the pure-Python path must either not hit, or the request must be one
of the unusual ones it is allowed to leave to Python.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hitpaths import COMPILED_AVAILABLE
from keystile import _accel
from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.credentials import split_credential
from keystile.errors import InvalidRequest
from keystile.principal import APIKeyUser
from keystile.tokens import MAX_TOKEN_LENGTH, generate_key, key_matcher

pytestmark = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")

if COMPILED_AVAILABLE:
    from keystile import _speedups

    KERNELS: tuple[str, ...] = _speedups.kernels()
else:  # pragma: no cover
    KERNELS = ()

KEY = bytes(range(32))
Headers = list[tuple[bytes, bytes]]


@pytest.fixture(params=KERNELS or ["none"])
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each scan kernel this CPU runs (AVX2, SSE2, scalar), restored afterwards."""
    before = _speedups.kernel()
    _speedups.set_kernel(request.param)
    try:
        yield request.param
    finally:
        _speedups.set_kernel(before)


def same(found: CachedKey | None, entry: CachedKey) -> bool:
    """``found`` is ``entry``'s state: the same principal, expiry and read time (a lookup
    answers with a snapshot of the slot, not the object inserted)."""
    return found is not None and found == entry and found.user is entry.user


def entry(key_id: str) -> CachedKey:
    return CachedKey(APIKeyUser(key_id=key_id, owner="o", name=key_id), None, 0.0)


def pair(max_size: int = 100_000) -> tuple[VerifiedKeyCache, VerifiedKeyCache]:
    """A compiled and a pure cache with the same BLAKE2b key."""
    return (
        VerifiedKeyCache(max_size=max_size, compiled=True, key=KEY),
        VerifiedKeyCache(max_size=max_size, compiled=False, key=KEY),
    )


def insert_both(
    caches: tuple[VerifiedKeyCache, ...], digest: bytes, item: CachedKey, now: float
) -> None:
    for cache in caches:
        assert cache.insert(digest, item, now=now, epoch=cache.epoch)


# -- BLAKE2b --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=1, max_size=64), message=st.binary(max_size=400))
def test_digest_is_keyed_blake2b(key: bytes, message: bytes) -> None:
    """The C digest is hashlib's keyed BLAKE2b-256, for any key and length (0, 128, 129 ...)."""
    table = _speedups.Table(key, MAX_TOKEN_LENGTH)
    assert table.digest(message) == hashlib.blake2b(message, key=key, digest_size=32).digest()


@pytest.mark.parametrize("length", [0, 1, 63, 64, 79, 127, 128, 129, 255, 256, 257])
def test_digest_block_boundaries(length: int) -> None:
    """Block boundaries, where a hand-written BLAKE2b goes wrong first."""
    message = bytes(random.getrandbits(8) for _ in range(length))
    table = _speedups.Table(KEY, MAX_TOKEN_LENGTH)
    assert table.digest(message) == hashlib.blake2b(message, key=KEY, digest_size=32).digest()


# -- the scan: every position, every kernel, forced tag collisions --------------------------


def crafted(tag: int, tail: int) -> bytes:
    return tag.to_bytes(8, "little") + tail.to_bytes(24, "little")


@pytest.mark.parametrize("size", [*range(0, 18), 31, 32, 33, 255, 256, 257, 1000])
def test_keys_at_every_position(kernel: str, size: int) -> None:
    """Every entry is found at every position, and an absent digest is not, on every kernel
    and size (sizes that are not a multiple of the vector width included)."""
    compiled, pure = pair()
    digests = [hashlib.sha256(f"{size}:{i}".encode()).digest() for i in range(size)]
    items = [entry(f"k{i}") for i in range(size)]
    for i, (d, item) in enumerate(zip(digests, items, strict=True)):
        insert_both((compiled, pure), d, item, float(i))
    for d, item in zip(digests, items, strict=True):
        assert same(compiled.lookup(d, 1e6), item)
        assert same(pure.lookup(d, 1e6), item)
    assert compiled.lookup(hashlib.sha256(b"absent").digest(), 1e6) is None


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8, 9, 40])
def test_forced_tag_collisions_at_every_pair_of_positions(kernel: str, size: int) -> None:
    """Two entries sharing a tag, at any two positions: each finds itself, a third digest
    with the same tag finds nothing, and so does the tag with a zero tail."""
    for a in range(size):
        for b in range(a + 1, size):
            compiled, pure = pair()
            digests = [crafted(1000 + i, i) for i in range(size)]
            digests[a], digests[b] = crafted(7, 1), crafted(7, 2)
            items = [entry(f"k{i}") for i in range(size)]
            for i in range(size):
                insert_both((compiled, pure), digests[i], items[i], float(i))
            for cache in (compiled, pure):
                assert same(cache.lookup(digests[a], 1.0), items[a])
                assert same(cache.lookup(digests[b], 1.0), items[b])
                assert cache.lookup(crafted(7, 3), 1.0) is None
                assert cache.lookup(crafted(7, 0), 1.0) is None


def test_zero_digest_matches_nothing_in_an_empty_table(kernel: str) -> None:
    """The dummy compared when no tag matches never counts as a match."""
    compiled, _ = pair()
    assert compiled.lookup(bytes(32), 1.0) is None
    insert_both((compiled,), crafted(5, 5), entry("a"), 1.0)
    assert compiled.lookup(bytes(32), 1.0) is None
    insert_both((compiled,), bytes(32), entry("z"), 1.0)
    found = compiled.lookup(bytes(32), 1.0)
    assert found is not None and found.key_id == "z"


@settings(max_examples=150, deadline=None)
@given(
    tags=st.lists(st.integers(0, 3), max_size=70),
    probe=st.integers(0, 4),
)
def test_kernels_agree_on_first_and_last_match(tags: list[int], probe: int) -> None:
    """All kernels find the same (first, last) candidates as a plain loop would."""
    digests = [crafted(t, i) for i, t in enumerate(tags)]
    expected_slots = [i for i, t in enumerate(tags) if t == probe]
    before = _speedups.kernel()
    try:
        for name in KERNELS:
            _speedups.set_kernel(name)
            cache = VerifiedKeyCache(compiled=True, key=KEY)
            items = [entry(f"k{i}") for i in range(len(tags))]
            for i, d in enumerate(digests):
                insert_both((cache,), d, items[i], 0.0)
            for slot in expected_slots:
                found = cache.lookup(digests[slot], 0.0)
                # With a third live entry on the same tag, a middle one may be missed
                # (never confused); first and last are always found.
                if slot in (expected_slots[0], expected_slots[-1]):
                    assert same(found, items[slot]), name
                else:
                    assert found is None or same(found, items[slot]), name
    finally:
        _speedups.set_kernel(before)


# -- the header walk ---------------------------------------------------------------------------

TOKENS = [generate_key()[0].encode() for _ in range(6)]
CACHED = TOKENS[:4]
OTHER_PREFIX = generate_key(prefix="zz")[0].encode()


def reference(
    pure: VerifiedKeyCache,
    headers: Any,
    header: bytes,
    prefixes: tuple[bytes, ...] | None,
    now: float,
) -> tuple[CachedKey, Headers] | str | None:
    """What the pure-Python path makes of the request: a hit, no hit, or "refused"."""
    is_ours = key_matcher(p.decode()[:-1] for p in prefixes) if prefixes is not None else None
    try:
        token, _, without = split_credential(headers, header, is_ours)
    except InvalidRequest:
        return "refused"
    if token is None or len(token) > MAX_TOKEN_LENGTH:
        return None
    found = pure.lookup(pure.digest(token), now)
    if found is None:
        return None
    assert without is not None
    return found, without


def may_decline(headers: Headers, header: bytes, prefixes: tuple[bytes, ...] | None) -> bool:
    """The unusual requests the compiled path may leave to Python even when they hit."""
    credentials = 0
    for name, value in headers:
        if name == b"authorization":
            parts = value.split(None, 1)
            if parts and parts[0].lower() == b"bearer":
                credentials += 1
                token = parts[1].strip() if len(parts) == 2 else b""
                if prefixes is not None and token and not token.startswith(prefixes):
                    return True
        elif name == header:
            credentials += 1
    return credentials > 8


def hit(
    compiled: VerifiedKeyCache,
    headers: Any,
    header: bytes = b"x-api-key",
    prefixes: tuple[bytes, ...] | None = None,
    now: float = 5.0,
) -> Any:
    """The compiled hit at monotonic time ``now`` (with the state TTL off)."""
    assert compiled.hit_request is not None
    compiled.set_clocks(lambda: now, time.time, ttl=math.inf)
    return compiled.hit_request(headers, header, prefixes, True)


def check_hit(
    compiled: VerifiedKeyCache,
    pure: VerifiedKeyCache,
    headers: Any,
    header: bytes = b"x-api-key",
    prefixes: tuple[bytes, ...] | None = None,
    now: float = 5.0,
) -> None:
    got = hit(compiled, headers, header, prefixes, now)
    want = reference(pure, headers, header, prefixes, now)
    if got is not None:
        assert isinstance(want, tuple), (headers, want)
        user, auth_scopes, without, counted = got
        assert user is want[0].user
        assert auth_scopes == want[0].auth_scopes
        assert without == want[1]
        assert all(a is b for a, b in zip(without, want[1], strict=True))
        assert counted is False  # a table no usage recorder counts with
    elif isinstance(want, tuple):
        assert may_decline(headers, header, prefixes), headers


@pytest.fixture(scope="module")
def filled() -> tuple[VerifiedKeyCache, VerifiedKeyCache]:
    compiled, pure = pair()
    for i, token in enumerate([*CACHED, OTHER_PREFIX]):
        insert_both((compiled, pure), compiled.digest(token), entry(f"id{i}"), float(i))
    return compiled, pure


pad = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t ", b"\x0b", b"\x0c", b"\r\n"])
token_st = st.one_of(
    st.sampled_from([*TOKENS, OTHER_PREFIX]),
    st.sampled_from(TOKENS).map(lambda t: t[:-1]),
    st.binary(max_size=90),
    st.just(b""),
    st.sampled_from(TOKENS).map(lambda t: t + b" extra"),
    st.just(b"x" * 300),
)
scheme_st = st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"bEaReR", b"Basic", b"BearerX", b""])


@st.composite
def credential(draw: st.DrawFn) -> tuple[bytes, bytes]:
    token = draw(token_st)
    name = draw(st.sampled_from([b"authorization", b"x-api-key", b"x-my-key"]))
    if name == b"authorization":
        sep = draw(st.sampled_from([b" ", b"\t", b"  ", b"", b"\n"]))
        return name, draw(pad) + draw(scheme_st) + sep + token + draw(pad)
    return name, draw(pad) + token + draw(pad)


noise = st.tuples(
    st.sampled_from([b"host", b"authorizatio", b"x-api-keys", b"authorization2", b"cookie"]),
    st.binary(max_size=30),
)


@st.composite
def header_lists(draw: st.DrawFn) -> Headers:
    creds = draw(st.lists(credential(), max_size=4))
    if creds and draw(st.booleans()):
        creds += [draw(st.sampled_from(creds))] * draw(st.integers(1, 9))
    return draw(st.permutations(creds + draw(st.lists(noise, max_size=4))))


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    headers=header_lists(),
    header=st.sampled_from([b"x-api-key", b"x-my-key"]),
    prefixes=st.sampled_from([None, (b"ks_",), (b"zz_", b"ks_")]),
)
def test_hit_agrees_with_the_pure_path(
    filled: tuple[VerifiedKeyCache, VerifiedKeyCache],
    headers: Headers,
    header: bytes,
    prefixes: tuple[bytes, ...] | None,
) -> None:
    """Hypothesis header lists: both headers, repeats, conflicts, any Bearer case, the
    strip list, whitespace, the bearer filter: the compiled path agrees with Python."""
    check_hit(*filled, headers, header, prefixes)


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"authorization", b"x-api-key", b"other"]),
            st.one_of(
                st.binary(max_size=100),
                st.sampled_from(CACHED).map(lambda t: b"Bearer " + t),
                st.tuples(
                    st.binary(max_size=4), st.sampled_from(CACHED), st.binary(max_size=4)
                ).map(b"".join),
            ),
        ),
        max_size=6,
    )
)
def test_random_header_bytes_agree(
    filled: tuple[VerifiedKeyCache, VerifiedKeyCache], headers: Headers
) -> None:
    """Random bytes around cached keys (NUL, CR, LF, non-ASCII) change nothing."""
    check_hit(*filled, headers)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer " + CACHED[0])],
        [(b"x-api-key", CACHED[0])],
        [(b"authorization", b"bearer " + CACHED[0]), (b"x-api-key", b" " + CACHED[0] + b" ")],
        [(b"host", b"h"), (b"authorization", b"Basic abc"), (b"x-api-key", CACHED[1])],
        [(b"authorization", b"Bearer " + CACHED[0]), (b"x-api-key", CACHED[1])],  # conflict
        [(b"authorization", b"Bearer")],
        [(b"x-api-key", b"   ")],
        [(b"authorization", b"Bearer " + TOKENS[5])],  # not cached
        [(b"authorization", b"Bearer " + CACHED[0] + b" x")],
        [],
    ],
)
def test_plain_cases(filled: tuple[VerifiedKeyCache, VerifiedKeyCache], headers: Headers) -> None:
    """The cases the README names, one by one."""
    check_hit(*filled, headers)
    check_hit(*filled, headers, prefixes=(b"ks_",))


def test_common_hit_is_handled_in_c(filled: tuple[VerifiedKeyCache, VerifiedKeyCache]) -> None:
    """A plain hit never declines, with or without the bearer filter."""
    compiled, _ = filled
    headers = [(b"host", b"h"), (b"authorization", b"Bearer " + CACHED[2]), (b"accept", b"*/*")]
    for prefixes in (None, (b"ks_",)):
        found = hit(compiled, headers, b"x-api-key", prefixes, 1.0)
        assert found is not None
        assert found[2] == [headers[0], headers[2]]


@pytest.mark.parametrize(
    "headers",
    [
        ((b"authorization", b"Bearer " + CACHED[0]),),  # a tuple, not a list
        [[b"authorization", b"Bearer " + CACHED[0]]],  # a list item
        [(b"authorization", "Bearer " + CACHED[0].decode())],  # str
        [(b"authorization", b"Bearer " + CACHED[0], b"extra")],
    ],
)
def test_odd_header_containers_decline(
    filled: tuple[VerifiedKeyCache, VerifiedKeyCache], headers: Any
) -> None:
    """Header lists that are not lists of (bytes, bytes) are left to Python."""
    compiled, _ = filled
    assert hit(compiled, headers, b"x-api-key", None, 1.0) is None


def test_hit_marks_the_entry_used(filled: tuple[VerifiedKeyCache, VerifiedKeyCache]) -> None:
    """A compiled hit updates the entry's last use, as a lookup does (idle eviction)."""
    compiled, pure = pair()
    insert_both((compiled, pure), compiled.digest(CACHED[0]), entry("a"), 1.0)
    assert hit(compiled, [(b"x-api-key", CACHED[0])], b"x-api-key", None, 50.0)
    assert compiled.evict_idle(10.0) == 0
    assert compiled.evict_idle(60.0) == 1


# -- evictions and growth, step by step against the pure cache ------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 5), st.integers(0, 1)),
        st.tuples(
            st.just("hit"),
            st.integers(0, 11),
            st.sampled_from([b"authorization", b"x-api-key"]),
        ),
        st.tuples(st.just("evict"), st.integers(0, 5)),
        st.tuples(st.just("evict_idle"), st.integers(0, 60)),
        st.tuples(st.just("bulk"), st.integers(1, 300)),
        st.just(("clear",)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(ops=operations, max_size=st.sampled_from([1, 3, 8, 300, 100_000]))
def test_evictions_and_growth_agree(ops: list[tuple[Any, ...]], max_size: int) -> None:
    """Inserts (new keys and new digests for old ones), evictions, idle evictions, LRU
    evictions at max_size, growth past the initial capacity and clears: after every step,
    the compiled and the pure cache answer every request alike."""
    compiled, pure = pair(max_size)
    # Two tokens per key id (a digest is never cached for two key ids: the token holds
    # the id): inserting the second one replaces the first's digest.
    tokens = [generate_key()[0].encode() for _ in range(12)]
    clock = iter(range(1, 10**6))
    bulk = iter(range(10**6))
    for op in ops:
        kind = op[0]
        if kind == "insert":
            token = tokens[2 * op[1] + op[2]]
            insert_both(
                (compiled, pure), compiled.digest(token), entry(f"id{op[1]}"), float(next(clock))
            )
        elif kind == "bulk":
            for _ in range(op[1]):
                key_id = f"bulk{next(bulk)}"
                digest = hashlib.sha256(key_id.encode()).digest()
                insert_both((compiled, pure), digest, entry(key_id), float(next(clock)))
        elif kind == "hit":
            name = op[2]
            value = b"Bearer " + tokens[op[1]] if name == b"authorization" else tokens[op[1]]
            now = float(next(clock))
            check_hit(compiled, pure, [(b"host", b"h"), (name, value)], now=now)
        elif kind == "evict":
            assert compiled.evict(f"id{op[1]}") == pure.evict(f"id{op[1]}")
        elif kind == "evict_idle":
            assert compiled.evict_idle(float(op[1])) == pure.evict_idle(float(op[1]))
        else:
            compiled.clear()
            pure.clear()
        assert len(compiled) == len(pure)
        assert {e.key_id for e in compiled} == {e.key_id for e in pure}
    for token in tokens:
        check_hit(compiled, pure, [(b"x-api-key", token)])


# -- choosing the implementation ----------------------------------------------------------------


def _import_in_subprocess(**env: str) -> subprocess.CompletedProcess[str]:
    code = "import keystile._accel as a; print(a.compiled_kernel())"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "KEYSTILE_PURE_PYTHON": "", "KEYSTILE_REQUIRE_SPEEDUPS": "", **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_compiled_path_is_chosen_by_default() -> None:
    """Without a variable set, keystile uses the compiled path where it is built."""
    done = _import_in_subprocess()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("avx2", "sse2", "scalar")


def test_pure_python_can_be_forced() -> None:
    """KEYSTILE_PURE_PYTHON=1 makes every new cache pure Python."""
    done = _import_in_subprocess(KEYSTILE_PURE_PYTHON="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def test_require_speedups_fails_loudly_when_pure() -> None:
    """KEYSTILE_REQUIRE_SPEEDUPS=1 turns a pure-Python run into an import error."""
    done = _import_in_subprocess(KEYSTILE_PURE_PYTHON="1", KEYSTILE_REQUIRE_SPEEDUPS="1")
    assert done.returncode != 0
    assert "KEYSTILE_REQUIRE_SPEEDUPS" in done.stderr


def test_require_speedups_passes_when_compiled() -> None:
    done = _import_in_subprocess(KEYSTILE_REQUIRE_SPEEDUPS="1")
    assert done.returncode == 0, done.stderr


def test_no_key_material_in_reprs() -> None:
    """The table's repr shows no digest and no key."""
    compiled, _ = pair()
    insert_both((compiled,), compiled.digest(CACHED[0]), entry("a"), 1.0)
    text = repr(compiled._table)
    assert KEY.hex() not in text and compiled.digest(CACHED[0]).hex() not in text
    assert _accel.Table is not None
