"""The negative cache: recently refused tokens, answered without a store read or argon2.

A refusal is remembered by the token's keyed digest for ``ttl`` seconds, at most
``maxsize`` of them; the least recently asked leaves first. A refusal decided by a key's
state (expired, disabled, revoked: the secret matched) also names its key id, and is
indexed by it, because a change of that key (``enable``, a new expiry) must forget it at
once. The index is why a change event costs the entries of its own key and nothing
else: a reaper revoking a thousand keys during a guessing flood sends a thousand events,
and each must not walk ten thousand remembered guesses on the event loop.

Every removal (expiry, eviction, a forgotten key) goes through one method, so the index
never names an entry that is gone, nor misses one that is there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["NegativeCache"]


class NegativeCache:
    """Digest → (reason, key id or ``None``), with a TTL and an LRU bound."""

    __slots__ = ("_by_key", "_entries", "_timer", "maxsize", "ttl")

    def __init__(self, *, maxsize: int, ttl: float, timer: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._timer = timer
        #: In least recently asked order: (reason, key id, expiry time).
        self._entries: OrderedDict[bytes, tuple[str, str | None, float]] = OrderedDict()
        #: Key id → digests of its state-decided refusals.
        self._by_key: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> tuple[str, str | None] | None:
        """The remembered refusal of ``digest``, if it has not expired."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if self._timer() >= entry[2]:
            self._drop(digest)
            return None
        self._entries.move_to_end(digest)
        return entry[0], entry[1]

    def remember(self, digest: bytes, reason: str, key_id: str | None = None) -> None:
        """Remember a refusal; ``key_id`` only for one that key's state decided."""
        now = self._timer()
        self._drop(digest)
        self._expire(now)
        while len(self._entries) >= self.maxsize:
            self._drop(next(iter(self._entries)))
        self._entries[digest] = (reason, key_id, now + self.ttl)
        if key_id is not None:
            self._by_key.setdefault(key_id, set()).add(digest)

    def forget_key(self, key_id: str) -> int:
        """Forget the state-decided refusals of ``key_id``; how many there were."""
        digests = self._by_key.get(key_id)
        if not digests:
            return 0
        forgotten = list(digests)
        for digest in forgotten:
            self._drop(digest)
        return len(forgotten)

    def forget_state_decided(self) -> int:
        """Forget every state-decided refusal (changes may have been missed)."""
        forgotten = 0
        for key_id in list(self._by_key):
            forgotten += self.forget_key(key_id)
        return forgotten

    def key_ids(self) -> frozenset[str]:
        """The key ids whose state-decided refusals are remembered."""
        return frozenset(self._by_key)

    def _expire(self, now: float) -> None:
        """Drop expired entries from the least recently asked end. One asked since it was
        remembered may expire further in; ``get`` drops it when asked, eviction when due."""
        entries = self._entries
        while entries:
            digest, (_, _, expires) = next(iter(entries.items()))
            if now < expires:
                return
            self._drop(digest)

    def _drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is None or entry[1] is None:
            return
        digests = self._by_key[entry[1]]
        digests.discard(digest)
        if not digests:
            del self._by_key[entry[1]]
