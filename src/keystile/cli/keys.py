"""``keystile create``, ``list``, ``show``, ``update``, ``disable``, ``enable``, ``revoke``
and ``rotate``: one key's life, each a thin shell over a ``KeyManager`` call."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TYPE_CHECKING

from . import arguments as types
from .changes import update_changes
from .command import Command, CommandError, on_keys
from .output import err, json_line, limits_text, print_created, show, table

if TYPE_CHECKING:
    from ..manager import KeyManager
    from ..stores.records import KeyRecord

__all__ = ["COMMANDS"]

#: A key's list options, each repeatable: type, destination, metavar, and the help on
#: ``create`` (the list; none without the option) and on ``update`` (the new list;
#: unchanged without the option).
_LISTS = {
    "--scope": (types.scope, "scopes", None, "a scope", "the key's scopes become those given"),
    "--metadata": (
        types.metadata_pair,
        "metadata",
        "KEY=VALUE",
        "",
        "the key's metadata becomes the pairs given",
    ),
    "--ip-allow": (
        types.cidr,
        "ip_allow",
        "CIDR",
        "an IPv4/IPv6 network the key may be used from",
        "the allowlist becomes the networks given",
    ),
}


def _add_list(p: argparse.ArgumentParser, flag: str, *, update: bool) -> None:
    convert, dest, metavar, on_create, on_update = _LISTS[flag]
    p.add_argument(
        flag,
        action="append",
        default=None if update else [],
        dest=dest,
        type=convert,
        metavar=metavar,
        help=f"{on_update if update else on_create} (repeatable)".lstrip(),
    )


def _create_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--owner", required=True, type=types.owner, help="user, workspace or tenant id")
    p.add_argument(
        "--name",
        required=True,
        type=types.key_name,
        help="1-64 printable characters, unique per owner",
    )
    _add_list(p, "--scope", update=False)
    p.add_argument("--expires-in", type=types.positive_duration, help="e.g. 30s, 15m, 1h, 90d")
    p.add_argument("--replace", action="store_true", help="revoke the active key of that name")
    _add_list(p, "--metadata", update=False)
    _add_list(p, "--ip-allow", update=False)
    types.add_limit_options(p, quota=types.new_quota)
    types.add_actor_option(p)


async def _create(args: argparse.Namespace, manager: KeyManager) -> None:
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
        rate_limits=dict(args.limits or ()),
        quota=args.quota,
        quota_refill=args.quota_refill,
        ip_allowlist=args.ip_allow,
    )
    print_created(created, args.json, "Created")


def _list_arguments(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--owner", type=types.owner)
    who.add_argument("--all", action="store_true", help="every owner's keys (for operators)")
    p.add_argument(
        "--expiring-within",
        type=types.positive_duration,
        metavar="DURATION",
        help="only the active keys that expire within it, e.g. 7d",
    )


async def _list(args: argparse.Namespace, manager: KeyManager) -> None:
    records = await (manager.list_all() if args.all else manager.list(args.owner))
    if args.expiring_within is not None:
        records = expiring(records, args.expiring_within)
    if args.json:
        for record in records:
            json_line(record.to_public_dict())
    elif records:
        table(records, owners=args.all)
    else:
        soon = "" if args.expiring_within is None else " expiring within that time"
        err(("no keys" if args.all else f"no keys for owner {args.owner!r}") + soon)


def expiring(records: list[KeyRecord], within: timedelta) -> list[KeyRecord]:
    """The active keys among ``records`` that expire within ``within`` from now, soonest
    first."""
    from ..stores.records import utcnow

    now = utcnow()
    soon = [
        (r.expires_at, r.id, r)
        for r in records
        if r.is_active(now) and r.expires_at is not None and r.expires_at <= now + within
    ]
    return [r for _, _, r in sorted(soon, key=lambda item: item[:2])]


async def _show(args: argparse.Namespace, manager: KeyManager) -> None:
    record = await manager.get(args.key_id, owner=args.owner)
    if args.json:
        json_line(record.to_public_dict())
    else:
        show(record)


def _update_arguments(p: argparse.ArgumentParser) -> None:
    types.add_key_id(p)
    _add_list(p, "--scope", update=True)
    p.add_argument("--no-scopes", action="store_true", help="remove every scope")
    p.add_argument(
        "--name", type=types.key_name, help="rename (1-64 printable characters, unique per owner)"
    )
    _add_list(p, "--metadata", update=True)
    p.add_argument("--no-metadata", action="store_true", help="remove the metadata")
    p.add_argument(
        "--expires-in", type=types.positive_duration, help="a new expiry from now, e.g. 30d"
    )
    p.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    _add_list(p, "--ip-allow", update=True)
    p.add_argument("--no-ip-allow", action="store_true", help="remove the IP allowlist")
    types.add_limit_options(p, quota=types.quota)
    p.add_argument("--no-rate-limit", action="store_true", help="remove the key's rate limit")
    p.add_argument("--no-limits", action="store_true", help="remove the key's named limits")
    p.add_argument("--no-quota", action="store_true", help="remove the key's quota")
    types.add_actor_option(p)


async def _update(args: argparse.Namespace, manager: KeyManager) -> None:
    changes = update_changes(args)
    if "quota_refill" in changes and "quota" not in changes:
        current = await manager.get(args.key_id, owner=args.owner)
        if current.quota is None:
            raise CommandError(
                f"--quota-refill needs a quota: key {current.id} has none, give --quota N"
            )
    record = await manager.update(args.key_id, owner=args.owner, **changes)
    if args.json:
        json_line(record.to_public_dict())
    else:
        err(
            f"updated key {record.id} ({record.name!r}): scopes"
            f" {', '.join(record.scopes) or '-'}; expires"
            f" {record.expires_at.isoformat() if record.expires_at else 'never'};"
            f" IP allowlist {', '.join(record.ip_allowlist) or '-'};"
            f" {limits_text(record)}"
        )


def _key_and_actor(p: argparse.ArgumentParser) -> None:
    types.add_key_id(p)
    types.add_actor_option(p)


def _switched(args: argparse.Namespace, record: KeyRecord) -> None:
    if args.json:
        json_line(record.to_public_dict())
    else:
        err(f"key {record.id} is {record.status()}")


async def _disable(args: argparse.Namespace, manager: KeyManager) -> None:
    _switched(args, await manager.disable(args.key_id, owner=args.owner))


async def _enable(args: argparse.Namespace, manager: KeyManager) -> None:
    _switched(args, await manager.enable(args.key_id, owner=args.owner))


async def _revoke(args: argparse.Namespace, manager: KeyManager) -> None:
    await manager.get(args.key_id, owner=args.owner)  # KeyNotFound: not that owner's
    revoked = await manager.revoke(args.key_id, owner=args.owner)
    if args.json:
        json_line((await manager.get(args.key_id, owner=args.owner)).to_public_dict())
    elif revoked:
        err(f"revoked key {args.key_id}")
    else:
        err(f"nothing to revoke: key {args.key_id} was already revoked")


def _rotate_arguments(p: argparse.ArgumentParser) -> None:
    types.add_key_id(p)
    p.add_argument("--grace", type=types.duration, help="default: 1h")
    types.add_actor_option(p)


async def _rotate(args: argparse.Namespace, manager: KeyManager) -> None:
    from ..manager import DEFAULT_ROTATION_GRACE

    grace = DEFAULT_ROTATION_GRACE if args.grace is None else args.grace
    created = await manager.rotate(args.key_id, owner=args.owner, grace=grace)
    print_created(created, args.json, "Rotated to")
    if not args.json:
        err(f"The old key {args.key_id} keeps working until the grace period ends.")


COMMANDS = (
    Command(
        "create",
        "mint a key and print it once (the key alone goes to stdout)",
        'keystile create --owner acme --name "laptop" --scope items:read --expires-in 90d',
        _create_arguments,
        on_keys(_create, creates_database=True),
    ),
    Command(
        "list",
        "list an owner's keys, or every key",
        "keystile list --all --expiring-within 7d",
        _list_arguments,
        on_keys(_list),
    ),
    Command(
        "show",
        "show one key of an owner",
        "keystile show KEY_ID --owner acme --json",
        types.add_key_id,
        on_keys(_show),
    ),
    Command(
        "update",
        "change a key; the secret stays, running apps apply the change at once",
        "keystile update KEY_ID --owner acme --scope items:read --ip-allow 10.0.0.0/8",
        _update_arguments,
        on_keys(_update),
    ),
    Command(
        "disable",
        "switch a key off (reversible with enable); running apps refuse it at once",
        "keystile disable KEY_ID --owner acme",
        _key_and_actor,
        on_keys(_disable),
    ),
    Command(
        "enable",
        "switch a disabled key back on",
        "keystile enable KEY_ID --owner acme",
        _key_and_actor,
        on_keys(_enable),
    ),
    Command(
        "revoke",
        "revoke a key of an owner (idempotent)",
        "keystile revoke KEY_ID --owner acme",
        _key_and_actor,
        on_keys(_revoke),
    ),
    Command(
        "rotate",
        "mint a successor; the old key keeps working for the grace period",
        "keystile rotate KEY_ID --owner acme --grace 1h",
        _rotate_arguments,
        on_keys(_rotate),
    ),
)
