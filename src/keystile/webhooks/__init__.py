"""Webhooks: every key change (and a key about to expire) is sent, signed by the Standard
Webhooks convention, to the endpoints added with ``KeyManager.add_webhook``, from an
outbox written in the change's own transaction, at least once.

``signing`` (the signature), ``addresses`` (where a webhook may point), ``delivery``
(the background duty), ``operations`` (the manager's calls).
"""

from __future__ import annotations

from ..stores.hooks import EVENT_TYPES, Attempt, Delivery, Webhook
from .delivery import RETRY_SCHEDULE, WebhookDelivery, next_attempt_at
from .operations import CreatedWebhook, WebhookOperations
from .signing import new_secret, signature

__all__ = [
    "EVENT_TYPES",
    "RETRY_SCHEDULE",
    "Attempt",
    "CreatedWebhook",
    "Delivery",
    "Webhook",
    "WebhookDelivery",
    "WebhookOperations",
    "new_secret",
    "next_attempt_at",
    "signature",
]
