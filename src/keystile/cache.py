"""VerifiedKeyCache: keys whose secret this process has already proven with argon2.

A lookup must take the same time whether or where the presented token sits in the
cache, or the timing leaks which cached digest a guess is close to. So:

* the presented token is reduced to a keyed digest (BLAKE2b, 32 bytes, with a random
  key made per process, so digests are useless outside it);
* the first 8 bytes of every cached digest (its *tag*) sit in one contiguous array,
  live entries packed in ``[0, size)``;
* a lookup compares the probe's tag with **all** tags and finds the first *and* the last
  matching slot, reading the whole array wherever the match is;
* both candidates (or dummies) are then compared on the full 32-byte digest in constant
  time, so a tag collision can never authenticate. (A third live entry sharing a 64-bit
  tag of a secretly keyed digest, between the first and the last, would only ever be
  missed, never confused: it is re-verified on the miss path.)

The table holding tags, digests, last-use times and entries comes in two builds with one
interface: ``keystile._speedups.Table`` (C: header walk, BLAKE2b and a branch-free
AVX2/SSE2/scalar scan in one call, see ``_speedups.c``) and :class:`PyTable` below (a
SWAR compare of every tag over Python integers, :mod:`keystile.tagscan`, then
``hmac.compare_digest``; below ``SMALL_SCAN_SIZE`` entries a plain ``compare_digest``
loop). ``keystile._accel`` picks one at import; the pure one is the fallback and the
oracle of the tests.

Inserts and evictions are O(1) amortised: arrays are grown by doubling, and an evicted
slot is filled by moving the last entry into it.

The cache knows nothing of stores: the verifier decides what goes in and when an
entry's state must be re-read. It is not thread-safe; use it from one event loop.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import secrets
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from itertools import compress, repeat
from operator import lt
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _accel
from .principal import APIKeyUser
from .tagscan import PackedTags
from .tokens import MAX_TOKEN_LENGTH

if TYPE_CHECKING:
    from ._speedups import Table as CompiledTable

__all__ = ["CachedKey", "PyTable", "VerifiedKeyCache", "auth_scopes", "is_plain"]

DIGEST_SIZE = 32
_NO_DIGEST = bytes(DIGEST_SIZE)
_compare = hmac.compare_digest
#: Up to this many entries a plain loop of ``compare_digest`` (about 0.1 µs an entry) is
#: as fast as the packed scan (about 3 µs up to 512): ``benchmarks/purescan.py --crossover``.
SMALL_SCAN_SIZE = 32
#: Key ids whose eviction epochs are remembered before the memory is reset.
_EVICTION_MEMORY = 4096


@functools.lru_cache(maxsize=1024)
def auth_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """One shared tuple per distinct scope set (most keys share a few)."""
    return ("authenticated", *scopes)


def is_plain(user: APIKeyUser) -> bool:
    """A key without limits of its own or an IP allowlist: admitting it checks nothing of
    its own, so the table may count its use as it answers the hit."""
    return user.limits is None and user.ip_allowlist is None


class CachedKey(NamedTuple):
    """A cached key's state as of one lookup: a snapshot, not what the table stores."""

    user: APIKeyUser
    #: Wall-clock epoch seconds, or None for no expiry. Checked on every hit.
    expires_at: float | None
    #: Monotonic time the state was last read from the store.
    checked_at: float

    @property
    def key_id(self) -> str:
        return self.user.key_id

    @property
    def auth_scopes(self) -> tuple[str, ...]:
        """The scopes of ``request.auth``: "authenticated" first, as Starlette's own
        authentication backends set it, so ``@requires("authenticated")`` works. A tuple
        shared by every key with the same scopes: each request gets its own
        ``AuthCredentials`` list built from it."""
        return auth_scopes(self.user.scopes)


class _Slot:
    """One key's state and usage in the pure-Python table (``slot_state`` in C)."""

    __slots__ = ("checked", "expires", "key_id", "last_used", "plain", "scopes", "user", "uses")

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self.uses = 0
        self.last_used = 0.0

    def set(
        self, user: Any, scopes: Any, expires: float | None, checked: float, plain: bool
    ) -> None:
        self.user = user
        self.scopes = scopes
        self.expires = math.inf if expires is None else float(expires)
        self.checked = float(checked)
        self.plain = plain

    def state(self) -> tuple[Any, float | None, float]:
        return (self.user, None if self.expires == math.inf else self.expires, self.checked)


