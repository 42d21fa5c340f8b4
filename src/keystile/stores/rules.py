"""The rules every store keeps, written once: what ``update`` may change, when a name is
taken, which keys the reaper takes and which key may be rotated, how uses drain a quota,
and which audit events each change records with what detail.

The memory store runs these in Python; the SQL stores run the same rules in their
statements (``sql.py`` holds those predicates, each named after its rule here).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ..errors import DuplicateKeyName, KeyManagementError
from .records import KeyEvent, KeyRecord, OwnerLimits, QuotaState, refills_due, utcnow

__all__ = [
    "BATCH_MEMORY",
    "EVENT_ACTIONS",
    "IMPORTED_HASH",
    "LIMIT_FIELDS",
    "OWNER_BUDGET",
    "SYSTEM_ACTOR",
    "UPDATABLE_FIELDS",
    "apply_uses",
    "budget_states",
    "check_name_free",
    "check_updatable",
    "created_detail",
    "duplicate_name",
    "event_detail",
    "grace_expiry",
    "imported_algorithm",
    "imported_events",
    "imported_hash",
    "insert_events",
    "is_imported",
    "is_stale",
    "names_matter",
    "owner_limits_event",
    "pruned_detail",
    "pruned_event",
    "reap_events",
    "reaped_detail",
    "rehashed_event",
    "revoked_error",
    "rotatable",
    "rotate_events",
    "rotated_detail",
    "split_uses",
    "successor_of",
    "update_action",
]

#: The usage-limit fields of a key.
LIMIT_FIELDS = frozenset(
    {"rate_limit", "rate_limits", "quota", "quota_remaining", "quota_refill", "quota_reset_at"}
)
#: The fields ``KeyStore.update`` may change: everything but the id, the owner, the
#: secret and the lifecycle links (revocation and rotation have calls of their own).
UPDATABLE_FIELDS = LIMIT_FIELDS | frozenset(
    {"name", "scopes", "metadata", "expires_at", "ip_allowlist", "disabled_at"}
)
#: Who a change is attributed to when the caller names nobody (the background reaper).
SYSTEM_ACTOR = "system"
#: What an audit event can record.
EVENT_ACTIONS = frozenset(
    {
        "created",
        "replaced",
        "rotated",
        "revoked",
        "reaped",
        "updated",
        "disabled",
        "enabled",
        "logout",
        "pruned",
        "owner_limits",
        "imported",
        "rehashed",
    }
)
#: How an imported key's hash starts: ``imported$<algorithm>$<the source's hash>``. No
#: argon2 verifier takes it, so such a hash authenticates nothing until a middleware
#: with ``legacy_formats`` verifies it with its algorithm and rehashes it to argon2id.
IMPORTED_HASH = "imported$"


# -- imported keys --------------------------------------------------------------------


def is_imported(record: KeyRecord) -> bool:
    """Whether another library issued the key: its id is ``<tag>.<public part>``
    (``keystile.legacy``), where keystile's own ids are 12 base62 characters."""
    return "." in record.id


def imported_hash(algorithm: str, source_hash: str) -> str:
    """The stored form of a hash carried over from another library."""
    return f"{IMPORTED_HASH}{algorithm}${source_hash}"


def imported_algorithm(secret_hash: str) -> str | None:
    """The algorithm of an imported hash not yet rehashed, else ``None``."""
    if not secret_hash.startswith(IMPORTED_HASH):
        return None
    return secret_hash[len(IMPORTED_HASH) :].partition("$")[0]


def imported_events(
    records: Sequence[KeyRecord], details: Mapping[str, Mapping[str, Any]], at: datetime, actor: str
) -> list[KeyEvent]:
    """What an import records: one ``imported`` event per key inserted, with where it came
    from (``details`` by key id) and what it was created with (never the hash)."""
    return [
        KeyEvent(at, r.id, r.owner, "imported", actor, {**created_detail(r, None), **details[r.id]})
        for r in records
    ]


def rehashed_event(key_id: str, owner: str, replaced: str, at: datetime) -> KeyEvent | None:
    """What replacing hash ``replaced`` records: ``rehashed`` (and from which algorithm)
    when it was an imported hash, nothing for an argon2 parameter upgrade."""
    algorithm = imported_algorithm(replaced)
    if algorithm is None:
        return None
    return KeyEvent(at, key_id, owner, "rehashed", SYSTEM_ACTOR, {"from": algorithm})


# -- quotas ---------------------------------------------------------------------------


Spendable = TypeVar("Spendable", KeyRecord, OwnerLimits)


