"""``memory://``: dicts in this process, for unit tests and throwaway demos.

``memory://`` alone is a fresh store; ``memory://NAME`` is shared by every store opened
with that name in this process (so a ``KeyManager`` and a middleware can share one).
Each change and its audit event are written with no ``await`` between them, so they
happen together or not at all, as a transaction would make them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from ..errors import DuplicateKeyName
from .base import (
    SYSTEM_ACTOR,
    ChangeListener,
    KeyEvent,
    KeyRecord,
    LocalChangeBus,
    QuotaState,
    UsageBucket,
    UsageCounts,
    UsageTotal,
    apply_uses,
    check_updatable,
    created_detail,
    event_detail,
    pruned_detail,
    reaped_detail,
    revoked_error,
    rotated_detail,
    update_action,
    utcnow,
)

__all__ = ["MemoryKeyStore"]

_anonymous = itertools.count()


def _duplicate(owner: str, name: str) -> DuplicateKeyName:
    return DuplicateKeyName(
        f"owner {owner!r} already has an active key named {name!r}; "
        "pass replace=True (--replace) to revoke it and mint a new one"
    )


class MemoryKeyStore:
    _named: dict[str, dict[str, KeyRecord]] = {}
    _named_events: dict[str, list[KeyEvent]] = {}
    _named_usage: dict[str, dict[tuple[str, datetime], list[int]]] = {}

    def __init__(self, name: str | None = None) -> None:
        if name:
            self._rows = self._named.setdefault(name, {})
            self._events = self._named_events.setdefault(name, [])
            self._usage = self._named_usage.setdefault(name, {})
            identity = f"memory://{name}"
        else:
            self._rows = {}
            self._events = []
            self._usage = {}
            identity = f"memory://#{next(_anonymous)}"
        self.display_url = identity
        self._bus = LocalChangeBus.for_identity(identity)

    def _log(
        self,
        record: KeyRecord,
        action: str,
        actor: str,
        at: datetime,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        seq = self._events[-1].id + 1 if self._events else 1
        event = KeyEvent(at, record.id, record.owner, action, actor, dict(detail or {}), seq)
        self._events.append(event)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def get(self, key_id: str) -> KeyRecord | None:
        return self._rows.get(key_id)

    async def get_many(self, key_ids: Sequence[str]) -> dict[str, KeyRecord]:
        return {k: self._rows[k] for k in key_ids if k in self._rows}

    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None:
        record = self._rows.get(key_id)
        return record if record is not None and record.owner == owner else None

    async def list_keys(self, owner: str) -> list[KeyRecord]:
        rows = [r for r in self._rows.values() if r.owner == owner]
        return sorted(rows, key=lambda r: (r.created_at, r.id))

    async def list_all(self) -> list[KeyRecord]:
        return sorted(self._rows.values(), key=lambda r: (r.owner, r.created_at, r.id))

    async def insert(
        self, record: KeyRecord, *, replace: bool = False, actor: str = SYSTEM_ACTOR
    ) -> list[str]:
        now = utcnow()
        clash = [
            r
            for r in self._rows.values()
            if r.owner == record.owner and r.name == record.name and r.holds_name(now)
        ]
        if clash and not replace:
            raise _duplicate(record.owner, record.name)
        for old in clash:
            self._rows[old.id] = dataclasses.replace(old, revoked_at=now, replaced_by=record.id)
            self._log(old, "replaced", actor, now, {"replaced_by": record.id})
        replaces = clash[-1].id if clash else record.replaces
        self._rows[record.id] = dataclasses.replace(record, replaces=replaces)
        self._log(record, "created", actor, now, created_detail(record, replaces))
        for old in clash:
            self._bus.publish(old.id)
        return [old.id for old in clash]

    async def revoke(
        self,
        key_id: str,
        owner: str,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
        action: str = "revoked",
    ) -> bool:
        record = self._rows.get(key_id)
        if record is None or record.owner != owner or record.revoked_at is not None:
            return False
        self._rows[key_id] = dataclasses.replace(record, revoked_at=at)
        self._log(record, action, actor, at)
        self._bus.publish(key_id)
        return True

    async def rotate(
        self,
        key_id: str,
        owner: str,
        successor: KeyRecord,
        *,
        grace_until: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        # No await between this check and the writes: concurrent rotations serialise.
        old = self._rows.get(key_id)
        if old is None or old.owner != owner or old.replaced_by is not None or not old.is_active():
            return None
        expires = grace_until if old.expires_at is None else min(old.expires_at, grace_until)
        updated = dataclasses.replace(old, expires_at=expires, replaced_by=successor.id)
        self._rows[key_id] = updated
        self._rows[successor.id] = dataclasses.replace(successor, replaces=key_id)
        now = utcnow()
        self._log(old, "rotated", actor, now, rotated_detail(successor.id, expires))
        self._log(successor, "created", actor, now, created_detail(successor, key_id))
        self._bus.publish(key_id)
        return updated

    async def reap(
        self,
        *,
        unused_since: datetime,
        at: datetime,
        dry_run: bool,
        include_disabled: bool = False,
        actor: str = SYSTEM_ACTOR,
    ) -> list[KeyRecord]:
        stale = [
            r
            for r in self._rows.values()
            if r.revoked_at is None
            and (include_disabled or r.disabled_at is None)
            and (
                (r.last_used_at or r.created_at) < unused_since
                or (r.expires_at is not None and r.expires_at <= at)
            )
        ]
        if not dry_run:
            for r in stale:
                self._rows[r.id] = dataclasses.replace(r, revoked_at=at)
                self._log(r, "reaped", actor, at, reaped_detail(r, unused_since))
                self._bus.publish(r.id)
        return sorted(stale, key=lambda r: (r.created_at, r.id))

    async def touch_many(
        self, touches: Mapping[str, datetime], uses: Mapping[str, int] | None = None
    ) -> dict[str, QuotaState]:
        quotas: dict[str, QuotaState] = {}
        for key_id, at in touches.items():
            record = self._rows.get(key_id)
            if record is None:
                continue
            if record.last_used_at is None or record.last_used_at < at:
                record = dataclasses.replace(record, last_used_at=at)
            if record.quota is not None:
                record = apply_uses(record, at, (uses or {}).get(key_id, 0))
                assert record.quota_remaining is not None
                quotas[key_id] = QuotaState(record.quota_remaining, record.quota_reset_at)
            self._rows[key_id] = record
        return quotas

    async def add_usage(self, counts: UsageCounts) -> None:
        usage = self._usage
        for key, (requests, rejected) in counts.items():
            row = usage.get(key)
            if row is None:
                usage[key] = [requests, rejected]
            else:
                row[0] += requests
                row[1] += rejected

    async def usage(
        self,
        key_id: str,
        owner: str,
        *,
        since: datetime,
        until: datetime | None,
        bucket_seconds: int,
    ) -> list[UsageBucket]:
        record = self._rows.get(key_id)
        if record is None or record.owner != owner:
            return []
        sums: dict[int, list[int]] = {}
        for (kid, minute), (requests, rejected) in self._usage.items():
            if kid != key_id or minute < since or (until is not None and minute >= until):
                continue
            start = int(minute.timestamp()) // bucket_seconds * bucket_seconds
            row = sums.setdefault(start, [0, 0])
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
        for (kid, minute), (requests, rejected) in self._usage.items():
            record = self._rows.get(kid)
            if record is None or record.owner != owner:
                continue
            if minute < since or (until is not None and minute >= until):
                continue
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

    async def update(
        self,
        key_id: str,
        owner: str,
        changes: Mapping[str, Any],
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        check_updatable(changes)
        detail = event_detail(changes)
        record = self._rows.get(key_id)
        if record is None or record.owner != owner:
            return None
        if record.revoked_at is not None:
            raise revoked_error(key_id, owner)
        if not changes:
            return record
        updated = dataclasses.replace(record, **changes)
        if ("name" in changes or "expires_at" in changes) and updated.holds_name(at):
            for other in self._rows.values():
                if (
                    other.id != key_id
                    and other.owner == owner
                    and other.name == updated.name
                    and other.holds_name(at)
                ):
                    raise _duplicate(owner, updated.name)
        self._rows[key_id] = updated
        self._log(record, update_action(changes), actor, at, detail)
        self._bus.publish(key_id)
        return updated

    async def list_events(
        self,
        *,
        owner: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        events = [
            e
            for e in self._events
            if (owner is None or e.owner == owner)
            and (key_id is None or e.key_id == key_id)
            and (since is None or e.at >= since)
        ]
        events.sort(key=lambda e: (e.at, e.id))
        return events[-limit:] if limit is not None and limit > 0 else events

    async def prune_events(self, *, before: datetime, actor: str = SYSTEM_ACTOR) -> int:
        # The sequence goes on from the last event ever written, not the last one kept.
        seq = self._events[-1].id + 1 if self._events else 1
        kept = [e for e in self._events if e.at >= before]
        pruned = len(self._events) - len(kept)
        detail = pruned_detail(before, pruned)
        kept.append(KeyEvent(utcnow(), "", "", "pruned", actor, detail, seq))
        self._events[:] = kept
        return pruned

    async def update_hash(self, key_id: str, secret_hash: str) -> None:
        record = self._rows.get(key_id)
        if record is not None:
            self._rows[key_id] = dataclasses.replace(record, secret_hash=secret_hash)

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        return self._bus.subscribe(listener)

    async def watch(self) -> None:
        return None
