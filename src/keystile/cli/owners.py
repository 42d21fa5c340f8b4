"""``keystile owner limits OWNER …`` and ``keystile owner show OWNER``: the limits every
key of an owner shares, set, cleared and shown."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TYPE_CHECKING

from ..durations import format_duration
from . import arguments as types
from .command import Command, CommandError, on_keys
from .output import err, json_line, out

if TYPE_CHECKING:
    from ..manager import KeyManager
    from ..stores.records import OwnerLimits

__all__ = ["COMMANDS"]


def _owner_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="owner_action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    limits = actions.add_parser(
        "limits",
        help="set the limits every key of OWNER shares (replacing its limits), or --clear them",
        description="Set the limits every key of OWNER shares, on top of each key's own.",
    )
    limits.add_argument("owner", metavar="OWNER", type=types.owner)
    types.add_named_limits_option(limits)
    limits.add_argument("--quota", type=types.new_quota, metavar="N", help="uses by all keys")
    limits.add_argument(
        "--quota-refill",
        type=types.positive_duration,
        metavar="DURATION",
        help="refill the quota every, e.g. 30d",
    )
    limits.add_argument("--clear", action="store_true", help="remove the owner's limits")
    types.add_actor_option(limits)
    show = actions.add_parser("show", help="OWNER's limits and what is left of its quota")
    show.add_argument("owner", metavar="OWNER", type=types.owner)
    for action in (limits, show):
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS)


def _print(limits: OwnerLimits | None, owner: str, as_json: bool) -> None:
    if as_json:
        json_line(limits.to_public_dict() if limits is not None else {"owner": owner})
        return
    if limits is None:
        out(f"owner {owner} has no limits of its own")
        return
    for field, value in limits.to_public_dict().items():
        if field == "rate_limits":
            value = ", ".join(f"{name} {rate}" for name, rate in value.items()) or None
        elif field == "quota_refill" and value is not None:
            value = format_duration(timedelta(seconds=value))
        out(f"{field:17} {value if value is not None else '-'}")


async def _owner(args: argparse.Namespace, manager: KeyManager) -> None:
    if args.owner_action == "show":
        _print(await manager.owner_limits(args.owner), args.owner, args.json)
        return
    if args.clear:
        if args.limits or args.quota is not None or args.quota_refill is not None:
            raise CommandError("--clear removes the owner's limits: give no other limit")
        cleared = await manager.clear_owner_limits(args.owner)
        err(f"owner {args.owner}: " + ("limits removed" if cleared else "had no limits"))
        return
    if args.quota_refill is not None and args.quota is None:
        raise CommandError("--quota-refill needs --quota N: the uses it refills")
    limits = await manager.set_owner_limits(
        args.owner,
        rate_limits=dict(args.limits or ()),
        quota=args.quota,
        quota_refill=args.quota_refill,
    )
    _print(limits, args.owner, args.json)


COMMANDS = (
    Command(
        "owner",
        "limits an owner's keys share (named rate limits, a quota): set, clear, show",
        "keystile owner limits acme --limit burst=50/second --quota 1000000 --quota-refill 30d",
        _owner_arguments,
        on_keys(_owner),
    ),
)
