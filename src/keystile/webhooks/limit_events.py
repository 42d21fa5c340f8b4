"""``quota.low``, ``quota.exhausted`` and ``rate_limit.exceeded``: noted without I/O where
they happen, sent by the delivery duty.

A rate-limit refusal is noted on the refusal path (a dict and a bounded queue; a request
that is let through pays nothing), at most once per key per minute. Quotas are read from
what each batched usage flush returns (the remaining count of every budget written), in
the flush itself. The duty turns them into deliveries whose ids name the key (or budget)
and the minute (or quota period), so each is sent once however many processes note it:
``rate_limit.exceeded`` at most once per key per minute, ``quota.low`` (at or below
``quota_low`` of the quota left) and ``quota.exhausted`` once per period.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..errors import RateLimited
from ..stores.hooks import Delivery, Webhook, payload
from ..stores.protocol import KeyStore
from ..stores.records import QuotaState
from ..stores.rules import OWNER_BUDGET

__all__ = ["DEFAULT_QUOTA_LOW", "LimitNotices"]

#: ``quota.low`` is sent when at most this fraction of a quota is left.
DEFAULT_QUOTA_LOW = 0.1
#: The most notes kept between two passes of the duty (the oldest are dropped).
MAX_NOTES = 10_000


class LimitNotices:
    """Notes of one process's limits, taken by :meth:`deliveries`."""

    def __init__(self) -> None:
        self._last_minute: dict[str, int] = {}
        self._refusals: deque[tuple[str, str, str | None, int]] = deque(maxlen=MAX_NOTES)
        self._quotas: dict[str, QuotaState] = {}

    def refused(self, user: Any, refusal: Exception) -> None:
        """On the refusal path: a rate limit refused ``user``'s request."""
        if not isinstance(refusal, RateLimited):
            return
        minute = int(time.time() // 60)
        if self._last_minute.get(user.key_id) == minute:
            return
        if len(self._last_minute) >= MAX_NOTES:
            self._last_minute.clear()
        self._last_minute[user.key_id] = minute
        self._refusals.append((user.key_id, user.owner, getattr(user, "name", None), minute))

    def quota_synced(self, states: Mapping[str, QuotaState]) -> None:
        """In the usage flush: what is left of each budget written."""
        for budget, state in states.items():
            if budget in self._quotas or len(self._quotas) < MAX_NOTES:
                self._quotas[budget] = state

    async def deliveries(
        self, store: KeyStore, webhooks: list[Webhook], quota_low: float
    ) -> list[Delivery]:
        """The notes taken since the last call, as deliveries for ``webhooks``."""
        refusals, self._refusals = list(self._refusals), deque(maxlen=MAX_NOTES)
        quotas, self._quotas = self._quotas, {}
        now = datetime.now(timezone.utc)
        made = []
        for key_id, owner, name, minute in refusals:
            at = datetime.fromtimestamp(minute * 60, timezone.utc)
            data = {"key_id": key_id, "owner": owner, "name": name, "minute": at.isoformat()}
            made += _each(webhooks, "rate_limit.exceeded", f"{key_id}_{minute}", data, now)
        for budget, state in quotas.items():
            found = await _quota_of(store, budget)
            if found is None:
                continue
            total, data = found
            if state.remaining > total * quota_low:
                continue
            event_type = "quota.exhausted" if state.remaining <= 0 else "quota.low"
            period = int(state.reset_at.timestamp()) if state.reset_at is not None else 0
            sent = {**data, "quota": total, "remaining": state.remaining}
            made += _each(webhooks, event_type, f"{budget}_{period}", sent, now)
        return made


async def _quota_of(store: KeyStore, budget: str) -> tuple[int, dict[str, Any]] | None:
    """A budget's quota and whose it is: a key's (its rotation chain's) or an owner's."""
    if budget.startswith(OWNER_BUDGET):
        owner = budget.removeprefix(OWNER_BUDGET)
        limits = await store.get_owner_limits(owner)
        quota = None if limits is None else limits.quota
        return None if not quota else (quota, {"key_id": None, "owner": owner, "name": None})
    record = await store.get(budget)
    if record is None or not record.quota:
        return None
    return record.quota, {"key_id": record.id, "owner": record.owner, "name": record.name}


def _each(
    webhooks: list[Webhook], event_type: str, subject: str, data: Mapping[str, Any], now: datetime
) -> list[Delivery]:
    body = payload(event_type, now, data)
    return [
        Delivery(f"msg_{event_type}_{hook.id}_{subject}", hook.id, event_type, body, now, now)
        for hook in webhooks
        if hook.wants(event_type)
    ]
