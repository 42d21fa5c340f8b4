"""``memory://``: dicts in this process, for unit tests and throwaway demos.

``memory://`` alone is a fresh store; ``memory://NAME`` is shared by every store opened
with that name in this process (so a ``KeyManager`` and a middleware can share one).
Each change and its audit event are written with no ``await`` between them, so they
happen together or not at all, as a transaction would make them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from datetime import datetime, timezone

from .bus import LocalChangeBus
from .calls import (
    Change,
    EventQuery,
    Importing,
    Insertion,
    Reaping,
    Rotation,
    Touching,
    UsageQuery,
)
from .common import CommonStore
from .hooks import Attempt, ClaimedDelivery, Delivery, Outbox, Webhook
from .records import (
    KeyEvent,
    KeyRecord,
    OwnerLimits,
    QuotaState,
    UsageBucket,
    UsageCounts,
    UsageTotal,
    utcnow,
)
from .rules import (
    BATCH_MEMORY,
    SYSTEM_ACTOR,
    apply_uses,
    budget_states,
    grace_expiry,
    pruned_event,
    rehashed_event,
    rotatable,
)

__all__ = ["MemoryKeyStore"]

_anonymous = itertools.count()


class MemoryKeyStore(CommonStore):
    _named: dict[str, dict[str, KeyRecord]] = {}
    _named_events: dict[str, list[KeyEvent]] = {}
    _named_usage: dict[str, dict[tuple[str, datetime], list[int]]] = {}
    _named_batches: dict[str, dict[str, datetime]] = {}
    _named_owners: dict[str, dict[str, OwnerLimits]] = {}
    _named_outboxes: dict[str, Outbox] = {}

    def __init__(self, name: str | None = None) -> None:
        if name:
            self._rows = self._named.setdefault(name, {})
            self._events = self._named_events.setdefault(name, [])
            self._usage = self._named_usage.setdefault(name, {})
            self._batches = self._named_batches.setdefault(name, {})
            self._owners = self._named_owners.setdefault(name, {})
            self._outbox = self._named_outboxes.setdefault(name, Outbox())
            identity = f"memory://{name}"
        else:
            self._rows = {}
            self._events = []
            self._usage = {}
            self._batches = {}
            self._owners = {}
            self._outbox = Outbox()
            identity = f"memory://#{next(_anonymous)}"
        self.display_url = identity
        self._bus = LocalChangeBus.for_identity(identity)

    def _log(self, events: Sequence[KeyEvent]) -> None:
        for event in events:
            seq = self._events[-1].id + 1 if self._events else 1
            self._events.append(dataclasses.replace(event, id=seq))
        names = {e.key_id: self._rows[e.key_id].name for e in events if e.key_id in self._rows}
        self._outbox.log(events, names, utcnow())

    def _owned(self, key_id: str, owner: str) -> KeyRecord | None:
        record = self._rows.get(key_id)
        return record if record is not None and record.owner == owner else None

    def _holders(self, owner: str, name: str, now: datetime) -> list[KeyRecord]:
        """The keys of ``owner`` holding ``name`` at ``now``, in insertion order."""
        return [
            r
            for r in self._rows.values()
            if r.owner == owner and r.name == name and r.holds_name(now)
        ]

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def get(self, key_id: str) -> KeyRecord | None:
        return self._rows.get(key_id)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        return {k: self._rows[k] for k in key_ids if k in self._rows}

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None:
        return self._owned(key_id, owner)

    async def list_keys(self, owner: str) -> list[KeyRecord]:
        rows = [r for r in self._rows.values() if r.owner == owner]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

    async def list_all(self) -> list[KeyRecord]:
        return sorted(self._rows.values(), key=lambda r: (r.owner, r.created_at, r.id))

    async def _insert(self, insertion: Insertion) -> list[str]:
        record, now = insertion.record, utcnow()
        clash = [r.id for r in self._holders(record.owner, record.name, now)]
        insertion.check(clash)
        live = sum(r.owner == record.owner and r.holds_name(now) for r in self._rows.values())
        insertion.check_room(live, clash)
        for old in clash:
            self._rows[old] = dataclasses.replace(
                self._rows[old], revoked_at=now, replaced_by=record.id
            )
        inserted = self._rows[record.id] = self._adopt(insertion.new_key(clash))
        self._log(insertion.events(inserted, clash, now))
        return clash

    async def _import(self, importing: Importing) -> list[str]:
        inserted = []
        for record in importing.records:
            if record.id not in self._rows:
                self._rows[record.id] = self._adopt(record)
                inserted.append(record)
        self._log(importing.events(inserted, utcnow()))
        return [r.id for r in inserted]

    async def _revoke(self, event: KeyEvent) -> bool:
        record = self._owned(event.key_id, event.owner)
        if record is None or record.revoked_at is not None:
            return False
        self._rows[record.id] = dataclasses.replace(record, revoked_at=event.at)
        self._log([event])
        return True

    async def _rotate(self, rotation: Rotation) -> KeyRecord | None:
        # No await between this check and the writes: concurrent rotations serialise.
        old = self._owned(rotation.key_id, rotation.owner)
        if old is None or not rotatable(old):
            return None
        successor = rotation.new_key()
        expires = grace_expiry(old.expires_at, rotation.grace_until)
        updated = dataclasses.replace(old, expires_at=expires, replaced_by=successor.id)
        self._rows[old.id] = updated
        self._rows[successor.id] = self._adopt(successor)
        self._log(rotation.events(updated, utcnow()))
        return updated

    async def _reap(self, reaping: Reaping) -> list[KeyRecord]:
        stale = sorted(
            (r for r in self._rows.values() if reaping.is_stale(r)),
            key=lambda r: (r.created_at, r.id),
        )
        if not reaping.dry_run:
            for r in stale:
                self._rows[r.id] = dataclasses.replace(r, revoked_at=reaping.at)
            self._log(reaping.events(stale))
        return stale

    async def _update(self, change: Change) -> KeyRecord | None:
        record = self._owned(change.key_id, change.owner)
        if record is None:
            return None
        if record.revoked_at is not None:
            raise change.revoked()
        updated = dataclasses.replace(record, **change.fields)
        if change.names_matter and updated.holds_name(change.at):
            holders = self._holders(change.owner, updated.name, change.at)
            if any(other.id != change.key_id for other in holders):
                raise change.duplicate(updated.name)
        self._rows[record.id] = updated
        self._log([change.event()])
        return updated

    async def _touch_many(self, touching: Touching) -> dict[str, QuotaState]:
        rows, touches, uses = self._rows, touching.touches, touching.uses
        for key_id, at in touches.items():
            record = rows.get(key_id)
            if record is None:
                continue
            if record.last_used_at is None or record.last_used_at < at:
                record = dataclasses.replace(record, last_used_at=at)
            rows[key_id] = apply_uses(record, at, 0)
        budgets = {r.budget_id for k in touches if (r := rows.get(k)) is not None}
        owners: dict[str, OwnerLimits] = {}
        if uses and self._fresh_batch(touching.batch):
            now = utcnow()
            for record in [r for r in rows.values() if r.budget_id in uses]:
                at = touches.get(record.budget_id, now)
                rows[record.id] = apply_uses(record, at, uses[record.budget_id])
            for limits in [o for o in self._owners.values() if o.budget_id in uses]:
                spent = apply_uses(limits, now, uses[limits.budget_id])
                self._owners[limits.owner] = owners[limits.budget_id] = spent
            budgets.update(uses)
        states = budget_states(
            (r.budget_id, r.created_at, r.quota_remaining, r.quota_reset_at)
            for r in rows.values()
            if r.budget_id in budgets and r.quota is not None
        )
        for budget, o in owners.items():
            if o.quota_remaining is not None:
                states[budget] = QuotaState(o.quota_remaining, o.quota_reset_at)
        return states

    def _adopt(self, record: KeyRecord) -> KeyRecord:
        """``record`` carrying its owner's limits, as a new key takes them."""
        return dataclasses.replace(record, owner_limits=self._owners.get(record.owner))

    async def get_owner_limits(self, owner: str) -> OwnerLimits | None:
        return self._owners.get(owner)

    async def _put_owner_limits(
        self, owner: str, limits: OwnerLimits | None, event: KeyEvent
    ) -> list[str] | None:
        if limits is not None:
            self._owners[owner] = limits
        elif self._owners.pop(owner, None) is None:
            return None
        ids = [r.id for r in self._rows.values() if r.owner == owner]
        for key_id in ids:
            self._rows[key_id] = dataclasses.replace(self._rows[key_id], owner_limits=limits)
        self._log([event])
        return ids

    def _fresh_batch(self, batch: str | None) -> bool:
        """Whether ``batch`` was not taken yet (now it is); unnamed batches always are."""
        if batch is None:
            return True
        now = utcnow()
        for old in [b for b, at in self._batches.items() if at < now - BATCH_MEMORY]:
            del self._batches[old]
        if batch in self._batches:
            return False
        self._batches[batch] = now
        return True

    async def add_usage(self, counts: UsageCounts) -> None:
        for key, (requests, rejected) in counts.items():
            row = self._usage.setdefault(key, [0, 0])
            row[0] += requests
            row[1] += rejected

    def _counts(
        self, owner: str, since: datetime, until: datetime | None
    ) -> list[tuple[str, datetime, int, int]]:
        """``owner``'s usage rows of minutes in ``[since, until)``."""
        return [
            (kid, minute, requests, rejected)
            for (kid, minute), (requests, rejected) in self._usage.items()
            if minute >= since
            and (until is None or minute < until)
            and self._owned(kid, owner) is not None
        ]

    async def _buckets(self, query: UsageQuery) -> list[UsageBucket]:
        step = query.bucket_seconds
        sums: dict[int, list[int]] = {}
        for kid, minute, requests, rejected in self._counts(query.owner, query.since, query.until):
            if query.key_id is None or kid == query.key_id:
                row = sums.setdefault(int(minute.timestamp()) // step * step, [0, 0])
                row[0] += requests
                row[1] += rejected
        return [
            UsageBucket(datetime.fromtimestamp(start, timezone.utc), requests, rejected)
            for start, (requests, rejected) in sorted(sums.items())
        ]

    async def top_usage(
        self, owner: str, *, since: datetime, until: datetime | None, limit: int
    ) -> list[UsageTotal]:
        sums: dict[str, list[int]] = {}
        for kid, _, requests, rejected in self._counts(owner, since, until):
            row = sums.setdefault(kid, [0, 0])
            row[0] += requests
            row[1] += rejected
        ranked = sorted(sums.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
        return [
            UsageTotal(kid, self._rows[kid].name, requests, rejected)
            for kid, (requests, rejected) in ranked[:limit]
        ]

    async def prune_usage(self, *, before: datetime, limit: int) -> int:
        old = [key for key in self._usage if key[1] < before][:limit]
        for key in old:
            del self._usage[key]
        return len(old)

    async def _list_events(self, query: EventQuery) -> list[KeyEvent]:
        events = sorted(filter(query.matches, self._events), key=lambda e: (e.at, e.id))
        return events[-query.limit :] if query.limit is not None else events

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        # The sequence goes on from the last event ever written, not the last one kept.
        seq = self._events[-1].id + 1 if self._events else 1
        kept = [e for e in self._events if e.at >= before]
        pruned = len(self._events) - len(kept)
        kept.append(dataclasses.replace(pruned_event(before, pruned, actor), id=seq))
        self._events[:] = kept
        return pruned

    async def record_event(self, event: KeyEvent) -> None:
        self._log([event])

    async def add_webhook(self, webhook: Webhook) -> None:
        self._outbox.webhooks[webhook.id] = webhook

    async def list_webhooks(self) -> list[Webhook]:
        return sorted(self._outbox.webhooks.values(), key=lambda w: (w.created_at, w.id))

    async def remove_webhook(self, webhook_id: str) -> bool:
        return self._outbox.remove(webhook_id)

    async def enqueue_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        self._outbox.enqueue(deliveries)

    async def claim_deliveries(
        self, *, now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedDelivery]:
        return self._outbox.claim(now, lease_until, limit)

    async def finish_delivery(self, attempt: Attempt, next_attempt_at: datetime | None) -> None:
        self._outbox.finish(attempt, next_attempt_at)

    async def list_deliveries(
        self, *, webhook_id: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        return self._outbox.recent(webhook_id, limit)

    async def list_attempts(self, *, delivery_id: str | None = None) -> list[Attempt]:
        return self._outbox.attempts_of(delivery_id)

    async def keys_expiring(self, *, after: datetime, until: datetime) -> list[KeyRecord]:
        return [
            r
            for r in self._rows.values()
            if r.revoked_at is None and r.expires_at is not None and after < r.expires_at <= until
        ]

    async def update_hash(
        self, key_id: str, secret_hash: str, *, replacing: str | None = None
    ) -> None:
        record = self._rows.get(key_id)
        if record is None or replacing not in (None, record.secret_hash):
            return
        self._rows[key_id] = dataclasses.replace(record, secret_hash=secret_hash)
        if replacing is not None:
            event = rehashed_event(key_id, record.owner, replacing, utcnow())
            self._log([event] if event is not None else [])

    async def watch(self) -> None:
        return None
