"""The ``keystile`` command: mint, list, show, update, disable, enable, revoke, rotate and
reap keys; read the audit log; run a demo.

Errors are one line on stderr and exit code 1, never a traceback, and name the option as
typed (``--expires-in``), never a parameter of the Python API. ``--database-url`` and
``--json`` go before the command or after it, as gh's and stripe's do. ``--json`` output is
JSON Lines: one object for a command about one key, one object per line for a list or a
stream. Only ``init``, ``create`` and ``demo`` may create a missing SQLite database; the
other commands refuse to run on one.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio

from . import usage_chart
from .config import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, resolve_database_url
from .durations import format_duration, parse_duration
from .errors import KeystileError
from .limits import normalize_rate_limit
from .manager import DEFAULT_ROTATION_GRACE, UNCHANGED, CreatedKey, KeyManager
from .principal import normalize_cidrs
from .stores import SQLiteKeyStore, store_from_url
from .stores.protocol import KeyStore
from .stores.records import KeyEvent, KeyRecord, utcnow
from .tokens import normalize_key_id
from .validation import (
    validate_actor,
    validate_metadata,
    validate_name,
    validate_owner,
    validate_scopes,
)

__all__ = ["main"]

T = TypeVar("T")

#: The commands that may create a missing SQLite database; the others refuse to run.
CREATING_COMMANDS = frozenset({"init", "create", "demo"})
#: The exit status when the reader of our output went away, as if killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13

DESCRIPTION = f"""\
Manage API keys for keystile-protected apps.

The database is --database-url, else ${DATABASE_URL_ENV}, else {DEFAULT_DATABASE_URL}
(a file in the current directory). URLs: sqlite:///path.db, postgresql://user@host/db.
Only init, create and demo create a missing SQLite file; the other commands fail.
KEY_ID is a key's id or its display form, as in ks_AbC123def456… (either works).
--database-url and --json go before the command or after it. --json prints one JSON
object per line: one for a command about one key, one per key, event or period for lists.
"""

EPILOG = """\
examples:
  keystile init
  keystile create --owner acme --name "ci deploy" --scope items:read --expires-in 90d
  keystile create --owner acme --name ci --rate-limit 10/second --quota 1000 --quota-refill 1d
  keystile list --owner acme
  keystile list --all
  keystile update KEY_ID --owner acme --scope items:read --ip-allow 10.0.0.0/8
  keystile update KEY_ID --owner acme --rate-limit 100/minute
  keystile disable KEY_ID --owner acme
  keystile enable KEY_ID --owner acme
  keystile events --owner acme --since 7d --json
  keystile rotate KEY_ID --owner acme --grace 1h
  keystile revoke KEY_ID --owner acme
  keystile reap --unused-for 90d --dry-run
  keystile usage KEY_ID --owner acme --since 7d --by hour
  keystile usage --owner acme --since 1d --top 10
  keystile demo
"""


class CommandError(Exception):
    """A message for the operator; printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a check raising ``ValueError`` or ``KeystileError``: the error
    becomes argparse's one line, which names the option (``argument --scope: …``), so the
    operator reads the flag they typed, never a parameter name of the Python API."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except (ValueError, KeystileError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _whole(what: str, least: int, most: int, hint: str = "") -> Callable[[str], int]:
    """An argparse type for a whole number from ``least`` to ``most``."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"invalid {what} {text!r}: a whole number") from None
        if value < least:
            raise ValueError(f"invalid {what} {text!r}: at least {least}{hint}")
        if value > most:
            raise ValueError(f"invalid {what} {text!r}: at most {most}")
        return value

    return _checked(whole)


def _at_least_duration(shortest: timedelta) -> Callable[[str], timedelta]:
    def duration(text: str) -> timedelta:
        value = parse_duration(text)
        if value < shortest:
            raise ValueError(f"invalid duration {text!r}: at least {format_duration(shortest)}")
        return value

    return _checked(duration)


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"KEY=VALUE, got {text!r}")
    validate_metadata({key: value})
    return key, value


_duration = _checked(parse_duration)
_one_second_or_more = _at_least_duration(timedelta(seconds=1))
_rate_limit = _checked(lambda text: str(normalize_rate_limit(text)))
#: Past these a store could not hold the number (a quota is a 62-bit integer; a count is
#: a 32-bit SQL LIMIT).
MAX_QUOTA, MAX_COUNT = 2**62 - 1, 2**31 - 1
_quota = _whole("quota", 0, MAX_QUOTA)
_count = _whole("count", 1, MAX_COUNT)
_owner = _checked(validate_owner)
_name = _checked(validate_name)
_scope = _checked(lambda text: validate_scopes([text])[0])
_cidr = _checked(lambda text: normalize_cidrs([text])[0])
_metadata_pair = _checked(_pair)
_actor = _checked(validate_actor)


def default_actor() -> str:
    """``cli:<user>@<host>``: who the audit log names when ``--actor`` is not given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    actor = f"cli:{user}@{socket.gethostname()}"[:255]
    return actor if actor.isprintable() else "cli"


