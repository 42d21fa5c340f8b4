"""The store contract: the ``KeyStore`` protocol every store implements, and the
``ChangeListener`` it calls.

Stores store. They know nothing of caching or hashing; they make each lifecycle change
atomic (one transaction) and tell listeners which key ids changed state, so caches in
this process (at once) and in other processes (NOTIFY on Postgres, a change log polled
on SQLite) can evict them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from .hooks import Attempt, ClaimedDelivery, Delivery, Webhook
from .records import (
    KeyEvent,
    KeyRecord,
    OwnerLimits,
    QuotaState,
    UsageBucket,
    UsageCounts,
    UsageTotal,
)
from .rules import SYSTEM_ACTOR

__all__ = ["ChangeListener", "KeyStore"]

#: Called with a key id whose state changed, or with ``None`` when changes may have
#: been missed (a listener reconnected) and every cached key must be re-checked.
ChangeListener = Callable[[str | None], None]


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
        self,
        record: KeyRecord,
        *,
        replace: bool = False,
        actor: str = SYSTEM_ACTOR,
        max_keys: int | None = None,
    ) -> list[str]:
        """Insert a new key in one transaction, with its ``created`` event.

        If ``(owner, name)`` already has a key holding the name (``holds_name``): raise
        ``DuplicateKeyName``, or with ``replace=True`` revoke those keys (``replaced_by`` =
        the new id, a ``replaced`` event each) and return their ids. Two concurrent
        replaces leave exactly one active key. With ``max_keys``, raise ``KeyLimitReached``
        when the owner would hold more live keys (counted in the same transaction).
        """

    async def import_keys(
        self,
        records: Sequence[KeyRecord],
        *,
        details: Mapping[str, Mapping[str, Any]],
        actor: str = SYSTEM_ACTOR,
    ) -> list[str]:
        """Insert the keys another library issued (``keystile.importers``), in one
        transaction, each with an ``imported`` event (its detail: ``details[id]``); a key
        whose id is taken is left as it is. Returns the ids inserted. Names are not
        checked here: the importer renames a key whose name another key holds."""

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
        self,
        touches: Mapping[str, datetime],
        uses: Mapping[str, int] | None = None,
        *,
        batch: str | None = None,
    ) -> dict[str, QuotaState]:
        """Write ``last_used_at`` for many keys in one statement/transaction, never
        moving a timestamp backwards, and take ``uses[budget_id]`` from the remaining
        quota of every key of that budget that has one (a rotation chain: all spent
        together; ``owner:NAME``: the owner's quota); never below 0; a refill due by the
        budget's ``touches`` time, else now, first sets it back to ``quota``, and
        ``quota_reset_at`` to the period's start.

        ``batch`` names the uses: a store that took a batch of that name (within
        ``BATCH_MEMORY``) takes nothing again, decided in the same transaction, so a
        flush retried after a lost acknowledgement is a no-op.

        Returns the quota state after the write of every budget touched or spent that
        has a quota (``rules.budget_states``), so each process learns what the others
        used."""

    async def get_owner_limits(self, owner: str) -> OwnerLimits | None:
        """``owner``'s own limits, with its quota's count as the flushes left it."""

    async def set_owner_limits(
        self,
        owner: str,
        limits: OwnerLimits | None,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> bool:
        """Set ``owner``'s limits (``None``: remove them) in one transaction that copies
        them onto every key of the owner (``KeyRecord.owner_limits``; a key created later
        takes them in its own insert) and records an ``owner_limits`` event; every
        process hears of each key as of a revocation. ``False``: there were none to
        remove (nothing written)."""

    async def add_usage(self, counts: UsageCounts) -> None:
        """Add per-minute request and rejection counts, in one statement (Postgres: an
        upsert from ``unnest``) or one transaction, never one write per request."""

    async def usage(
        self,
        key_id: str | None,
        owner: str,
        *,
        since: datetime,
        until: datetime | None,
        bucket_seconds: int,
    ) -> list[UsageBucket]:
        """``owner``'s key's counts from ``since`` (inclusive) to ``until`` (exclusive),
        summed into buckets of ``bucket_seconds`` aligned to the Unix epoch (UTC), oldest
        first; only buckets with counts. Another owner's key reads as empty;
        ``key_id=None`` sums every key of ``owner``."""

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

    async def record_event(self, event: KeyEvent) -> None:
        """Append an event that changes no key (``leaked``: a report that the key was
        found in public), in a transaction of its own."""

    # -- webhooks (``stores.hooks``) -------------------------------------------------
    # Every audit event a webhook wants is queued as a delivery in the event's own
    # transaction; these calls manage the webhooks and work through the outbox.

    async def add_webhook(self, webhook: Webhook) -> None: ...

    async def list_webhooks(self) -> list[Webhook]: ...

    async def remove_webhook(self, webhook_id: str) -> bool:
        """Remove it and give up on its pending deliveries; ``False`` if unknown."""

    async def enqueue_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Queue deliveries not made by an audit event (a test, an expiry notice)."""

    async def claim_deliveries(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedDelivery]:
        """Up to ``limit`` pending deliveries due by ``now`` that no other process holds,
        held by this one until ``lease_until`` (then another may take them: a process
        that died mid-delivery does not lose them)."""

    async def finish_delivery(self, attempt: Attempt, next_attempt_at: datetime | None) -> None:
        """Record ``attempt`` and its outcome, and release the delivery."""

    async def list_deliveries(
        self, *, webhook_id: str | None = None, limit: int = 100
    ) -> list[Delivery]: ...

    async def list_attempts(self, *, delivery_id: str | None = None) -> list[Attempt]: ...

    async def keys_expiring(self, *, after: datetime, until: datetime) -> list[KeyRecord]:
        """Unrevoked keys whose expiry falls in ``(after, until]`` (expiry notices)."""

    async def update_hash(
        self, key_id: str, secret_hash: str, *, replacing: str | None = None
    ) -> None:
        """Store a new hash of the key's secret. With ``replacing``, only while the stored
        hash is still that one (two processes upgrading one key write once); replacing an
        imported hash (``rules.IMPORTED_HASH``) also records a ``rehashed`` event in the
        same transaction."""

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call ``listener`` on every key state change; returns the unsubscribe call."""

    async def watch(self) -> None:
        """Relay state changes made by other processes to subscribers; runs until
        cancelled. Returns at once where the store has no other processes to hear."""
