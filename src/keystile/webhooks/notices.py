"""Events no audit entry makes, queued by the delivery duty: ``key.expiring`` (once per
key, ``lead`` before its expiry) and ``key.expired`` (once per key, after it).

Each notice has an id made of its type, webhook, key and expiry, and the outbox keeps the
first of an id: every process may queue the same notice on every pass, and it is still
sent once. A new expiry (an update) is a new notice. A key already rotated is not
announced: its grace expiry is expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from ..stores.hooks import Delivery, Webhook, payload
from ..stores.records import KeyRecord

__all__ = ["DEFAULT_EXPIRING_LEAD", "EXPIRED_LOOKBACK", "expiry_notices"]

#: How long before its expiry a key is announced as ``key.expiring``.
DEFAULT_EXPIRING_LEAD = timedelta(days=7)
#: How far back an expiry is still announced (a process down for a while catches up).
EXPIRED_LOOKBACK = timedelta(days=7)


def expiry_notices(
    keys: Sequence[KeyRecord], webhooks: Sequence[Webhook], now: datetime, lead: timedelta
) -> list[Delivery]:
    made = []
    for key in keys:
        if key.expires_at is None or key.replaced_by is not None:
            continue
        expired = key.expires_at <= now
        if not expired and key.expires_at - now > lead:
            continue
        event_type = "key.expired" if expired else "key.expiring"
        data = {
            "key_id": key.id,
            "owner": key.owner,
            "name": key.name,
            "expires_at": key.expires_at.isoformat(),
        }
        body = payload(event_type, now, data)
        stamp = int(key.expires_at.timestamp())
        for hook in webhooks:
            if hook.wants(event_type):
                notice_id = f"msg_{event_type}_{hook.id}_{key.id}_{stamp}"
                made.append(Delivery(notice_id, hook.id, event_type, body, now, now))
    return made