def _version() -> str:
    try:
        return importlib.metadata.version("keystile")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _global_options(*, on_command: bool) -> _Parser:
    """``--database-url`` and ``--json``, taken before the command and after it, as gh and
    stripe take theirs. On a command they default to ``SUPPRESS``: a command that was not
    given the option leaves the value given before the command alone."""
    options = _Parser(add_help=False)
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if on_command else {}
    options.add_argument(
        "--database-url",
        metavar="URL",
        help=f"key database (default: ${DATABASE_URL_ENV}, else {DEFAULT_DATABASE_URL})",
        **default,
    )
    options.add_argument(
        "--json",
        action="store_true",
        help="JSON on stdout: one object per line for lists, one object for one key",
        **default,
    )
    return options


def _add_key_id(p: argparse.ArgumentParser) -> None:
    """KEY_ID (the id or its display form, ``ks_<id>…``) and the ``--owner`` it must have."""
    p.add_argument("key_id", metavar="KEY_ID", type=normalize_key_id)
    p.add_argument("--owner", required=True, type=_owner)


def _add_actor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--actor",
        type=_actor,
        help="who the audit log names for this change (default: cli:<user>@<host>)",
    )


def _add_limit_options(p: argparse.ArgumentParser, *, quota: Callable[[str], int]) -> None:
    p.add_argument(
        "--rate-limit", type=_rate_limit, metavar="N/UNIT", help="e.g. 10/second, 100/minute, 5/day"
    )
    p.add_argument("--quota", type=quota, metavar="N", help="uses allowed (in each refill period)")
    p.add_argument(
        "--quota-refill",
        type=_one_second_or_more,
        metavar="DURATION",
        help="refill the quota every, e.g. 1d",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keystile",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(on_command=False)],
    )
    parser.add_argument("--version", action="version", version=f"keystile {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    shared = [_global_options(on_command=True)]

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=shared,
        )

    command("init", "create or upgrade the key tables (idempotent)", "keystile init")

    p = command(
        "create",
        "mint a key and print it once (the key alone goes to stdout)",
        'keystile create --owner acme --name "laptop" --scope items:read --expires-in 90d',
    )
    p.add_argument("--owner", required=True, type=_owner, help="user, workspace or tenant id")
    p.add_argument(
        "--name", required=True, type=_name, help="1-64 printable characters, unique per owner"
    )
    p.add_argument(
        "--scope",
        action="append",
        default=[],
        dest="scopes",
        type=_scope,
        help="a scope (repeatable)",
    )
    p.add_argument("--expires-in", type=_one_second_or_more, help="e.g. 30s, 15m, 1h, 90d")
    p.add_argument("--replace", action="store_true", help="revoke the active key of that name")
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        type=_metadata_pair,
        metavar="KEY=VALUE",
        help="(repeatable)",
    )
    p.add_argument(
        "--ip-allow",
        action="append",
        default=[],
        dest="ip_allow",
        type=_cidr,
        metavar="CIDR",
        help="an IPv4/IPv6 network the key may be used from (repeatable)",
    )
    _add_limit_options(
        p, quota=_whole("quota", 1, MAX_QUOTA, " (a key with a quota of 0 could never be used)")
    )
    _add_actor_option(p)

    p = command("list", "list an owner's keys, or every key", "keystile list --owner acme --json")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--owner", type=_owner)
    who.add_argument("--all", action="store_true", help="every owner's keys (for operators)")

    p = command("show", "show one key of an owner", "keystile show KEY_ID --owner acme --json")
    _add_key_id(p)

    p = command(
        "update",
        "change a key; the secret stays, running apps apply the change at once",
        "keystile update KEY_ID --owner acme --scope items:read --ip-allow 10.0.0.0/8",
    )
    _add_key_id(p)
    p.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        type=_scope,
        help="the key's scopes become those given (repeatable)",
    )
    p.add_argument("--no-scopes", action="store_true", help="remove every scope")
    p.add_argument(
        "--name", type=_name, help="rename (1-64 printable characters, unique per owner)"
    )
    p.add_argument(
        "--metadata",
        action="append",
        type=_metadata_pair,
        metavar="KEY=VALUE",
        help="the key's metadata becomes the pairs given (repeatable)",
    )
    p.add_argument("--no-metadata", action="store_true", help="remove the metadata")
    p.add_argument("--expires-in", type=_one_second_or_more, help="a new expiry from now, e.g. 30d")
    p.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    p.add_argument(
        "--ip-allow",
        action="append",
        dest="ip_allow",
        type=_cidr,
        metavar="CIDR",
        help="the allowlist becomes the networks given (repeatable)",
    )
    p.add_argument("--no-ip-allow", action="store_true", help="remove the IP allowlist")
    _add_limit_options(p, quota=_quota)
    p.add_argument("--no-rate-limit", action="store_true", help="remove the key's rate limit")
    p.add_argument("--no-quota", action="store_true", help="remove the key's quota")
    _add_actor_option(p)

    for verb, what in (
        ("disable", "switch a key off (reversible with enable); running apps refuse it at once"),
        ("enable", "switch a disabled key back on"),
    ):
        p = command(verb, what, f"keystile {verb} KEY_ID --owner acme")
        _add_key_id(p)
        _add_actor_option(p)

    p = command(
        "events",
        "the audit log: every change to a key, oldest first (--json: one object per line)",
        "keystile events --owner acme --since 7d --json",
    )
    p.add_argument("--owner", type=_owner, help="only this owner's keys (default: every owner)")
    p.add_argument("--key", type=normalize_key_id, metavar="KEY_ID", help="only this key")
    p.add_argument("--since", type=_duration, metavar="DURATION", help="e.g. 7d, 1h")
    p.add_argument("--limit", type=_count, metavar="N", help="only the newest N events (N >= 1)")
    p.add_argument(
        "--prune-older-than",
        type=_duration,
        metavar="DURATION",
        help="delete events older than this (e.g. 365d) instead of listing",
    )

    p = command(
        "revoke", "revoke a key of an owner (idempotent)", "keystile revoke KEY_ID --owner acme"
    )
    _add_key_id(p)
    _add_actor_option(p)

    p = command(
        "rotate",
        "mint a successor; the old key keeps working for the grace period",
        "keystile rotate KEY_ID --owner acme --grace 1h",
    )
    _add_key_id(p)
    p.add_argument("--grace", type=_duration, default=DEFAULT_ROTATION_GRACE, help="default: 1h")
    _add_actor_option(p)

    p = command(
        "reap",
        "revoke keys unused for longer than a bound, and expired keys",
        "keystile reap --unused-for 90d --dry-run",
    )
    p.add_argument("--unused-for", type=_duration, default=timedelta(days=90), help="default: 90d")
    p.add_argument("--dry-run", action="store_true", help="list what would be revoked")
    p.add_argument(
        "--include-disabled", action="store_true", help="reap disabled keys too (default: never)"
    )
    _add_actor_option(p)

    p = command(
        "usage",
        "a key's requests and refused attempts per period from --since to now, or an"
        " owner's busiest keys",
        "keystile usage KEY_ID --owner acme --since 7d --by hour",
    )
    p.add_argument("key_id", metavar="KEY_ID", nargs="?", type=normalize_key_id)
    p.add_argument("--owner", required=True, type=_owner)
    p.add_argument(
        "--since", type=_duration, default=timedelta(days=1), help="e.g. 1h, 7d (default: 1d)"
    )
    p.add_argument(
        "--by", choices=("minute", "hour", "day"), default="hour", help="period (default: hour)"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw a chart to a PNG (matplotlib)")
    p.add_argument(
        "--top", type=_count, metavar="N", help="the owner's N busiest keys instead (N >= 1)"
    )

    p = command(
        "demo",
        "serve an example app on 127.0.0.1 with a fresh key and print curl lines",
        "keystile demo --port 8000",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_whole("port", 0, 65535), default=8000)
    p.add_argument(
        "--self-test",
        action="store_true",
        help="send the curl requests itself, print the answers and exit (0 if as expected)",
    )
    return parser


# -- output ---------------------------------------------------------------------------


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _err(text: str = "") -> None:
    print(text, file=sys.stderr)


def _json(value: Mapping[str, Any]) -> None:
    """One JSON object on one line, the shape of every ``--json`` output: a command about
    one key prints one, a list or a stream prints one per line (JSON Lines)."""
    _out(json.dumps(value))


def _when(record: KeyRecord, field: str) -> str:
    value = getattr(record, field)
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def _table(records: Sequence[KeyRecord], *, owners: bool = False) -> None:
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
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _limits_text(record: KeyRecord) -> str:
    """``rate limit 10/second; quota 998 of 1000 left, refilled every 1d (next …)``."""
    parts = [f"rate limit {record.rate_limit or '-'}"]
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


def _show(record: KeyRecord) -> None:
    for field, value in record.to_public_dict().items():
        if field == "quota_refill" and value is not None:
            value = format_duration(timedelta(seconds=value))
        _out(f"{field:17} {value if value not in (None, [], {}) else '-'}")


def _print_created(created: CreatedKey, as_json: bool, verb: str) -> None:
    record = created.record
    if as_json:
        _json({"key": created.key, **record.to_public_dict()})
        return
    expires = record.expires_at.isoformat() if record.expires_at else "never"
    _err(
        f"{verb} key {record.id} ({record.name!r}) for owner {record.owner!r}; "
        f"scopes: {', '.join(record.scopes) or '-'}; expires: {expires}"
    )
    if record.rate_limit is not None or record.quota is not None:
        _err(f"Limits: {_limits_text(record)}")
    _err("The key is shown only this once; store it now:")
    _out(created.key)


# -- commands -------------------------------------------------------------------------


def _require_database(store: KeyStore, url: str) -> None:
    """Refuse to run on a SQLite file that does not exist (opening it would create it)."""
    if not isinstance(store, SQLiteKeyStore) or store.path == ":memory:":
        return
    path = Path(store.path)
    if path.exists():
        return
    where = "" if path.is_absolute() else f" (no file {path.resolve()})"
    raise CommandError(
        f"no key database at {url}{where}: run 'keystile init' to create it, "
        f"or pass --database-url / set {DATABASE_URL_ENV} to use another"
    )


async def _with_manager(store: KeyStore, work: Callable[[KeyManager], Awaitable[T]]) -> T:
    manager = KeyManager(store, actor=default_actor())
    await manager.open()
    try:
        return await work(manager)
    finally:
        await manager.close()


def _events(events: Sequence[KeyEvent], as_json: bool) -> None:
    if as_json:
        for event in events:
            _json(event.to_dict())
        return
    for e in events:
        detail = json.dumps(dict(e.detail), sort_keys=True) if e.detail else ""
        line = f"{e.at:%Y-%m-%d %H:%M:%S}  {e.owner}  {e.key_id}  {e.action}  {e.actor}  {detail}"
        _out(line.rstrip())


def _pick(args: argparse.Namespace, value: str, clear: str, label: str) -> bool:
    """Whether the option pair (``--x`` / ``--no-x``) was given; both: one line."""
    given, cleared = getattr(args, value) is not None, getattr(args, clear)
    if given and cleared:
        raise CommandError(f"give --{label} or --no-{label}, not both")
    return given or cleared


def _update_changes(args: argparse.Namespace) -> dict[str, Any]:
    """``KeyManager.update`` arguments from the ``update`` options; one line if none."""
    changes: dict[str, Any] = {}
    if args.scopes is not None and args.no_scopes:
        raise CommandError("give --scope or --no-scopes, not both")
    if args.scopes is not None or args.no_scopes:
        changes["scopes"] = args.scopes or []
    if args.name is not None:
        changes["name"] = args.name
    if args.metadata is not None and args.no_metadata:
        raise CommandError("give --metadata or --no-metadata, not both")
    if args.metadata is not None or args.no_metadata:
        changes["metadata"] = dict(args.metadata or [])
    if _pick(args, "expires_in", "no_expiry", "expires-in"):
        if args.no_expiry:
            changes["expires_at"] = None
        else:
            changes["expires_in"] = args.expires_in
    if _pick(args, "ip_allow", "no_ip_allow", "ip-allow"):
        changes["ip_allowlist"] = args.ip_allow or []
    limits = _limit_changes(args, required=not changes)
    changes.update({k: v for k, v in limits.items() if v is not UNCHANGED})
    return changes


def _limit_changes(args: argparse.Namespace, *, required: bool = True) -> dict[str, Any]:
    """``KeyManager.update`` limit arguments from the ``update`` options; one line if none
    of the ``update`` options was given."""
    if args.no_rate_limit and args.rate_limit is not None:
        raise CommandError("give --rate-limit or --no-rate-limit, not both")
    if args.no_quota and (args.quota is not None or args.quota_refill is not None):
        raise CommandError("give --quota/--quota-refill or --no-quota, not both")
    changes: dict[str, Any] = {}
    if args.rate_limit is not None or args.no_rate_limit:
        changes["rate_limit"] = args.rate_limit
    if args.quota is not None or args.no_quota:
        changes["quota"] = args.quota
    if args.quota_refill is not None:
        changes["quota_refill"] = args.quota_refill
    if not changes and required:
        raise CommandError(
            "nothing to update: give --scope, --name, --metadata, --expires-in, --no-expiry,"
            " --ip-allow, --no-ip-allow, --rate-limit, --quota, --quota-refill or a --no-…"
            " option"
        )
    return {name: changes.get(name, UNCHANGED) for name in ("rate_limit", "quota", "quota_refill")}


async def _usage(manager: KeyManager, args: argparse.Namespace) -> None:
    if args.top is not None:
        if args.key_id is not None or args.plot:
            raise CommandError("--top lists an owner's keys: give no KEY_ID and no --plot")
        totals = await manager.top_keys(args.owner, since=args.since, limit=args.top)
        if args.json:
            for total in totals:
                _json(total.to_dict())
        else:
            usage_chart.top_table(totals, args.owner, format_duration(args.since), _out, _err)
        return
    if args.key_id is None:
        raise CommandError("give a KEY_ID, or --top N for the owner's busiest keys")
    if args.plot:
        usage_chart.require_matplotlib()
    now = utcnow()
    starts = usage_chart.periods(now - args.since, now, args.by)
    buckets = await manager.usage(args.key_id, owner=args.owner, since=starts[0], by=args.by)
    rows = usage_chart.dense(buckets, starts)
    if args.plot:
        title = f"key {args.key_id}, per {args.by}"
        try:
            usage_chart.plot_png(rows, args.plot, title=title, by=args.by)
        except OSError as exc:
            raise CommandError(f"--plot {args.plot}: {exc.strerror or exc}") from None
        _err(f"wrote {args.plot}")
    if args.json:
        for row in rows:
            _json(row.to_dict())
    else:
        for line in usage_chart.bar_chart(rows):
            _out(line)


def _run_command(args: argparse.Namespace, url: str) -> int:
    command: str = args.command

    async def work(manager: KeyManager) -> int:
        if getattr(args, "actor", None) is not None:
            manager.actor = args.actor
        if command == "init":
            if args.json:
                _json({"database_url": manager.store.display_url, "ready": True})
            else:
                _err(f"keystile: {manager.store.display_url} is ready")
        elif command == "create":
            if args.quota_refill is not None and args.quota is None:
                raise CommandError("--quota-refill needs --quota N: the uses it refills")
            created = await manager.create(
                owner=args.owner,
                name=args.name,
                scopes=args.scopes,
                metadata=dict(args.metadata),
                expires_in=args.expires_in,
                replace=args.replace,
                rate_limit=args.rate_limit,
                quota=args.quota,
                quota_refill=args.quota_refill,
                ip_allowlist=args.ip_allow,
            )
            _print_created(created, args.json, "Created")
        elif command == "list":
            records = await (manager.list_all() if args.all else manager.list(args.owner))
            if args.json:
                for record in records:
                    _json(record.to_public_dict())
            elif records:
                _table(records, owners=args.all)
            else:
                _err("no keys" if args.all else f"no keys for owner {args.owner!r}")
        elif command == "show":
            record = await manager.get(args.key_id, owner=args.owner)
            if args.json:
                _json(record.to_public_dict())
            else:
                _show(record)
        elif command == "update":
            changes = _update_changes(args)
            if "quota_refill" in changes and "quota" not in changes:
                current = await manager.get(args.key_id, owner=args.owner)
                if current.quota is None:
                    raise CommandError(
                        f"--quota-refill needs a quota: key {current.id} has none, give --quota N"
                    )
            record = await manager.update(args.key_id, owner=args.owner, **changes)
            if args.json:
                _json(record.to_public_dict())
            else:
                _err(
                    f"updated key {record.id} ({record.name!r}): scopes"
                    f" {', '.join(record.scopes) or '-'}; expires"
                    f" {record.expires_at.isoformat() if record.expires_at else 'never'};"
                    f" IP allowlist {', '.join(record.ip_allowlist) or '-'};"
                    f" {_limits_text(record)}"
                )
        elif command in ("disable", "enable"):
            switch = manager.disable if command == "disable" else manager.enable
            record = await switch(args.key_id, owner=args.owner)
            if args.json:
                _json(record.to_public_dict())
            else:
                _err(f"key {record.id} is {record.status()}")
        elif command == "events":
            if args.prune_older_than is not None:
                pruned = await manager.prune_events(older_than=args.prune_older_than)
                if args.json:
                    _json({"pruned": pruned})
                else:
                    _err(
                        f"pruned {pruned} event(s) older than"
                        f" {format_duration(args.prune_older_than)}"
                    )
            else:
                events = await manager.events(
                    owner=args.owner, key_id=args.key, since=args.since, limit=args.limit
                )
                _events(events, args.json)
        elif command == "revoke":
            await manager.get(args.key_id, owner=args.owner)  # KeyNotFound: not that owner's
            revoked = await manager.revoke(args.key_id, owner=args.owner)
            if args.json:
                _json((await manager.get(args.key_id, owner=args.owner)).to_public_dict())
            elif revoked:
                _err(f"revoked key {args.key_id}")
            else:
                _err(f"nothing to revoke: key {args.key_id} was already revoked")
        elif command == "rotate":
            created = await manager.rotate(args.key_id, owner=args.owner, grace=args.grace)
            _print_created(created, args.json, "Rotated to")
            if not args.json:
                _err(f"The old key {args.key_id} keeps working until the grace period ends.")
        elif command == "usage":
            await _usage(manager, args)
        elif command == "reap":
            records = await manager.reap(
                unused_for=args.unused_for,
                dry_run=args.dry_run,
                include_disabled=args.include_disabled,
            )
            if args.json:
                for record in records:
                    _json(record.to_public_dict())
            else:
                verb = "would revoke" if args.dry_run else "revoked"
                _err(f"{verb} {len(records)} key(s)")
                if records:
                    _table(records)
        return 0

    store = store_from_url(url)
    if command not in CREATING_COMMANDS:
        _require_database(store, url)
    return anyio.run(_with_manager, store, work)


# -- entry point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, where a failure is not ours
    except BrokenPipeError:
        _silence_closed_output()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return int(exc.code or 0)
    try:
        if args.command == "demo":
            return _demo(args)
        return _run_command(args, resolve_database_url(args.database_url))
    except BrokenPipeError:
        raise
    except (KeystileError, CommandError, ValueError, OSError) as exc:
        _err(f"keystile: error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def _demo(args: argparse.Namespace) -> int:
    if args.json:
        raise CommandError("keystile demo prints no JSON: it serves an app and prints curl lines")
    from .demo import run_demo

    explicit = args.database_url or os.environ.get(DATABASE_URL_ENV)
    url = resolve_database_url(args.database_url) if explicit else None
    return run_demo(url, host=args.host, port=args.port, self_test=args.self_test)


def _silence_closed_output() -> None:
    """The reader went away (``keystile list | head -1``): point stdout, and stderr if its
    reader is gone too, at devnull, so that the interpreter's last flush cannot fail and
    print "Exception ignored" (the recipe in the Python docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
