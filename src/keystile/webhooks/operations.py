"""The key manager's webhook calls: add (the signing secret shown once), list, remove,
test, and the deliveries with every attempt."""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import KeyManagementError
from ..stores.hooks import EVENT_TYPES, Attempt, Delivery, Webhook, new_delivery_id, payload
from ..stores.protocol import KeyStore
from ..stores.records import utcnow
from .addresses import check_url
from .signing import new_secret

__all__ = ["TEST_EVENT", "CreatedWebhook", "WebhookOperations"]

#: The event ``test_webhook`` sends.
TEST_EVENT = "webhook.test"


@dataclass(frozen=True, slots=True)
class CreatedWebhook:
    """A new webhook and its signing secret, returned once by ``add_webhook``."""

    webhook: Webhook
    secret: str = field(repr=False)

    @property
    def id(self) -> str:
        return self.webhook.id


def _event_types(events: Iterable[str] | None) -> tuple[str, ...] | None:
    if events is None:
        return None
    if isinstance(events, str):
        events = [events]
    chosen = tuple(dict.fromkeys(events))
    unknown = [e for e in chosen if e not in EVENT_TYPES]
    if unknown or not chosen:
        raise KeyManagementError(
            f"unknown webhook event {', '.join(unknown) or '(none given)'}: choose from"
            f" {', '.join(EVENT_TYPES)}, or none for all"
        )
    return chosen


class WebhookOperations:
    """Mixed into ``KeyManager``: the webhooks of its store."""

    store: KeyStore

    async def add_webhook(
        self,
        url: str,
        events: Iterable[str] | None = None,
        *,
        allow_private_networks: bool = False,
    ) -> CreatedWebhook:
        """Send ``events`` (every type when ``None``) to ``url``. Returns the webhook and its
        signing secret (``whsec_…``), shown this once. ``url`` is ``https://`` (``http://``
        only to loopback), never a private or loopback address unless
        ``allow_private_networks``."""
        check_url(url, allow_private_networks=allow_private_networks)
        secret = new_secret()
        hook = Webhook(
            f"wh_{secrets.token_urlsafe(12)}", url, secret, _event_types(events), utcnow()
        )
        await self.store.add_webhook(hook)
        return CreatedWebhook(hook, secret)

    async def list_webhooks(self) -> builtins.list[Webhook]:
        return await self.store.list_webhooks()

    async def remove_webhook(self, webhook_id: str) -> bool:
        """Remove it; its pending deliveries are given up. ``False`` if there was none."""
        return await self.store.remove_webhook(webhook_id)

    async def test_webhook(self, webhook_id: str) -> Delivery:
        """Queue a ``webhook.test`` event for it; the background delivery sends it."""
        if webhook_id not in {hook.id for hook in await self.store.list_webhooks()}:
            raise KeyManagementError(f"no webhook {webhook_id!r}")
        now = utcnow()
        body = payload(TEST_EVENT, now, {"webhook_id": webhook_id})
        delivery = Delivery(new_delivery_id(), webhook_id, TEST_EVENT, body, now, now)
        await self.store.enqueue_deliveries([delivery])
        return delivery

    async def deliveries(
        self, *, webhook_id: str | None = None, limit: int = 100
    ) -> builtins.list[Delivery]:
        """The newest ``limit`` deliveries (of one webhook), oldest first."""
        return await self.store.list_deliveries(webhook_id=webhook_id, limit=limit)

    async def delivery_attempts(self, *, delivery_id: str | None = None) -> builtins.list[Attempt]:
        """Every attempt (at one delivery), in order: its status or error and outcome."""
        return await self.store.list_attempts(delivery_id=delivery_id)
