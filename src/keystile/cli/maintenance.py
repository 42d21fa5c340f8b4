"""``keystile init``, ``events`` and ``reap``: the database, its audit log, and the keys
nobody uses."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TYPE_CHECKING

from ..durations import format_duration
from . import arguments as types
from .command import Command, on_keys
from .output import err, json_line, print_events, table

if TYPE_CHECKING:
    from ..manager import KeyManager

__all__ = ["COMMANDS"]


def _no_arguments(p: argparse.ArgumentParser) -> None:
    """``init`` takes the global options only."""


async def _init(args: argparse.Namespace, manager: KeyManager) -> None:
    """Opening the manager created or upgraded the tables; say where."""
    if args.json:
        json_line({"database_url": manager.store.display_url, "ready": True})
    else:
        err(f"keystile: {manager.store.display_url} is ready")


def _events_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--owner", type=types.owner, help="only this owner's keys (default: every owner)"
    )
    p.add_argument("--key", type=types.key_id, metavar="KEY_ID", help="only this key")
    p.add_argument("--since", type=types.duration, metavar="DURATION", help="e.g. 7d, 1h")
    p.add_argument(
        "--limit", type=types.count, metavar="N", help="only the newest N events (N >= 1)"
    )
    p.add_argument(
        "--prune-older-than",
        type=types.duration,
        metavar="DURATION",
        help="delete events older than this (e.g. 365d) instead of listing",
    )


async def _events(args: argparse.Namespace, manager: KeyManager) -> None:
    if args.prune_older_than is None:
        events = await manager.events(
            owner=args.owner, key_id=args.key, since=args.since, limit=args.limit
        )
        print_events(events, args.json)
        return
    pruned = await manager.prune_events(older_than=args.prune_older_than)
    if args.json:
        json_line({"pruned": pruned})
    else:
        err(f"pruned {pruned} event(s) older than {format_duration(args.prune_older_than)}")


def _reap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--unused-for", type=types.duration, default=timedelta(days=90), help="default: 90d"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be revoked")
    p.add_argument(
        "--include-disabled", action="store_true", help="reap disabled keys too (default: never)"
    )
    types.add_actor_option(p)


async def _reap(args: argparse.Namespace, manager: KeyManager) -> None:
    records = await manager.reap(
        unused_for=args.unused_for,
        dry_run=args.dry_run,
        include_disabled=args.include_disabled,
    )
    if args.json:
        for record in records:
            json_line(record.to_public_dict())
        return
    verb = "would revoke" if args.dry_run else "revoked"
    err(f"{verb} {len(records)} key(s)")
    if records:
        table(records)


COMMANDS = (
    Command(
        "init",
        "create or upgrade the key tables (idempotent)",
        "keystile init",
        _no_arguments,
        on_keys(_init, creates_database=True),
    ),
    Command(
        "events",
        "the audit log: every change to a key, oldest first (--json: one object per line)",
        "keystile events --owner acme --since 7d --json",
        _events_arguments,
        on_keys(_events),
    ),
    Command(
        "reap",
        "revoke keys unused for longer than a bound, and expired keys",
        "keystile reap --unused-for 90d --dry-run",
        _reap_arguments,
        on_keys(_reap),
    ),
)
