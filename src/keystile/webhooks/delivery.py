"""``WebhookDelivery``: the background duty that sends the outbox, at least once.

Each pass claims the deliveries that are due (a lease, so with many processes each is
taken by one: ``FOR UPDATE SKIP LOCKED`` on Postgres, the write lock on SQLite), posts
each, signed (:mod:`.signing`), with a timeout and without following redirects, to an
address it may reach (:mod:`.addresses`), and records the attempt. A 2xx is delivered;
anything else is tried again after the next step of ``RETRY_SCHEDULE`` (each step
stretched or shrunk by up to a fifth, at random, so that a receiver coming back is not hit
by every retry at once), and after the last step the delivery is dead-lettered. A process
that dies mid-delivery leaves its lease to run out; another pass then sends it again, so
a receiver deduplicates on ``webhook-id``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import anyio

from ..errors import ConfigurationError
from ..stores.hooks import Attempt, ClaimedDelivery
from ..stores.protocol import KeyStore
from ..stores.records import utcnow
from .addresses import checked_addresses
from .limit_events import DEFAULT_QUOTA_LOW, LimitNotices
from .notices import DEFAULT_EXPIRING_LEAD, EXPIRED_LOOKBACK, expiry_notices
from .signing import signed_headers

__all__ = ["RETRY_SCHEDULE", "WebhookDelivery", "next_attempt_at"]

logger = logging.getLogger("keystile.webhooks")

#: The waits after each failed attempt (about 24 hours in all); then dead-lettered.
RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=8),
    timedelta(hours=8),
)
#: A wait is stretched or shrunk at random by up to this fraction.
JITTER = 0.2


def next_attempt_at(
    attempts: int, now: datetime, schedule: Sequence[timedelta] = RETRY_SCHEDULE
) -> datetime | None:
    """When to try again after ``attempts`` failed attempts; ``None``: give up."""
    if attempts > len(schedule):
        return None
    wait = schedule[attempts - 1].total_seconds() * random.uniform(1 - JITTER, 1 + JITTER)
    return now + timedelta(seconds=wait)


class _Runtime(Protocol):
    store: KeyStore
    extra_duties: dict[str, Any]
    recorder: Any


class _Limits(Protocol):
    on_refusal: Any


@dataclass
class WebhookDelivery:
    """How a process sends webhooks. ``APIKeyMiddleware(..., webhooks=True)`` runs one in
    its background work; ``deliver_due`` is one pass (for a worker of your own)."""

    #: Seconds between passes when nothing was due.
    interval: float = 1.0
    #: Deliveries claimed per pass.
    batch: int = 20
    #: How long a claim holds: a delivery whose process died is sent again after it.
    lease: timedelta = timedelta(seconds=60)
    #: Seconds one POST may take.
    timeout: float = 10.0
    #: Let deliveries go to private, loopback and link-local addresses (tests, an
    #: internal receiver). Off by default: a webhook URL must not reach inside the network.
    allow_private_networks: bool = False
    schedule: Sequence[timedelta] = RETRY_SCHEDULE
    #: How long before its expiry a key is announced (``key.expiring``).
    expiring_lead: timedelta = DEFAULT_EXPIRING_LEAD
    #: Seconds between looks for keys about to expire or just expired.
    notice_interval: float = 60.0
    #: ``quota.low`` when at most this fraction of a quota is left.
    quota_low: float = DEFAULT_QUOTA_LOW

    def __post_init__(self) -> None:
        if not self.timeout > 0 or self.lease.total_seconds() <= self.timeout:
            raise ConfigurationError("the webhook lease must be longer than the timeout")
        if self.batch < 1 or not self.interval > 0:
            raise ConfigurationError("batch and interval must be positive")

    def install(self, runtime: _Runtime, limits: _Limits | None = None) -> LimitNotices:
        """Run in ``runtime``'s supervised background work, with the quota notes of its
        usage flush and the rate-limit refusals of ``limits``."""
        notices = LimitNotices()
        runtime.recorder.on_quota(notices.quota_synced)
        if limits is not None:
            limits.on_refusal = notices.refused

        async def deliver() -> None:
            await self.run(runtime.store, notices)

        runtime.extra_duties["webhook delivery"] = deliver
        return notices

    async def run(self, store: KeyStore, notices: LimitNotices | None = None) -> None:
        """Queue expiry notices and the limits' notes, and deliver, until cancelled."""
        noticed = -math.inf
        while True:
            if time.monotonic() - noticed >= self.notice_interval:
                noticed = time.monotonic()
                await self.queue_notices(store)
            if notices is not None:
                await self.queue_limit_notes(store, notices)
            if not await self.deliver_due(store):
                await anyio.sleep(self.interval)

    async def queue_limit_notes(self, store: KeyStore, notices: LimitNotices) -> int:
        """Queue what ``notices`` noted of quotas and rate limits; how many made."""
        webhooks = await store.list_webhooks()
        made = await notices.deliveries(store, webhooks, self.quota_low) if webhooks else []
        if made:
            await store.enqueue_deliveries(made)
        return len(made)

    async def queue_notices(self, store: KeyStore) -> int:
        """Queue ``key.expiring`` and ``key.expired`` for the webhooks that want them
        (each once per key and expiry, however many processes queue it); how many made."""
        webhooks = await store.list_webhooks()
        if not webhooks:
            return 0
        now = utcnow()
        keys = await store.keys_expiring(
            after=now - EXPIRED_LOOKBACK, until=now + self.expiring_lead
        )
        notices = expiry_notices(keys, webhooks, now, self.expiring_lead)
        if notices:
            await store.enqueue_deliveries(notices)
        return len(notices)

    async def deliver_due(self, store: KeyStore) -> int:
        """One pass: send what is due and not claimed elsewhere; how many were tried."""
        now = utcnow()
        claimed = await store.claim_deliveries(
            now=now, lease_until=now + self.lease, limit=self.batch
        )
        if not claimed:
            return 0
        try:
            import httpx
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ConfigurationError(
                "sending webhooks needs httpx: pip install 'keystile[webhooks]'"
            ) from None
        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client,
            anyio.create_task_group() as tasks,
        ):
            for item in claimed:
                tasks.start_soon(self._deliver, store, client, item)
        return len(claimed)

    async def _deliver(self, store: KeyStore, client: Any, item: ClaimedDelivery) -> None:
        status, error = await self._post(client, item)
        now = utcnow()
        delivery = item.delivery
        if status is not None and 200 <= status < 300:
            outcome, retry_at = "delivered", None
        else:
            retry_at = next_attempt_at(delivery.attempts + 1, now, self.schedule)
            outcome = "retry" if retry_at is not None else "dead"
        attempt = Attempt(delivery.id, now, status, error, outcome)
        await store.finish_delivery(attempt, retry_at)
        if outcome != "delivered":
            logger.warning(
                "webhook delivery %s to %s: %s (%s)",
                delivery.id,
                item.url,
                error or f"HTTP {status}",
                outcome,
            )

    async def _post(self, client: Any, item: ClaimedDelivery) -> tuple[int | None, str | None]:
        body = item.delivery.payload.encode("utf-8")
        headers = signed_headers(item.secret, item.delivery.id, int(time.time()), body)
        try:
            await checked_addresses(item.url, allow_private_networks=self.allow_private_networks)
            response = await client.post(item.url, content=body, headers=headers)
        except Exception as exc:  # any failure to send is this attempt's, never the pass's
            return None, f"{type(exc).__name__}: {exc}"[:500]
        return response.status_code, None
