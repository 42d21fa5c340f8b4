"""Webhooks as the stores keep them: the endpoints, the outbox of deliveries, and each
attempt; and which audit events become which deliveries.

A delivery is written in the transaction that writes its audit event, so one is never
lost and never made for a change that rolled back. Its payload is the Standard Webhooks
shape, ``{"type", "timestamp", "data"}``, ``data`` holding the key id, owner, name, actor
and the event's detail: never a secret or a hash (an event's detail holds neither).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .records import KeyEvent, json_fields

__all__ = [
    "AUDIT_EVENT_TYPES",
    "EVENT_TYPES",
    "REMOVED",
    "Attempt",
    "ClaimedDelivery",
    "Delivery",
    "Outbox",
    "Webhook",
    "error_of",
    "finished",
    "new_deliveries",
    "new_delivery_id",
    "payload",
    "status_after",
]

#: The audit actions that are sent, as the event type they are sent as.
AUDIT_EVENT_TYPES = {
    "created": "key.created",
    "imported": "key.created",
    "updated": "key.updated",
    "rotated": "key.rotated",
    "revoked": "key.revoked",
    "replaced": "key.revoked",
    "reaped": "key.revoked",
    "logout": "key.revoked",
    "disabled": "key.disabled",
    "enabled": "key.enabled",
    "leaked": "key.leaked",
}
#: The last error of the deliveries a removed webhook leaves behind.
REMOVED = "webhook removed"
#: Every event type a webhook may subscribe to.
EVENT_TYPES = (
    "key.created",
    "key.updated",
    "key.rotated",
    "key.revoked",
    "key.disabled",
    "key.enabled",
    "key.leaked",
    "key.expiring",
    "key.expired",
    "quota.low",
    "quota.exhausted",
    "rate_limit.exceeded",
)


@dataclass(frozen=True, slots=True)
class Webhook:
    """An endpoint that hears of events: all of them (``events=None``) or those listed."""

    id: str
    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] | None
    created_at: datetime

    def wants(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events

    def to_public_dict(self) -> dict[str, Any]:
        """Without the signing secret."""
        return json_fields(self, "id", "url", "events", "created_at")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one webhook: ``pending`` until sent (``delivered``) or given up on
    (``dead``). ``id`` is the ``webhook-id`` a receiver deduplicates on."""

    id: str
    webhook_id: str
    type: str
    payload: str
    created_at: datetime
    next_attempt_at: datetime
    attempts: int = 0
    status: str = "pending"
    last_error: str | None = None

    def to_public_dict(self) -> dict[str, Any]:
        """Without the payload."""
        names = ("id", "webhook_id", "type", "status", "attempts", "created_at")
        return json_fields(self, *names, "next_attempt_at", "last_error")


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery one process has claimed, with where it goes and how it is signed."""

    delivery: Delivery
    url: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at a delivery: the HTTP status, or the error, and what came of it."""

    delivery_id: str
    at: datetime
    status_code: int | None
    error: str | None
    outcome: str  # delivered | retry | dead

    def to_public_dict(self) -> dict[str, Any]:
        return json_fields(self, "delivery_id", "at", "status_code", "error", "outcome")


def new_delivery_id() -> str:
    return f"msg_{secrets.token_urlsafe(18)}"


def payload(event_type: str, at: datetime, data: Mapping[str, Any]) -> str:
    body = {"type": event_type, "timestamp": at.isoformat(), "data": dict(data)}
    return json.dumps(body, separators=(",", ":"), sort_keys=True, default=str)


def event_data(event: KeyEvent, name: str | None) -> dict[str, Any]:
    return {
        "key_id": event.key_id,
        "owner": event.owner,
        "name": name,
        "actor": event.actor,
        "detail": dict(event.detail),
    }


def new_deliveries(
    events: Iterable[KeyEvent],
    webhooks: Sequence[Webhook],
    names: Mapping[str, str],
    now: datetime,
) -> list[Delivery]:
    """The deliveries ``events`` make for ``webhooks`` (``names``: key id → name)."""
    made = []
    for event in events:
        event_type = AUDIT_EVENT_TYPES.get(event.action)
        if event_type is None or not event.key_id:
            continue
        body = payload(event_type, event.at, event_data(event, names.get(event.key_id)))
        for hook in webhooks:
            if hook.wants(event_type):
                made.append(Delivery(new_delivery_id(), hook.id, event_type, body, now, now))
    return made


def status_after(attempt: Attempt) -> str:
    """A delivery's status after ``attempt``."""
    return {"delivered": "delivered", "dead": "dead"}.get(attempt.outcome, "pending")


def error_of(attempt: Attempt) -> str | None:
    """What went wrong in ``attempt`` (``None`` if it was delivered)."""
    if attempt.outcome == "delivered":
        return None
    return attempt.error or f"HTTP {attempt.status_code}"


def finished(delivery: Delivery, attempt: Attempt, next_attempt_at: datetime | None) -> Delivery:
    """``delivery`` after ``attempt``: delivered, dead, or due again at ``next_attempt_at``."""
    return replace(
        delivery,
        attempts=delivery.attempts + 1,
        status=status_after(attempt),
        next_attempt_at=next_attempt_at or delivery.next_attempt_at,
        last_error=error_of(attempt),
    )


class Outbox:
    """The webhooks and deliveries of ``memory://``, as the SQL stores keep them in tables.
    Every call is synchronous: no ``await`` between a change and its deliveries."""

    def __init__(self) -> None:
        self.webhooks: dict[str, Webhook] = {}
        self.deliveries: dict[str, Delivery] = {}
        self.attempts: list[Attempt] = []
        self.claimed_until: dict[str, datetime] = {}

    def log(self, events: Sequence[KeyEvent], names: Mapping[str, str], now: datetime) -> None:
        self.enqueue(new_deliveries(events, list(self.webhooks.values()), names, now))

    def enqueue(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            self.deliveries.setdefault(delivery.id, delivery)

    def remove(self, webhook_id: str) -> bool:
        for d in list(self.deliveries.values()):
            if d.webhook_id == webhook_id and d.status == "pending":
                self.deliveries[d.id] = replace(d, status="dead", last_error=REMOVED)
        return self.webhooks.pop(webhook_id, None) is not None

    def claim(self, now: datetime, lease_until: datetime, limit: int) -> list[ClaimedDelivery]:
        due = sorted(
            (
                d
                for d in self.deliveries.values()
                if d.status == "pending"
                and d.next_attempt_at <= now
                and self.claimed_until.get(d.id, now) <= now
                and d.webhook_id in self.webhooks
            ),
            key=lambda d: (d.next_attempt_at, d.id),
        )[:limit]
        for d in due:
            self.claimed_until[d.id] = lease_until
        return [
            ClaimedDelivery(d, self.webhooks[d.webhook_id].url, self.webhooks[d.webhook_id].secret)
            for d in due
        ]

    def finish(self, attempt: Attempt, next_attempt_at: datetime | None) -> None:
        current = self.deliveries.get(attempt.delivery_id)
        if current is None:
            return
        self.deliveries[current.id] = finished(current, attempt, next_attempt_at)
        self.claimed_until.pop(current.id, None)
        self.attempts.append(attempt)

    def recent(self, webhook_id: str | None, limit: int) -> list[Delivery]:
        found = [d for d in self.deliveries.values() if webhook_id in (None, d.webhook_id)]
        return sorted(found, key=lambda d: (d.created_at, d.id))[-limit:]

    def attempts_of(self, delivery_id: str | None) -> list[Attempt]:
        return [a for a in self.attempts if delivery_id in (None, a.delivery_id)]
