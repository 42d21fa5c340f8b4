"""What the command prints: one JSON object per line with ``--json``, otherwise aligned
tables and one-line messages.

Results go to stdout and messages about them to stderr, so ``keystile create … > key``
captures the key alone and ``keystile list | head`` reads the table. ``--json`` output is
JSON Lines: one object for a command about one key, one per line for a list or a stream.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..durations import format_duration

if TYPE_CHECKING:
    from ..keys import CreatedKey
    from ..stores.records import KeyEvent, KeyRecord

__all__ = [
    "err",
    "json_line",
    "limits_text",
    "out",
    "print_created",
    "print_events",
    "show",
    "table",
]


def out(text: str = "") -> None:
    print(text, file=sys.stdout)


def err(text: str = "") -> None:
    print(text, file=sys.stderr)


def json_line(value: Mapping[str, Any]) -> None:
    """One JSON object on one line, the shape of every ``--json`` output: a command about
    one key prints one, a list or a stream prints one per line (JSON Lines)."""
    out(json.dumps(value))


def _when(record: KeyRecord, field: str) -> str:
    value = getattr(record, field)
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def table(records: Sequence[KeyRecord], *, owners: bool = False) -> None:
    from ..stores.records import utcnow

    now = utcnow()
    header: tuple[str, ...] = (
        "ID",
        "NAME",
        "STATUS",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "REPLACED BY",
    )
    if owners:
        header = ("OWNER", *header)
    rows = [header] + [
        (
            *((r.owner,) if owners else ()),
            r.id,
            r.name,
            r.status(now),
            ",".join(r.scopes) or "-",
            _when(r, "created_at"),
            _when(r, "expires_at"),
            _when(r, "last_used_at"),
            r.replaced_by or "-",
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def limits_text(record: KeyRecord) -> str:
    """``rate limit 10/second; quota 998 of 1000 left, refilled every 1d (next …)``."""
    parts = [f"rate limit {record.rate_limit or '-'}"]
    parts += [f"{name} {rate}" for name, rate in record.rate_limits.items()]
    if record.quota is None:
        parts.append("quota -")
    else:
        quota = f"quota {record.quota_left()} of {record.quota} left"
        if record.quota_refill is not None:
            refill = record.next_refill()
            quota += f", refilled every {format_duration(record.quota_refill)}"
            quota += f" (next {refill:%Y-%m-%d %H:%M} UTC)" if refill else ""
        parts.append(quota)
    return "; ".join(parts)


def show(record: KeyRecord) -> None:
    for field, value in record.to_public_dict().items():
        if field == "quota_refill" and value is not None:
            value = format_duration(timedelta(seconds=value))
        elif field == "rate_limits":
            value = ", ".join(f"{name} {rate}" for name, rate in value.items()) or None
        out(f"{field:17} {value if value not in (None, [], {}) else '-'}")


def print_created(created: CreatedKey, as_json: bool, verb: str) -> None:
    """A new key: the key alone on stdout (or one JSON object with it), the rest on stderr."""
    record = created.record
    if as_json:
        json_line({"key": created.key, **record.to_public_dict()})
        return
    expires = record.expires_at.isoformat() if record.expires_at else "never"
    err(
        f"{verb} key {record.id} ({record.name!r}) for owner {record.owner!r}; "
        f"scopes: {', '.join(record.scopes) or '-'}; expires: {expires}"
    )
    if record.rate_limit is not None or record.quota is not None:
        err(f"Limits: {limits_text(record)}")
    err("The key is shown only this once; store it now:")
    out(created.key)


def print_events(events: Sequence[KeyEvent], as_json: bool) -> None:
    if as_json:
        for event in events:
            json_line(event.to_dict())
        return
    for e in events:
        detail = json.dumps(dict(e.detail), sort_keys=True) if e.detail else ""
        line = f"{e.at:%Y-%m-%d %H:%M:%S}  {e.owner}  {e.key_id}  {e.action}  {e.actor}  {detail}"
        out(line.rstrip())
