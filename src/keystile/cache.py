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

The table holds, per key, its tag and digest and its state: the principal, its
``request.auth`` scopes, its expiry, when its state was read from the store and when it
was last found, and the uses a compiled hit counted since the usage recorder last
harvested them; and an index from key id to slot. A lookup answers with a
:class:`CachedKey`, the slot's state as of that lookup: no object per key is kept. It
comes in two builds with one interface: ``keystile._speedups.Table`` (C: header walk,
BLAKE2b, a branch-free AVX2/SSE2/scalar scan, freshness, expiry and the use counted in
one call; the layout is in ``docs/architecture.md``, "The verified-key table") and
:class:`~keystile.pytable.PyTable` (a SWAR compare of every tag over Python integers,
:mod:`keystile.tagscan`, then ``hmac.compare_digest``; below ``SMALL_SCAN_SIZE`` entries
a plain ``compare_digest`` loop). ``keystile._accel`` picks one at import; the pure one is
the fallback and the oracle of the tests.

Inserts and evictions are O(1) amortised: arrays are grown by doubling, and an evicted
slot is filled by moving the last slot into it.

The cache knows nothing of stores: the verifier decides what goes in and when an
entry's state must be re-read. It is not thread-safe; use it from one event loop.
"""

from __future__ import annotations

import functools
import math
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _accel
from .principal import APIKeyUser
from .pytable import SMALL_SCAN_SIZE, PyTable, SlotState, State
from .tokens import MAX_TOKEN_LENGTH

if TYPE_CHECKING:
    from ._speedups import Table as CompiledTable

__all__ = [
    "SMALL_SCAN_SIZE",
    "CachedKey",
    "PyTable",
    "VerifiedKeyCache",
    "auth_scopes",
    "is_plain",
]

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
        self._table.insert(digest, _slot_state(entry), now, self.max_size)
        return True

    def get(self, key_id: str) -> CachedKey | None:
        found = self._table.get(key_id)
        return None if found is None else _snapshot(found)

    def replace_state(self, entry: CachedKey, *, epoch: int) -> bool:
        """Swap in fresh state for a key already cached (its digest is unchanged); refused
        (``False``) if the key was evicted since ``epoch``, as ``insert`` is."""
        if entry.key_id not in self._table or self.changed_since(entry.key_id, epoch):
            return False
        return self._table.set_state(_slot_state(entry))

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


def _slot_state(entry: CachedKey) -> SlotState:
    user = entry.user
    return (
        user.key_id,
        user,
        auth_scopes(user.scopes),
        entry.expires_at,
        entry.checked_at,
        is_plain(user),
    )


def _snapshot(state: State) -> CachedKey:
    return tuple.__new__(CachedKey, state)
