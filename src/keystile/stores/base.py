"""The store contract: one ``KeyRecord`` shape and one ``KeyStore`` protocol.

Stores store. They know nothing of caching or hashing; they make each lifecycle change
atomic (one transaction) and tell listeners which key ids changed state, so caches in
this process (at once) and in other processes (NOTIFY on Postgres, a change log polled
on SQLite) can evict them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, runtime_checkable

from ..errors import KeyManagementError

__all__ = [
    "EVENT_ACTIONS",
    "LIMIT_FIELDS",
    "SYSTEM_ACTOR",
    "UPDATABLE_FIELDS",
    "ChangeListener",
    "KeyEvent",
    "KeyRecord",
    "KeyStore",
    "LocalChangeBus",
    "QuotaState",
    "UsageBucket",
    "UsageCounts",
    "UsageTotal",
    "apply_uses",
    "check_updatable",
    "created_detail",
    "event_detail",
    "pruned_detail",
    "reaped_detail",
    "revoked_error",
    "rotated_detail",
    "update_action",
    "utcnow",
]

#: The usage-limit fields of a key.
LIMIT_FIELDS = frozenset(
    {"rate_limit", "quota", "quota_remaining", "quota_refill", "quota_reset_at"}
)
#: The fields ``KeyStore.update`` may change: everything but the id, the owner, the
#: secret and the lifecycle links (revocation and rotation have calls of their own).
UPDATABLE_FIELDS = LIMIT_FIELDS | frozenset(
    {"name", "scopes", "metadata", "expires_at", "ip_allowlist", "disabled_at"}
)
#: Who a change is attributed to when the caller names nobody (the background reaper).
SYSTEM_ACTOR = "system"
#: What an audit event can record.
EVENT_ACTIONS = frozenset(
    {
        "created",
        "replaced",
        "rotated",
        "revoked",
        "reaped",
        "updated",
        "disabled",
        "enabled",
        "logout",
        "pruned",
    }
)


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A key's quota as a batched usage write left it: what ``touch_many`` returns."""

    remaining: int
    reset_at: datetime | None


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """A key's use in one period starting at ``start`` (UTC): requests it authenticated,
    and attempts refused against its id (wrong secret, revoked, expired, disabled)."""

    start: datetime
    requests: int
    rejected: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``keystile usage --json``)."""
        return {
            "start": self.start.isoformat(),
            "requests": self.requests,
            "rejected": self.rejected,
        }


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """One key's use over a period: a row of ``KeyManager.top_keys``."""

    key_id: str
    name: str
    requests: int
    rejected: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "requests": self.requests,
            "rejected": self.rejected,
        }


#: What a usage flush writes: ``(key_id, minute start) -> (requests, rejected)``, added to
#: what the store already holds for that minute (other processes count the same minutes).
UsageCounts = Mapping[tuple[str, datetime], tuple[int, int]]