class PyTable:
    """The pure-Python table: what ``keystile._speedups.Table`` does, with the standard
    library only (the tag scan is :mod:`keystile.tagscan`). The oracle of the tests."""

    __slots__ = (
        "_digests",
        "_hasher",
        "_index",
        "_released",
        "_seen",
        "_slots",
        "_tags",
        "count_uses",
        "hits",
        "minute_end",
        "pending",
        "pending_limit",
        "ttl",
    )

    def __init__(self, key: bytes, max_token_length: int = MAX_TOKEN_LENGTH) -> None:
        self._hasher = hashlib.blake2b(key=key, digest_size=DIGEST_SIZE)
        self._digests: list[bytes] = []
        self._slots: list[_Slot] = []
        self._index: dict[str, int] = {}
        self._tags = PackedTags()
        #: Monotonic time of each slot's last use.
        self._seen = array("d")
        self._released: list[tuple[str, float, int]] = []
        self.ttl = math.inf
        self.count_uses = False
        self.minute_end = math.inf
        self.pending = 0
        self.pending_limit = sys.maxsize
        self.hits = 0

    def digest(self, token: bytes) -> bytes:
        hasher = self._hasher.copy()
        hasher.update(token)
        return hasher.digest()

    def lookup(self, digest: bytes, now: float) -> tuple[Any, float | None, float] | None:
        slot = self._find(digest)
        if slot < 0:
            return None
        self._seen[slot] = now
        return self._slots[slot].state()

    def _find(self, digest: bytes) -> int:
        if len(self._digests) <= SMALL_SCAN_SIZE:
            # Few entries: compare_digest against every one (no early exit) beats the
            # packed scan's fixed cost; still a full scan whose time depends on the size.
            found = -1
            for slot, stored in enumerate(self._digests):
                if _compare(stored, digest):
                    found = slot
            return found
        first, last = self._tags.first_and_last(digest)
        if first == last:  # one candidate, or none (a dummy is compared then)
            matched = _compare(self._digests[first] if first >= 0 else _NO_DIGEST, digest)
            return first if matched and first >= 0 else -1
        if _compare(self._digests[first], digest):
            return first
        if _compare(self._digests[last], digest):
            return last
        return -1

    def insert(
        self,
        digest: bytes,
        key_id: str,
        user: Any,
        scopes: Any,
        expires_at: float | None,
        checked_at: float,
        plain: bool,
        now: float,
        max_size: int,
    ) -> None:
        slot = self._index.get(key_id)
        old: Any = None
        evicted: Any = None
        if slot is not None:
            entry = self._slots[slot]
            old = (entry.user, entry.scopes)
        else:
            if len(self._slots) >= max_size and self._slots:
                evicted = self._take(self._oldest())
            slot = len(self._slots)
            entry = _Slot(key_id)
            self._slots.append(entry)
            self._digests.append(digest)
            self._tags.append(digest)
            self._seen.append(now)
            self._index[key_id] = slot
        entry.set(user, scopes, expires_at, checked_at, plain)
        self._digests[slot] = digest
        self._tags.put(slot, digest)
        self._seen[slot] = now
        del old, evicted  # last: a finalizer may use the table, and finds it whole

    def set_state(
        self,
        key_id: str,
        user: Any,
        scopes: Any,
        expires_at: float | None,
        checked_at: float,
        plain: bool,
    ) -> bool:
        slot = self._index.get(key_id)
        if slot is None:
            return False
        entry = self._slots[slot]
        old = (entry.user, entry.scopes)
        entry.set(user, scopes, expires_at, checked_at, plain)
        del old
        return True

    def get(self, key_id: str) -> tuple[Any, float | None, float] | None:
        slot = self._index.get(key_id)
        return None if slot is None else self._slots[slot].state()

    def evict(self, key_id: str) -> bool:
        slot = self._index.get(key_id)
        if slot is None:
            return False
        taken = self._take(slot)
        del taken
        return True

    def evict_idle(self, since: float) -> int:
        seen = self._seen
        idle = list(compress(range(len(seen)), map(lt, seen, repeat(since))))
        # Held until every slot is gone: a finalizer run between two removals could move
        # the slots the others name.
        taken = [self._take(slot) for slot in reversed(idle)]
        return len(taken)

    def clear(self) -> None:
        """Empty the table first, then drop the slots: their finalizers find it empty."""
        taken = [self._take(slot) for slot in reversed(range(len(self._slots)))]
        del taken

    def invalidate(self) -> None:
        for entry in self._slots:
            entry.checked = -math.inf

    def stale(self, before: float) -> list[str]:
        return [e.key_id for e in self._slots if e.checked < before]

    def states(self) -> list[tuple[Any, float | None, float]]:
        return [e.state() for e in self._slots]

    def harvest(self) -> list[tuple[str, float, int]]:
        out, self._released = self._released, []
        for entry in self._slots:
            if entry.uses:
                out.append((entry.key_id, entry.last_used, entry.uses))
                entry.uses = 0
        self.pending = 0
        return out

    def set_clocks(self, monotonic: Any, clock: Any) -> None:
        """The pure path reads its clocks in Python (``Verifier.hit``); nothing to keep."""

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._index

    def __len__(self) -> int:
        return len(self._slots)

    def _oldest(self) -> int:
        seen = self._seen
        return seen.index(min(seen))

    def _take(self, slot: int) -> _Slot:
        """Remove ``slot`` (the last slot moves into it); the slot removed, for the caller
        to drop once the table is whole again."""
        taken = self._slots[slot]
        del self._index[taken.key_id]
        if taken.uses:
            self.pending -= 1
            self._released.append((taken.key_id, taken.last_used, taken.uses))
        last = len(self._slots) - 1
        if slot != last:
            moved = self._slots[slot] = self._slots[last]
            self._digests[slot] = self._digests[last]
            self._seen[slot] = self._seen[last]
            self._index[moved.key_id] = slot
        self._tags.remove(slot)
        self._digests.pop()
        self._seen.pop()
        self._slots.pop()
        return taken


