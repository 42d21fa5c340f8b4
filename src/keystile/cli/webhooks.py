"""``keystile webhooks add|list|remove|test|deliveries``: where key events are sent, and
what came of each delivery."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .command import Command, CommandError, on_keys
from .output import err, json_line, out

if TYPE_CHECKING:
    from ..manager import KeyManager

__all__ = ["COMMANDS"]


def _arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="webhook_action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    add = actions.add_parser("add", help="send key events to URL; prints the signing secret once")
    add.add_argument("url", metavar="URL", help="https:// (http:// only to loopback)")
    add.add_argument(
        "--event",
        action="append",
        dest="events",
        metavar="TYPE",
        help="an event type to send, e.g. key.revoked (repeatable; default: every type)",
    )
    add.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="allow a private or loopback address (an internal receiver, a test)",
    )
    listing = actions.add_parser("list", help="the webhooks (never their secrets)")
    remove = actions.add_parser("remove", help="remove a webhook; its pending deliveries stop")
    test = actions.add_parser("test", help="queue a webhook.test event for a webhook")
    for action in (remove, test):
        action.add_argument("webhook_id", metavar="WEBHOOK_ID")
    deliveries = actions.add_parser("deliveries", help="recent deliveries and every attempt")
    deliveries.add_argument("--webhook", metavar="WEBHOOK_ID", help="only this webhook's")
    deliveries.add_argument("--limit", type=int, default=50, help="the newest N (default 50)")
    for action in (add, listing, remove, test, deliveries):
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS)


async def _webhooks(args: argparse.Namespace, manager: KeyManager) -> None:
    action = args.webhook_action
    if action == "add":
        created = await manager.add_webhook(
            args.url, args.events, allow_private_networks=args.allow_private_networks
        )
        if args.json:
            json_line({**created.webhook.to_public_dict(), "secret": created.secret})
        else:
            out(created.secret)
            err(f"Added webhook {created.id} -> {args.url}")
            err("The signing secret above is shown only this once: store it with the receiver.")
    elif action == "list":
        for hook in await manager.list_webhooks():
            if args.json:
                json_line(hook.to_public_dict())
            else:
                out(f"{hook.id}  {hook.url}  {', '.join(hook.events or ['(every event)'])}")
    elif action == "remove":
        if not await manager.remove_webhook(args.webhook_id):
            raise CommandError(f"no webhook {args.webhook_id!r}")
        err(f"removed webhook {args.webhook_id}")
    elif action == "test":
        delivery = await manager.test_webhook(args.webhook_id)
        if args.json:
            json_line(delivery.to_public_dict())
        else:
            err(f"queued {delivery.id}: a running app (webhooks=True) sends it")
    else:
        await _deliveries(args, manager)


async def _deliveries(args: argparse.Namespace, manager: KeyManager) -> None:
    if args.limit < 1:
        raise CommandError("--limit must be at least 1")
    found = await manager.deliveries(webhook_id=args.webhook, limit=args.limit)
    for delivery in found:
        attempts = await manager.delivery_attempts(delivery_id=delivery.id)
        if args.json:
            json_line(
                {**delivery.to_public_dict(), "attempts": [a.to_public_dict() for a in attempts]}
            )
            continue
        out(
            f"{delivery.id}  {delivery.type}  {delivery.status}  attempts {delivery.attempts}"
            f"  next {delivery.next_attempt_at.isoformat()}"
        )
        for a in attempts:
            result = a.error or f"HTTP {a.status_code}"
            out(f"    {a.at.isoformat()}  {result}  {a.outcome}")
    if not found:
        err("no deliveries")


COMMANDS = (
    Command(
        "webhooks",
        "send key events to your endpoints: add, list, remove, test, deliveries",
        "keystile webhooks add https://example.com/hooks/keystile --event key.revoked",
        _arguments,
        on_keys(_webhooks),
    ),
)
