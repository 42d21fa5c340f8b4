"""``keystile usage``: a key's requests and refused attempts per period (without a key,
the owner's over all its keys), as a bar chart, JSON Lines or a PNG; or, with
``--top N``, an owner's busiest keys."""

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

__all__ = ["COMMANDS"]


def _usage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("key_id", metavar="KEY_ID", nargs="?", type=types.key_id)
    p.add_argument("--owner", required=True, type=types.owner)
    p.add_argument(
        "--since", type=types.duration, default=timedelta(days=1), help="e.g. 1h, 7d (default: 1d)"
    )
    p.add_argument(
        "--by", choices=("minute", "hour", "day"), default="hour", help="period (default: hour)"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw a chart to a PNG (matplotlib)")
    p.add_argument(
        "--top", type=types.count, metavar="N", help="the owner's N busiest keys instead (N >= 1)"
    )


async def _top(args: argparse.Namespace, manager: KeyManager) -> None:
    from .. import usage_chart

    if args.key_id is not None or args.plot:
        raise CommandError("--top lists an owner's keys: give no KEY_ID and no --plot")
    totals = await manager.top_keys(args.owner, since=args.since, limit=args.top)
    if args.json:
        for total in totals:
            json_line(total.to_dict())
    else:
        usage_chart.top_table(totals, args.owner, format_duration(args.since), out, err)


async def _usage(args: argparse.Namespace, manager: KeyManager) -> None:
    from .. import usage_chart
    from ..stores.records import utcnow

    if args.top is not None:
        await _top(args, manager)
        return
    if args.plot:
        usage_chart.require_matplotlib()
    now = utcnow()
    starts = usage_chart.periods(now - args.since, now, args.by)
    buckets = await manager.usage(args.key_id, owner=args.owner, since=starts[0], by=args.by)
    rows = usage_chart.dense(buckets, starts)
    if args.plot:
        who = f"key {args.key_id}" if args.key_id is not None else f"owner {args.owner}"
        title = f"{who}, per {args.by}"
        try:
            usage_chart.plot_png(rows, args.plot, title=title, by=args.by)
        except OSError as exc:
            raise CommandError(f"--plot {args.plot}: {exc.strerror or exc}") from None
        err(f"wrote {args.plot}")
    if args.json:
        for row in rows:
            json_line(row.to_dict())
    else:
        for line in usage_chart.bar_chart(rows):
            out(line)


COMMANDS = (
    Command(
        "usage",
        "a key's (or, without KEY_ID, an owner's) requests and refused attempts per period"
        " from --since to now, or an owner's busiest keys",
        "keystile usage KEY_ID --owner acme --since 7d --by hour",
        _usage_arguments,
        on_keys(_usage),
    ),
)
