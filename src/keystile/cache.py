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
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import lt
from typing import TYPE_CHECKING, Any

from . import _accel
from .principal import APIKeyUser
from .tagscan import PackedTags
from .tokens import MAX_TOKEN_LENGTH

if TYPE_CHECKING:
    from ._speedups import Table as CompiledTable

__all__ = ["CachedKey", "PyTable", "VerifiedKeyCache"]

DIGEST_SIZE = 32
_NO_DIGEST = bytes(DIGEST_SIZE)
_compare = hmac.compare_digest
#: Up to this many entries a plain loop of ``compare_digest`` (about 0.1 µs an entry) is
#: as fast as the packed scan (about 3 µs up to 512): ``benchmarks/purescan.py --crossover``.
SMALL_SCAN_SIZE = 32
#: Key ids whose eviction epochs are remembered before the memory is reset.
_EVICTION_MEMORY = 4096


@functools.lru_cache(maxsize=1024)
def _auth_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """One shared tuple per distinct scope set (most keys share a few)."""
    return ("authenticated", *scopes)


@dataclass(slots=True, eq=False)
class CachedKey:
    """A proven key and the state last read for it from the store."""

    user: APIKeyUser
    #: Wall-clock epoch seconds, or None for no expiry. Checked on every hit.
    expires_at: float | None
    #: Monotonic time the state was last read from the store.
    checked_at: float
    #: Monotonic time a re-read last failed (store down); -inf if it never did.
    refresh_failed_at: float = float("-inf")
    #: The scopes of ``request.auth``: "authenticated" first, as Starlette's own
    #: authentication backends set it, so ``@requires("authenticated")`` works. A tuple
    #: shared by every key with the same scopes: each request gets its own
    #: ``AuthCredentials`` list built from it.
    auth_scopes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.auth_scopes = _auth_scopes(self.user.scopes)

    @property
    def key_id(self) -> str:
        return self.user.key_id


class PyTable:
    """The pure-Python table: what ``keystile._speedups.Table`` does, with the standard
    library only (the tag scan is :mod:`keystile.tagscan`)."""

    __slots__ = ("_digests", "_entries", "_hasher", "_seen", "_tags")

    def __init__(self, key: bytes, max_token_length: int = MAX_TOKEN_LENGTH) -> None:
        self._hasher = hashlib.blake2b(key=key, digest_size=DIGEST_SIZE)
        self._digests: list[bytes] = []
        self._entries: list[Any] = []
        self._tags = PackedTags()
        #: Monotonic time of each slot's last use.
        self._seen = array("d")

    def digest(self, token: bytes) -> bytes:
        hasher = self._hasher.copy()
        hasher.update(token)
        return hasher.digest()

    def lookup(self, digest: bytes, now: float) -> Any:
        if len(self._digests) <= SMALL_SCAN_SIZE:
            # Few entries: compare_digest against every one (no early exit) beats the
            # packed scan's fixed cost; still a full scan whose time depends on the size.
            found = -1
            for slot, stored in enumerate(self._digests):
                if _compare(stored, digest):
                    found = slot
            if found < 0:
                return None
            self._seen[found] = now
            return self._entries[found]
        first, last = self._tags.first_and_last(digest)
        if first == last:  # one candidate, or none (a dummy is compared then)
            matched = _compare(self._digests[first] if first >= 0 else _NO_DIGEST, digest)
            if not matched or first < 0:
                return None
            slot = first
        elif _compare(self._digests[first], digest):
            slot = first
        elif _compare(self._digests[last], digest):
            slot = last
        else:
            return None
        self._seen[slot] = now
        return self._entries[slot]

    def append(self, digest: bytes, entry: Any, now: float) -> int:
        slot = len(self._digests)
        self._entries.append(entry)
        self._digests.append(digest)
        self._tags.append(digest)
        self._seen.append(now)
        return slot

    def put(self, slot: int, digest: bytes, entry: Any, now: float) -> None:
        self._digests[slot] = digest
        self._tags.put(slot, digest)
        self._seen[slot] = now
        self._entries[slot] = entry  # last: the old entry's finalizer may use the table

    def set_entry(self, slot: int, entry: Any) -> None:
        self._entries[slot] = entry

    def entry(self, slot: int) -> Any:
        return self._entries[slot]

    def digest_at(self, slot: int) -> bytes:
        return self._digests[slot]

    def remove(self, slot: int) -> Any:
        """Remove ``slot``; the entry moved into it from the end, or ``None``.

        The entries list changes last: dropping the removed entry may run its finalizer,
        which may use the table, and must find it whole."""
        last = len(self._digests) - 1
        if slot != last:
            self._digests[slot] = self._digests[last]
            self._seen[slot] = self._seen[last]
        self._tags.remove(slot)
        self._digests.pop()
        self._seen.pop()
        moved = self._entries.pop()
        if slot == last:
            return None
        self._entries[slot] = moved
        return moved

    def clear(self) -> None:
        """Empty the table first, then drop the entries: their finalizers find it empty."""
        entries = self._entries
        self._entries = []
        self._digests = []
        self._tags.clear()
        del self._seen[:]
        entries.clear()

    def oldest(self) -> int:
        seen = self._seen
        return seen.index(min(seen)) if seen else -1

    def idle(self, since: float) -> list[int]:
        seen = self._seen
        return list(compress(range(len(seen)), map(lt, seen, repeat(since))))

    def entries(self) -> list[Any]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._digests)