#: Called with a key id whose state changed, or with ``None`` when changes may have
#: been missed (a listener reconnected) and every cached key must be re-checked.
ChangeListener = Callable[[str | None], None]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def apply_uses(record: KeyRecord, at: datetime, uses: int) -> KeyRecord:
    """``record`` after ``uses`` counted at ``at``: a refill due by ``at`` first (the
    remaining count back to ``quota``, ``quota_reset_at`` to the period's start), then the
    uses taken, never below 0. The memory store's version of the SQL the others run."""
    if record.quota is None:
        return record
    remaining = record.quota_remaining if record.quota_remaining is not None else record.quota
    reset_at = record.quota_reset_at
    if record.quota_refill is not None and reset_at is not None:
        period = record.quota_refill.total_seconds()
        elapsed = (at - reset_at).total_seconds()
        if period > 0 and elapsed >= period:
            reset_at = reset_at + int(elapsed // period) * record.quota_refill
            remaining = record.quota
    return replace(record, quota_remaining=max(remaining - uses, 0), quota_reset_at=reset_at)


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
    #: Requests per period, normalised (``10/second``, ``100/minute``, ``1000/hour``,
    #: ``5/day``), or ``None``: no limit of its own (the middleware's default applies).
    rate_limit: str | None = None
    #: Uses allowed in all (or per ``quota_refill`` period), or ``None``: unlimited.
    quota: int | None = None
    #: Uses left as of the last batched usage write (``None`` without a quota).
    quota_remaining: int | None = None
    #: How often ``quota_remaining`` is set back to ``quota``; ``None``: never.
    quota_refill: timedelta | None = None
    #: When ``quota_remaining`` was last set to ``quota`` (created, updated or refilled):
    #: refills fall at this time plus whole multiples of ``quota_refill``.
    quota_reset_at: datetime | None = None
    #: When the key was disabled (``disable``), or ``None``. Unlike a revocation this is
    #: reversible (``enable``); a disabled key keeps its name.
    disabled_at: datetime | None = None
    #: CIDRs (IPv4 and IPv6, normalised) the key may be used from; empty: anywhere.
    ip_allowlist: tuple[str, ...] = ()

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``disabled``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        if self.disabled_at is not None:
            return "disabled"
        return "active"

    def is_active(self, now: datetime | None = None) -> bool:
        return self.status(now) == "active"

    def holds_name(self, now: datetime | None = None) -> bool:
        """Whether the key keeps its ``(owner, name)`` from other keys: neither revoked
        nor expired. A disabled key holds its name, so enabling it can never make two
        active keys of one name."""
        return self.revoked_at is None and (
            self.expires_at is None or self.expires_at > (now or utcnow())
        )

    def quota_left(self, now: datetime | None = None) -> int | None:
        """Uses left now: ``quota_remaining``, or the full ``quota`` when a refill fell
        due since the last usage write (the store applies it with the next one)."""
        if self.quota is None:
            return None
        if (
            self.quota_refill is not None
            and self.quota_reset_at is not None
            and (now or utcnow()) >= self.quota_reset_at + self.quota_refill
        ):
            return self.quota
        return self.quota_remaining if self.quota_remaining is not None else self.quota

    def next_refill(self, now: datetime | None = None) -> datetime | None:
        """When the quota is next set back to full, or ``None`` if it never is."""
        if self.quota is None or self.quota_refill is None or self.quota_reset_at is None:
            return None
        period = self.quota_refill.total_seconds()
        if period <= 0:
            return None
        elapsed = ((now or utcnow()) - self.quota_reset_at).total_seconds()
        periods = max(0, int(elapsed // period)) + 1
        return self.quota_reset_at + periods * self.quota_refill

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
            "rate_limit": self.rate_limit,
            "quota": self.quota,
            "quota_remaining": self.quota_left(now),
            "quota_refill": (
                self.quota_refill.total_seconds() if self.quota_refill is not None else None
            ),
            "quota_next_refill": iso(self.next_refill(now)),
            "disabled_at": iso(self.disabled_at),
            "ip_allowlist": list(self.ip_allowlist),
        }


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One audit-log entry: a change to a key, written in the change's own transaction.

    ``detail`` is JSON (for ``updated``: the fields set and their new values); it never
    holds a secret or a hash. A ``pruned`` event concerns the log itself, not a key:
    its ``key_id`` and ``owner`` are empty."""

    at: datetime
    key_id: str
    owner: str
    action: str
    actor: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: The store's sequence number: increasing in the order events were written.
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, one line per event for a SIEM (``keystile events --json``)."""
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "key_id": self.key_id,
            "owner": self.owner,
            "action": self.action,
            "actor": self.actor,
            "detail": dict(self.detail),
        }


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def check_updatable(changes: Mapping[str, Any]) -> None:
    """Refuse a change to a field ``update`` may not touch (the secret, the owner, ids)."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"update cannot change {', '.join(sorted(unknown))}")


def event_detail(changes: Mapping[str, Any]) -> dict[str, Any]:
    """An ``updated`` event's detail: each field set and its new value, as JSON. Never a
    secret: ``update`` cannot change the hash (``UPDATABLE_FIELDS``)."""
    detail = {name: _json_value(changes[name]) for name in sorted(changes)}
    json.dumps(detail)  # fail before the write, not inside it
    return detail


def created_detail(record: KeyRecord, replaces: str | None) -> dict[str, Any]:
    """A ``created`` event's detail: what the key was created with (name, scopes, expiry,
    limits, IP allowlist) and the names of its metadata keys. Metadata values are the
    caller's and may be sensitive, so they are left out; the hash is never written."""
    detail: dict[str, Any] = {
        "name": record.name,
        "scopes": list(record.scopes),
        "expires_at": _json_value(record.expires_at),
        "rate_limit": record.rate_limit,
        "quota": record.quota,
        "quota_refill": _json_value(record.quota_refill),
        "ip_allowlist": list(record.ip_allowlist),
        "metadata_keys": sorted(record.metadata),
    }
    if replaces is not None:
        detail["replaces"] = replaces
    return detail


def rotated_detail(successor: str, expires_at: datetime | None) -> dict[str, Any]:
    """A ``rotated`` event's detail: the successor and the old key's grace expiry."""
    return {"replaced_by": successor, "expires_at": _json_value(expires_at)}


def reaped_detail(record: KeyRecord, unused_since: datetime) -> dict[str, Any]:
    """A ``reaped`` event's detail: why the key was reaped."""
    last = record.last_used_at or record.created_at
    return {
        "why": "unused" if last < unused_since else "expired",
        "last_used_at": _json_value(record.last_used_at),
    }


def pruned_detail(before: datetime, count: int) -> dict[str, Any]:
    """A ``pruned`` event's detail: the cutoff (events before it were deleted) and how
    many were."""
    return {"cutoff": _json_value(before), "count": count}


def revoked_error(key_id: str, owner: str) -> KeyManagementError:
    """What changing a revoked key raises: a revocation is final for the record too."""
    return KeyManagementError(
        f"key {key_id!r} of owner {owner!r} is revoked; a revoked key cannot be changed,"
        " disabled or enabled (create a new key instead)"
    )