class VerifiedKeyCache:
    __slots__ = (
        "_cleared_at",
        "_evicted",
        "_table",
        "epoch",
        "hit_request",
        "max_size",
    )

    def __init__(
        self,
        *,
        max_size: int = 100_000,
        compiled: bool | None = None,
        key: bytes | None = None,
        ttl: float = math.inf,
    ) -> None:
        """``compiled``: the C table (``True``), the pure-Python one (``False``), or the one
        ``keystile._accel`` chose (``None``). ``key`` (tests only): the BLAKE2b key, else a
        random one per cache. ``ttl``: seconds a key's state may be old on a compiled hit."""
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if compiled is None:
            compiled = _accel.Table is not None
        key = key if key is not None else secrets.token_bytes(32)
        table: CompiledTable | PyTable
        hit_request = None
        if not compiled:
            table = PyTable(key, MAX_TOKEN_LENGTH)
        elif _accel.Table is None:
            raise RuntimeError("keystile._speedups is not available")
        else:
            table = _accel.Table(key, MAX_TOKEN_LENGTH)
            hit_request = table.hit
        table.ttl = ttl
        self.max_size = max_size
        self._table = table
        #: ``Table.hit``: the whole hit path in one C call, or ``None`` (pure Python).
        self.hit_request: Any = hit_request
        #: Bumped by every eviction, so a verification that read the store before an
        #: eviction cannot put back the state the eviction removed (``changed_since``).
        self.epoch = 0
        #: The epoch of each key id's last eviction, and of the last clear.
        self._evicted: dict[str, int] = {}
        self._cleared_at = 0

    @property
    def compiled(self) -> bool:
        return self.hit_request is not None

    @property
    def table(self) -> CompiledTable | PyTable:
        """The table: its usage counts (``harvest``, ``pending``, ``count_uses``,
        ``minute_end``, ``pending_limit``) are read and steered by the usage recorder."""
        return self._table

    @property
    def hits(self) -> int:
        """Hits the compiled path answered (``Verifier`` counts the others)."""
        return self._table.hits

    def set_clocks(
        self, monotonic: Callable[[], float], clock: Callable[[], float], *, ttl: float
    ) -> None:
        """The clocks and the state TTL of the compiled hit path (the system's clocks are
        read in C, without a call)."""
        self._table.set_clocks(
            None if monotonic is time.monotonic else monotonic,
            None if clock is time.time else clock,
        )
        self._table.ttl = ttl

    # -- the hot path ---------------------------------------------------------------

    def digest(self, token: bytes) -> bytes:
        """The keyed digest of a presented token (the only form the cache ever holds)."""
        return self._table.digest(token)

    def lookup(self, digest: bytes, now: float) -> CachedKey | None:
        """Find the entry for ``digest`` comparing every entry, with no early exit.

        ``now`` (monotonic) marks the entry as used, for idle and size eviction.
        """
        found = self._table.lookup(digest, now)
        return None if found is None else _snapshot(found)

    # -- maintenance (miss path and background) -------------------------------------

    def changed_since(self, key_id: str, epoch: int) -> bool:
        """Whether ``key_id`` was evicted (its state changed) after ``epoch`` was read.

        A reader takes ``epoch`` before it reads a key's state from the store; if this is
        then true, what it read may predate the change and must not be trusted or cached.
        """
        return epoch < self._cleared_at or self._evicted.get(key_id, -1) > epoch

    def insert(self, digest: bytes, entry: CachedKey, *, now: float, epoch: int) -> bool:
        """Cache a proven key; refused (``False``) if the key was evicted since ``epoch``
        was read, because the state in hand may be what was evicted. A new key in a full
        cache takes the place of the one least recently used."""
        if self.changed_since(entry.key_id, epoch):
            return False
        user = entry.user
        self._table.insert(
            digest,
            user.key_id,
            user,
            auth_scopes(user.scopes),
            entry.expires_at,
            entry.checked_at,
            is_plain(user),
            now,
            self.max_size,
        )
        return True

    def get(self, key_id: str) -> CachedKey | None:
        found = self._table.get(key_id)
        return None if found is None else _snapshot(found)

    def replace_state(self, entry: CachedKey, *, epoch: int) -> bool:
        """Swap in fresh state for a key already cached (its digest is unchanged); refused
        (``False``) if the key was evicted since ``epoch``, as ``insert`` is."""
        if entry.key_id not in self._table or self.changed_since(entry.key_id, epoch):
            return False
        user = entry.user
        return self._table.set_state(
            user.key_id,
            user,
            auth_scopes(user.scopes),
            entry.expires_at,
            entry.checked_at,
            is_plain(user),
        )

    def evict(self, key_id: str) -> bool:
        self.epoch += 1
        if len(self._evicted) >= _EVICTION_MEMORY:
            # Forget per-key history, conservatively: every older reader now sees a change.
            self._evicted.clear()
            self._cleared_at = self.epoch
        self._evicted[key_id] = self.epoch
        return self._table.evict(key_id)

    def clear(self) -> None:
        self.epoch += 1
        self._evicted.clear()
        self._cleared_at = self.epoch
        self._table.clear()

    def invalidate(self) -> None:
        """Make every cached key's state stale: each is read again from the store before
        its next use (one batched read, no argon2: the secrets stay proven). Readers that
        read any key's state before this see a change, as after ``clear``."""
        self.epoch += 1
        self._evicted.clear()
        self._cleared_at = self.epoch
        self._table.invalidate()

    def evict_idle(self, idle_since: float) -> int:
        """Drop entries not used since ``idle_since`` (monotonic); returns how many."""
        return self._table.evict_idle(idle_since)

    def checked_before(self, when: float) -> list[str]:
        """The key ids whose state was last read before ``when`` (monotonic)."""
        return self._table.stale(when)

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[CachedKey]:
        return iter([_snapshot(state) for state in self._table.states()])


def _snapshot(state: tuple[Any, float | None, float]) -> CachedKey:
    return tuple.__new__(CachedKey, state)