class VerifiedKeyCache:
    __slots__ = (
        "_cleared_at",
        "_evicted",
        "_slot_of",
        "_table",
        "epoch",
        "hit_request",
        "max_size",
    )

    def __init__(
        self, *, max_size: int = 100_000, compiled: bool | None = None, key: bytes | None = None
    ) -> None:
        """``compiled``: the C table (``True``), the pure-Python one (``False``), or the one
        ``keystile._accel`` chose (``None``). ``key`` (tests only): the BLAKE2b key, else a
        random one per cache."""
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
        self.max_size = max_size
        self._table = table
        #: ``Table.hit``: the whole hit path in one C call, or ``None`` (pure Python).
        self.hit_request: Any = hit_request
        self._slot_of: dict[str, int] = {}
        #: Bumped by every eviction, so a verification that read the store before an
        #: eviction cannot put back the state the eviction removed (``changed_since``).
        self.epoch = 0
        #: The epoch of each key id's last eviction, and of the last clear.
        self._evicted: dict[str, int] = {}
        self._cleared_at = 0

    @property
    def compiled(self) -> bool:
        return self.hit_request is not None

    # -- the hot path ---------------------------------------------------------------

    def digest(self, token: bytes) -> bytes:
        """The keyed digest of a presented token (the only form the cache ever holds)."""
        return self._table.digest(token)

    def lookup(self, digest: bytes, now: float) -> CachedKey | None:
        """Find the entry for ``digest`` comparing every entry, with no early exit.

        ``now`` (monotonic) marks the entry as used, for idle and size eviction.
        """
        return self._table.lookup(digest, now)  # type: ignore[no-any-return]

    # -- maintenance (miss path and background) -------------------------------------

    def changed_since(self, key_id: str, epoch: int) -> bool:
        """Whether ``key_id`` was evicted (its state changed) after ``epoch`` was read.

        A reader takes ``epoch`` before it reads a key's state from the store; if this is
        then true, what it read may predate the change and must not be trusted or cached.
        """
        return epoch < self._cleared_at or self._evicted.get(key_id, -1) > epoch

    def insert(self, digest: bytes, entry: CachedKey, *, now: float, epoch: int) -> bool:
        """Cache a proven key; refused (``False``) if the key was evicted since ``epoch``
        was read, because the state in hand may be what was evicted."""
        if self.changed_since(entry.key_id, epoch):
            return False
        slot = self._slot_of.get(entry.key_id)
        if slot is not None:
            self._table.put(slot, digest, entry, now)
            return True
        full = len(self._table) >= self.max_size
        evicted = self._remove(self._table.oldest()) if full else None
        self._slot_of[entry.key_id] = self._table.append(digest, entry, now)
        del evicted  # only now that the key is in: its finalizer may insert the same key id
        return True

    def get(self, key_id: str) -> CachedKey | None:
        slot = self._slot_of.get(key_id)
        return self._table.entry(slot) if slot is not None else None

    def replace_state(self, entry: CachedKey, *, epoch: int) -> bool:
        """Swap in fresh state for a key already cached (its digest is unchanged); refused
        (``False``) if the key was evicted since ``epoch``, as ``insert`` is."""
        slot = self._slot_of.get(entry.key_id)
        if slot is None or self.changed_since(entry.key_id, epoch):
            return False
        self._table.set_entry(slot, entry)
        return True

    def evict(self, key_id: str) -> bool:
        self.epoch += 1
        if len(self._evicted) >= _EVICTION_MEMORY:
            # Forget per-key history, conservatively: every older reader now sees a change.
            self._evicted.clear()
            self._cleared_at = self.epoch
        self._evicted[key_id] = self.epoch
        slot = self._slot_of.get(key_id)
        if slot is None:
            return False
        self._remove(slot)
        return True

    def clear(self) -> None:
        self.epoch += 1
        self._evicted.clear()
        self._cleared_at = self.epoch
        self._slot_of.clear()
        self._table.clear()

    def invalidate(self) -> None:
        """Make every cached key's state stale: each is read again from the store before
        its next use (one batched read, no argon2: the secrets stay proven). Readers that
        read any key's state before this see a change, as after ``clear``."""
        self.epoch += 1
        self._evicted.clear()
        self._cleared_at = self.epoch
        for entry in self._table.entries():
            entry.checked_at = -math.inf

    def evict_idle(self, idle_since: float) -> int:
        """Drop entries not used since ``idle_since`` (monotonic); returns how many."""
        idle = self._table.idle(idle_since)
        # Held until every slot is gone: a finalizer that ran between two removals could
        # move the entries the remaining slots name.
        removed = [self._remove(slot) for slot in reversed(idle)]
        return len(removed)

    def checked_before(self, when: float) -> list[CachedKey]:
        """Entries whose state was last read before ``when`` (monotonic)."""
        return [e for e in self._table.entries() if e.checked_at < when]

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[CachedKey]:
        return iter(self._table.entries())

    # -- internals --------------------------------------------------------------------

    def _remove(self, slot: int) -> CachedKey:
        """Remove ``slot``; the entry removed, for the caller to drop once the cache is
        whole again (dropping it may run a finalizer, and a finalizer may use the cache)."""
        removed: CachedKey = self._table.entry(slot)
        del self._slot_of[removed.key_id]
        moved = self._table.remove(slot)
        if moved is not None:
            self._slot_of[moved.key_id] = slot
        return removed
