"""PyTable: the verified-key table in pure Python, what ``keystile._speedups.Table`` does
with the standard library only. The fallback where the C extension is not built, and the
oracle the tests hold the compiled table to.

Per key: its digest (the tag packed for the scan in :mod:`keystile.tagscan`, the whole
digest for ``hmac.compare_digest``), when it was last found, and a :class:`_Slot` with its
state (principal, ``request.auth`` scopes, expiry, when the state was read) and the uses
counted since the last harvest; a dict indexes the slots by key id. The layout of the
compiled table is in ``docs/architecture.md``, "The verified-key table".
"""

from __future__ import annotations

import hashlib
import hmac
import math
import sys
from array import array
from itertools import compress, repeat
from operator import lt
from typing import Any

from .tagscan import PackedTags
from .tokens import MAX_TOKEN_LENGTH

__all__ = ["DIGEST_SIZE", "SMALL_SCAN_SIZE", "PyTable", "SlotState", "State"]

DIGEST_SIZE = 32
_NO_DIGEST = bytes(DIGEST_SIZE)
_compare = hmac.compare_digest
#: Up to this many entries a plain loop of ``compare_digest`` (about 0.1 µs an entry) is
#: as fast as the packed scan (about 3 µs up to 512): ``benchmarks/purescan.py --crossover``.
SMALL_SCAN_SIZE = 32

#: A slot's state as a lookup answers it: principal, expiry (None: none), read time.
State = tuple[Any, "float | None", float]
#: What ``insert`` and ``set_state`` take: key id, principal, ``request.auth`` scopes,
#: expiry (None: none), when the state was read, whether the key is plain.
SlotState = tuple[str, Any, Any, "float | None", float, bool]


class _Slot:
    """One key's state and usage in the pure-Python table (``slot_state`` in C)."""

    __slots__ = ("checked", "expires", "key_id", "last_used", "plain", "scopes", "user", "uses")

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self.uses = 0
        self.last_used = 0.0

    def set(self, state: SlotState) -> None:
        _, self.user, self.scopes, expires, checked, self.plain = state
        self.expires = math.inf if expires is None else float(expires)
        self.checked = float(checked)

    def state(self) -> State:
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

    def lookup(self, digest: bytes, now: float) -> State | None:
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

    def insert(self, digest: bytes, state: SlotState, now: float, max_size: int) -> None:
        key_id = state[0]
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
        entry.set(state)
        self._digests[slot] = digest
        self._tags.put(slot, digest)
        self._seen[slot] = now
        del old, evicted  # last: a finalizer may use the table, and finds it whole

    def set_state(self, state: SlotState) -> bool:
        slot = self._index.get(state[0])
        if slot is None:
            return False
        entry = self._slots[slot]
        old = (entry.user, entry.scopes)
        entry.set(state)
        del old
        return True

    def get(self, key_id: str) -> State | None:
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

    def states(self) -> list[State]:
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