def update_action(changes: Mapping[str, Any]) -> str:
    """``disabled``/``enabled`` for a change of ``disabled_at`` alone, else ``updated``."""
    if set(changes) == {"disabled_at"}:
        return "enabled" if changes["disabled_at"] is None else "disabled"
    return "updated"


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

    async def list_all(self) -> list[KeyRecord]:
        """Every owner's keys, by owner then age: for operators, never for a request."""

    async def insert(
        self, record: KeyRecord, *, replace: bool = False, actor: str = SYSTEM_ACTOR
    ) -> list[str]:
        """Insert a new key in one transaction, with its ``created`` event.

        If ``(owner, name)`` already has a key holding the name (``holds_name``): raise
        ``DuplicateKeyName``, or with ``replace=True`` revoke those keys (``replaced_by`` =
        the new id, a ``replaced`` event each) and return their ids. Two concurrent
        replaces leave exactly one active key.
        """

    async def revoke(
        self,
        key_id: str,
        owner: str,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
        action: str = "revoked",
    ) -> bool:
        """Revoke an unrevoked key of ``owner`` and record ``action`` (``revoked``, or
        ``logout``) in the same transaction; ``False`` if there was nothing to revoke."""

    async def rotate(
        self,
        key_id: str,
        owner: str,
        successor: KeyRecord,
        *,
        grace_until: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        """Insert ``successor`` and give the old key ``expires_at = min(expires_at,
        grace_until)`` and ``replaced_by``, in one transaction with a ``rotated`` event
        (old key) and a ``created`` event (successor). Returns the old key as updated, or
        ``None`` (nothing written) if it is not an active key of ``owner`` (disabled keys
        are not) or already has a successor (``replaced_by`` set).

        The check and the write are atomic: of two concurrent rotations of one key
        exactly one succeeds, so a name never gets two successors (two live keys without
        a grace expiry). The caller reads the key again to tell the two refusals apart."""

    async def reap(
        self,
        *,
        unused_since: datetime,
        at: datetime,
        dry_run: bool,
        include_disabled: bool = False,
        actor: str = SYSTEM_ACTOR,
    ) -> list[KeyRecord]:
        """Revoke active keys last used (or, never used, created) before ``unused_since``,
        and expired keys not yet revoked, each with a ``reaped`` event. Disabled keys are
        left alone unless ``include_disabled``. Returns them as they were before."""

    async def touch_many(
        self, touches: Mapping[str, datetime], uses: Mapping[str, int] | None = None
    ) -> dict[str, QuotaState]:
        """Write ``last_used_at`` for many keys in one statement/transaction, never
        moving a timestamp backwards, and take ``uses[key_id]`` from the remaining quota
        of keys that have one (never below 0; a refill due by the key's ``touches`` time
        first sets it back to ``quota``, and ``quota_reset_at`` to the period's start).

        Returns the quota state after the write of every touched key that has a quota,
        so each process learns what the others used."""

    async def add_usage(self, counts: UsageCounts) -> None:
        """Add per-minute request and rejection counts, in one statement (Postgres: an
        upsert from ``unnest``) or one transaction, never one write per request."""

    async def usage(
        self,
        key_id: str,
        owner: str,
        *,
        since: datetime,
        until: datetime | None,
        bucket_seconds: int,
    ) -> list[UsageBucket]:
        """``owner``'s key's counts from ``since`` (inclusive) to ``until`` (exclusive),
        summed into buckets of ``bucket_seconds`` aligned to the Unix epoch (UTC), oldest
        first; only buckets with counts. Another owner's key reads as empty."""

    async def top_usage(
        self, owner: str, *, since: datetime, until: datetime | None, limit: int
    ) -> list[UsageTotal]:
        """``owner``'s ``limit`` busiest keys over the period, most requests first."""

    async def prune_usage(self, *, before: datetime, limit: int) -> int:
        """Delete at most ``limit`` usage rows of minutes before ``before``; how many."""

    async def update(
        self,
        key_id: str,
        owner: str,
        changes: Mapping[str, Any],
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        """Change fields of ``owner``'s key in one transaction, without touching its
        secret, record the event (``update_action``: ``updated``, ``disabled`` or
        ``enabled``, detail ``event_detail(changes)``) and tell every process (bus,
        NOTIFY, change log) as a revoke does.

        ``changes`` maps ``UPDATABLE_FIELDS`` to new values, already validated. If the key
        holds its name after the change and another key of ``owner`` holds that name,
        raise ``DuplicateKeyName`` (decided atomically, as ``insert`` does) and write
        nothing. A revoked key raises ``revoked_error`` and is not written, decided in the
        same statement as the write (``revoked_at IS NULL``), so an update racing a
        revocation never changes the revoked record. Returns the key as updated, or
        ``None`` if ``owner`` has no such key (nothing written). An empty ``changes``
        writes nothing and returns the key (a revoked one: raises)."""

    async def list_events(
        self,
        *,
        owner: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        """Audit events, oldest first, filtered by owner, key and time (``at >= since``);
        with ``limit``, the newest ``limit`` of them."""

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        """Delete audit events older than ``before`` and record a ``pruned`` event
        (``pruned_detail``, no key, no owner) in the same transaction, after the delete,
        so the prune never deletes its own record; returns how many were deleted."""

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