def apply_uses(record: Spendable, at: datetime, uses: int) -> Spendable:
    """``record`` after ``uses`` counted at ``at``: a refill due by ``at`` first (the
    remaining count back to ``quota``, ``quota_reset_at`` to the period's start), then the
    uses taken, never below 0. The memory store's version of ``sql.touch_statement``."""
    if record.quota is None:
        return record
    remaining = record.quota_remaining if record.quota_remaining is not None else record.quota
    reset_at = record.quota_reset_at
    due = refills_due(record.quota_refill, reset_at, at)
    if due and reset_at is not None and record.quota_refill is not None:
        reset_at = reset_at + due * record.quota_refill
        remaining = record.quota
    return replace(record, quota_remaining=max(remaining - uses, 0), quota_reset_at=reset_at)


#: How long a store remembers a quota batch it took, so a replay (a flush retried after its
#: acknowledgement was lost) takes nothing twice; a recorder retries far sooner.
BATCH_MEMORY = timedelta(days=1)


def budget_states(
    rows: Iterable[tuple[str, datetime, int | None, datetime | None]],
) -> dict[str, QuotaState]:
    """The quota state of each budget from its keys' rows ``(budget_id, created_at,
    remaining, reset_at)``: the newest key's (a rotation chain's head, whose limits apply
    from now on; the keys of one chain are spent together, so they agree)."""
    newest: dict[str, tuple[datetime, QuotaState]] = {}
    for budget, created, remaining, reset_at in rows:
        if remaining is None:
            continue
        seen = newest.get(budget)
        if seen is None or created > seen[0]:
            newest[budget] = (created, QuotaState(remaining, reset_at))
    return {budget: state for budget, (_, state) in newest.items()}


#: The budget of an owner's own limits: ``owner:`` and the owner (a key id has no colon).
OWNER_BUDGET = "owner:"

Spend = tuple[str, datetime, int]


def split_uses(
    uses: Mapping[str, int], touches: Mapping[str, datetime], now: datetime
) -> tuple[list[Spend], list[Spend]]:
    """A flush's uses as ``(budget, at, n)`` for keys' budgets and ``(owner, at, n)`` for
    owners': ``at`` the budget's touch time, else ``now``; budgets without uses dropped."""
    keys: list[Spend] = []
    owners: list[Spend] = []
    for budget, n in uses.items():
        if not n:
            continue
        if budget.startswith(OWNER_BUDGET):
            owners.append((budget[len(OWNER_BUDGET) :], now, n))
        else:
            keys.append((budget, touches.get(budget, now), n))
    return keys, owners


# -- names ----------------------------------------------------------------------------


def duplicate_name(owner: str, name: str, *, replaceable: bool = False) -> DuplicateKeyName:
    """What taking a name another key of ``owner`` holds raises. ``replaceable``: the
    call could have replaced that key (``insert``), so the message says how."""
    message = f"owner {owner!r} already has an active key named {name!r}"
    if replaceable:
        message += "; pass replace=True (--replace) to revoke it and mint a new one"
    return DuplicateKeyName(message)


def check_name_free(record: KeyRecord, holders: Sequence[str], replace: bool) -> None:
    """Refuse to insert ``record`` while keys ``holders`` hold its name, unless they
    are to be replaced."""
    if holders and not replace:
        raise duplicate_name(record.owner, record.name, replaceable=True)


def names_matter(changes: Mapping[str, Any]) -> bool:
    """Whether ``changes`` can make the key take a name another key holds: a new name,
    or a new expiry (an expired key held none)."""
    return "name" in changes or "expires_at" in changes


def successor_of(record: KeyRecord, replaced: Sequence[str]) -> KeyRecord:
    """``record`` as inserted: it ``replaces`` the newest key it replaced, if any."""
    return replace(record, replaces=replaced[-1] if replaced else record.replaces)


# -- lifecycle ------------------------------------------------------------------------


def check_updatable(changes: Mapping[str, Any]) -> None:
    """Refuse a change to a field ``update`` may not touch (the secret, the owner, ids)."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"update cannot change {', '.join(sorted(unknown))}")


def revoked_error(key_id: str, owner: str) -> KeyManagementError:
    """What changing a revoked key raises: a revocation is final for the record too."""
    return KeyManagementError(
        f"key {key_id!r} of owner {owner!r} is revoked; a revoked key cannot be changed,"
        " disabled or enabled (create a new key instead)"
    )


def rotatable(record: KeyRecord, now: datetime | None = None) -> bool:
    """Whether ``record`` may get a successor: active, and none yet (``sql.ROTATABLE``)."""
    return record.replaced_by is None and record.is_active(now)


def grace_expiry(expires_at: datetime | None, grace_until: datetime) -> datetime:
    """A rotated key's expiry: the end of the grace period, or its own if sooner."""
    return grace_until if expires_at is None else min(expires_at, grace_until)


def is_stale(
    record: KeyRecord, unused_since: datetime, at: datetime, include_disabled: bool
) -> bool:
    """Whether the reaper takes ``record`` (``sql.STALE``): not revoked, not disabled
    (unless ``include_disabled``), and unused since ``unused_since`` or expired by ``at``."""
    return (
        record.revoked_at is None
        and (include_disabled or record.disabled_at is None)
        and (
            (record.last_used_at or record.created_at) < unused_since
            or (record.expires_at is not None and record.expires_at <= at)
        )
    )


