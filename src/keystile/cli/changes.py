"""The options of ``keystile update`` as the arguments of ``KeyManager.update``.

Each field has an option that sets it and a ``--no-…`` option that clears it; giving both
is one line, and so is giving none at all: an update that changes nothing is a typo, not
a success.
"""

from __future__ import annotations

import argparse
from typing import Any

from .command import CommandError

__all__ = ["update_changes"]


def _pick(args: argparse.Namespace, value: str, clear: str, label: str) -> bool:
    """Whether the option pair (``--x`` / ``--no-x``) was given; both: one line."""
    given, cleared = getattr(args, value) is not None, getattr(args, clear)
    if given and cleared:
        raise CommandError(f"give --{label} or --no-{label}, not both")
    return given or cleared


def update_changes(args: argparse.Namespace) -> dict[str, Any]:
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
    changes.update(_limit_changes(args, required=not changes))
    return changes


def _limit_changes(args: argparse.Namespace, *, required: bool) -> dict[str, Any]:
    """The limit arguments of ``KeyManager.update`` that the options change; one line if
    ``required`` and none of the ``update`` options was given."""
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
    if args.limits is not None and args.no_limits:
        raise CommandError("give --limit or --no-limits, not both")
    if args.limits is not None or args.no_limits:
        changes["rate_limits"] = dict(args.limits or ())
    if not changes and required:
        raise CommandError(
            "nothing to update: give --scope, --name, --metadata, --expires-in, --no-expiry,"
            " --ip-allow, --no-ip-allow, --rate-limit, --limit, --quota, --quota-refill or a"
            " --no-…"
            " option"
        )
    return changes
