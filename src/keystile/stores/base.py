"""The store contract: one ``KeyRecord`` shape and one ``KeyStore`` protocol.

Stores store. They know nothing of caching or hashing; they make each lifecycle change
atomic (one transaction) and tell listeners which key ids changed state, so caches in
this process (at once) and in other processes (NOTIFY on Postgres, a change log polled
on SQLite) can evict them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ChangeListener",
    "KeyRecord",
    "KeyStore",
    "LocalChangeBus",
    "utcnow",
]

#: Called with a key id whose state changed, or with ``None`` when changes may have
#: been missed (a listener reconnected) and every cached key must be re-checked.
ChangeListener = Callable[[str | None], None]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key as stored. ``secret_hash`` is the argon2id hash, never the secret."""

    id: str
    owner: str
    name: str
    prefix: str
    secret_hash: str = field(repr=False)
    scopes: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    #: The key this one replaced (``rotate`` or ``create(replace=True)``).
    replaces: str | None = None
    #: The key that replaced this one.
    replaced_by: str | None = None

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"

    def is_active(self, now: datetime | None = None) -> bool:
        return self.status(now) == "active"

    def to_public_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """Every field but the hash, JSON-ready (timestamps as ISO 8601)."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "prefix": self.prefix,
            "redacted": f"{self.prefix}_{self.id}…",
            "scopes": list(self.scopes),
            "metadata": dict(self.metadata),
            "status": self.status(now),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "replaces": self.replaces,
            "replaced_by": self.replaced_by,
        }


@runtime_checkable
class KeyStore(Protocol):
    """What the verifier, the usage recorder and the key manager need from a store.

    Owner-scoped methods (``revoke``, ``rotate``, ``get_owned``, ``list_keys``) only
    ever touch rows of that owner: a key id of another owner behaves as unknown.
    """

    #: The URL with any password removed, for messages.
    display_url: str

    async def open(self) -> None:
        """Connect and apply pending migrations (idempotent)."""

    async def close(self) -> None: ...

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]: ...

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None: ...

    async def list_keys(self, owner: str) -> list[KeyRecord]: ...

    async def insert(self, record: KeyRecord, *, replace: bool = False) -> list[str]:
        """Insert a new key in one transaction.

        If ``(owner, name)`` already has an active key: raise ``DuplicateKeyName``, or
        with ``replace=True`` revoke those keys (``replaced_by`` = the new id) and return
        their ids. Two concurrent replaces leave exactly one active key.
        """

    async def revoke(self, key_id: str, owner: str, *, at: datetime) -> bool:
        """Revoke an active key of ``owner``; ``False`` if there was nothing to revoke."""

    async def rotate(
        self, key_id: str, owner: str, successor: KeyRecord, *, grace_until: datetime
    ) -> KeyRecord | None:
        """Insert ``successor`` and give the old key ``expires_at = min(expires_at,
        grace_until)`` and ``replaced_by``, in one transaction. Returns the old key as
        updated, or ``None`` (nothing written) if it is not an active key of ``owner``
        or already has a successor (``replaced_by`` set).

        The check and the write are atomic: of two concurrent rotations of one key
        exactly one succeeds, so a name never gets two successors (two live keys without
        a grace expiry). The caller reads the key again to tell the two refusals apart."""

    async def reap(self, *, unused_since: datetime, at: datetime, dry_run: bool) -> list[KeyRecord]:
        """Revoke active keys last used (or, never used, created) before ``unused_since``,
        and expired keys not yet revoked. Returns them as they were before."""

    async def touch_many(self, touches: Mapping[str, datetime]) -> None:
        """Write ``last_used_at`` for many keys in one statement/transaction, never
        moving a timestamp backwards."""

    async def update_hash(self, key_id: str, secret_hash: str) -> None: ...

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` on every key state change; returns the unsubscribe call."""

    async def watch(self) -> None:
        """Relay state changes made by other processes to subscribers; runs until
        cancelled. Returns at once where the store has no other processes to hear."""


class LocalChangeBus:
    """Fan-out of key state changes to the listeners of one database in this process.

    Stores of the same database share one bus (by ``identity``), so a ``KeyManager`` and
    an ``APIKeyMiddleware`` built separately from the same URL still see each other's
    revocations at once. A listener is called on the thread and event loop it
    subscribed from.
    """

    _buses: dict[str, LocalChangeBus] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._listeners: dict[int, tuple[ChangeListener, asyncio.AbstractEventLoop | None]] = {}
        self._next = 0

    @classmethod
    def for_identity(cls, identity: str) -> LocalChangeBus:
        with cls._lock:
            bus = cls._buses.get(identity)
            if bus is None:
                bus = cls._buses[identity] = cls()
            return bus

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            token = self._next
            self._next += 1
            self._listeners[token] = (listener, loop)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(token, None)

        return unsubscribe

    def publish(self, key_id: str | None) -> None:
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        with self._lock:
            listeners = list(self._listeners.values())
        for listener, loop in listeners:
            # A loop that no longer runs (closed, or left behind by its runner) would never
            # deliver a queued revocation: call the listener here instead.
            if loop is None or loop is current or not loop.is_running():
                listener(key_id)
            else:
                loop.call_soon_threadsafe(listener, key_id)