def update_action(changes: Mapping[str, Any]) -> str:
    """``disabled``/``enabled`` for a change of ``disabled_at`` alone, else ``updated``."""
    if set(changes) == {"disabled_at"}:
        return "enabled" if changes["disabled_at"] is None else "disabled"
    return "updated"


# -- audit events ---------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


def event_detail(changes: Mapping[str, Any]) -> dict[str, Any]:
    """An ``updated`` event's detail: each field set and its new value, as JSON. Never a
    secret: ``update`` cannot change the hash (``UPDATABLE_FIELDS``)."""
    detail = {name: _json_value(changes[name]) for name in sorted(changes)}
    json.dumps(detail)  # fail before the write, not inside it
    return detail


def created_detail(record: KeyRecord, replaces: str | None) -> dict[str, Any]:
    """A ``created`` event's detail: what the key was created with (name, scopes, expiry,
    limits, IP allowlist) and the names of its metadata keys. Metadata values are the
    caller's and may be sensitive, so they are left out; the hash is never written."""
    detail: dict[str, Any] = {
        "name": record.name,
        "scopes": list(record.scopes),
        "expires_at": _json_value(record.expires_at),
        "rate_limit": record.rate_limit,
        "quota": record.quota,
        "quota_refill": _json_value(record.quota_refill),
        "ip_allowlist": list(record.ip_allowlist),
        "metadata_keys": sorted(record.metadata),
    }
    if record.rate_limits:
        detail["rate_limits"] = dict(record.rate_limits)
    if replaces is not None:
        detail["replaces"] = replaces
    return detail


def rotated_detail(successor: str, expires_at: datetime | None) -> dict[str, Any]:
    """A ``rotated`` event's detail: the successor and the old key's grace expiry."""
    return {"replaced_by": successor, "expires_at": _json_value(expires_at)}


def reaped_detail(record: KeyRecord, unused_since: datetime) -> dict[str, Any]:
    """A ``reaped`` event's detail: why the key was reaped."""
    last = record.last_used_at or record.created_at
    return {
        "why": "unused" if last < unused_since else "expired",
        "last_used_at": _json_value(record.last_used_at),
    }


def owner_limits_event(
    owner: str, limits: OwnerLimits | None, at: datetime, actor: str
) -> KeyEvent:
    """What setting (or, with ``None``, clearing) an owner's limits records: about the
    owner, no key; the limits set, never a count."""
    detail: dict[str, Any] = {"cleared": True}
    if limits is not None:
        detail = {
            "rate_limits": dict(limits.rate_limits),
            "quota": limits.quota,
            "quota_refill": _json_value(limits.quota_refill),
        }
    return KeyEvent(at, "", owner, "owner_limits", actor, detail)


def pruned_detail(before: datetime, count: int) -> dict[str, Any]:
    """A ``pruned`` event's detail: the cutoff (events before it were deleted) and how
    many were."""
    return {"cutoff": _json_value(before), "count": count}


def insert_events(
    inserted: KeyRecord, replaced: Sequence[str], at: datetime, actor: str
) -> list[KeyEvent]:
    """What an ``insert`` records: ``replaced`` for each key it revoked, then ``created``."""
    owner = inserted.owner
    events = [
        KeyEvent(at, old, owner, "replaced", actor, {"replaced_by": inserted.id})
        for old in replaced
    ]
    detail = created_detail(inserted, inserted.replaces)
    events.append(KeyEvent(at, inserted.id, owner, "created", actor, detail))
    return events


def rotate_events(old: KeyRecord, successor: KeyRecord, at: datetime, actor: str) -> list[KeyEvent]:
    """What a ``rotate`` records: ``rotated`` (the old key, as updated) and ``created``."""
    rotated = rotated_detail(successor.id, old.expires_at)
    created = created_detail(successor, successor.replaces)
    return [
        KeyEvent(at, old.id, old.owner, "rotated", actor, rotated),
        KeyEvent(at, successor.id, successor.owner, "created", actor, created),
    ]


def reap_events(
    stale: Sequence[KeyRecord], unused_since: datetime, at: datetime, actor: str
) -> list[KeyEvent]:
    """What a ``reap`` records: one ``reaped`` event per key, with why."""
    return [
        KeyEvent(at, r.id, r.owner, "reaped", actor, reaped_detail(r, unused_since)) for r in stale
    ]


def pruned_event(before: datetime, count: int, actor: str) -> KeyEvent:
    """What ``prune_events`` records after its delete: about the log, no key, no owner."""
    return KeyEvent(utcnow(), "", "", "pruned", actor, pruned_detail(before, count))
