"""The rules a key's fields and the manager's arguments obey, each written once.

``KeyManager`` checks everything here before it touches a store, so a value one store
accepts is never refused by another, and every caller (the manager, the CLI) gets the
same message. A broken rule is a ``KeyManagementError`` (``InvalidKeyName`` for a name)
that says what was wrong; nothing here reads or writes a store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from .durations import parse_duration
from .errors import InvalidKeyName, KeyManagementError
from .limits import (
    MAX_QUOTA,
    POLICY_NAME,
    normalize_rate_limit,
    parse_rate_limits,
    quota_changes,
)
from .principal import normalize_cidrs
from .stores.records import KeyRecord

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_OWNER_LENGTH",
    "USAGE_GRANULARITIES",
    "UsageGranularity",
    "aware",
    "create_limits",
    "expiry",
    "key_rate_limits",
    "later",
    "not_negative",
    "owner_quota",
    "quota_update",
    "since_moment",
    "update_changes",
    "usage_seconds",
    "usage_start",
    "validate_actor",
    "validate_ip_allowlist",
    "validate_limit",
    "validate_metadata",
    "validate_name",
    "validate_owner",
    "validate_quota",
    "validate_rate_limit",
    "validate_rate_limits",
    "validate_refill",
    "validate_scopes",
]

MAX_NAME_LENGTH = 64
MAX_OWNER_LENGTH = 255
#: ``KeyManager.usage``'s periods and their length in seconds.
UsageGranularity = Literal["minute", "hour", "day"]
USAGE_GRANULARITIES: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token


def validate_name(name: str) -> str:
    trimmed = name.strip()
    if not 1 <= len(trimmed) <= MAX_NAME_LENGTH or not trimmed.isprintable():
        raise InvalidKeyName(
            f"key name must be 1-{MAX_NAME_LENGTH} printable characters after trimming, "
            f"got {len(trimmed)} characters"
            + ("" if trimmed.isprintable() else " including non-printable ones")
        )
    return trimmed


def validate_owner(owner: str) -> str:
    if not 1 <= len(owner) <= MAX_OWNER_LENGTH or not owner.isprintable() or owner != owner.strip():
        raise KeyManagementError(
            f"owner must be 1-{MAX_OWNER_LENGTH} printable characters without surrounding spaces"
        )
    return owner


def validate_actor(actor: str) -> str:
    """An audit actor: 1-255 printable characters (``alice@example.com``, ``cli:ops@host``)."""
    if not isinstance(actor, str) or not 1 <= len(actor) <= 255 or not actor.isprintable():
        raise KeyManagementError("actor must be 1-255 printable characters")
    return actor


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    result: list[str] = []
    for scope in scopes:
        if not _SCOPE_RE.fullmatch(scope):
            raise KeyManagementError(
                f"invalid scope {scope!r}: a scope is non-empty, without spaces, quotes"
                " or backslashes"
            )
        if scope not in result:
            result.append(scope)
    return tuple(result)


def validate_rate_limit(rate_limit: str | None) -> str | None:
    """The stored form of a rate limit (``10/s`` → ``10/second``), or ``KeyManagementError``."""
    try:
        return normalize_rate_limit(rate_limit)
    except ValueError as exc:
        raise KeyManagementError(str(exc)) from None


def validate_quota(quota: int | None) -> int | None:
    if quota is None:
        return None
    if isinstance(quota, bool) or not isinstance(quota, int) or not 0 <= quota <= MAX_QUOTA:
        raise KeyManagementError(
            f"quota must be a whole number of uses from 0 to {MAX_QUOTA} (2**53 - 1), got {quota!r}"
        )
    return quota


def validate_refill(refill: timedelta | str | None) -> timedelta | None:
    """A refill period from a ``timedelta`` or a duration such as ``"1d"``; at least 1 s."""
    if refill is None:
        return None
    if isinstance(refill, str):
        try:
            refill = parse_duration(refill)
        except ValueError as exc:
            raise KeyManagementError(f"quota_refill: {exc}") from None
    if not isinstance(refill, timedelta) or refill < timedelta(seconds=1):
        raise KeyManagementError("quota_refill must be a duration of at least 1 second")
    return refill


def _refill_needs_quota(quota: int | None, refill: timedelta | None) -> None:
    if refill is not None and quota is None:
        raise KeyManagementError("quota_refill needs a quota")


def validate_rate_limits(limits: Mapping[str, str] | None) -> dict[str, str]:
    """Named rate limits as stored (name → normalised rate), or ``KeyManagementError``
    naming the first bad name or rate. ``None``: none."""
    if limits is None:
        return {}
    try:
        return {name: rate.text for name, rate in sorted(parse_rate_limits(limits).items())}
    except ValueError as exc:
        raise KeyManagementError(f"rate_limits: {exc}") from None


def key_rate_limits(
    rate_limit: str | None, rate_limits: Mapping[str, str] | None
) -> tuple[str | None, dict[str, str]]:
    """A key's ``default`` rate and its other named rates, as stored: ``rate_limit`` is
    the one named ``default``, which ``rate_limits`` may also give (once)."""
    default = validate_rate_limit(rate_limit)
    named = validate_rate_limits(rate_limits)
    if POLICY_NAME in named:
        given = named.pop(POLICY_NAME)
        if default is not None and default != given:
            raise KeyManagementError(
                f"rate_limit {default!r} and rate_limits['default'] {given!r} differ;"
                " give the default limit once"
            )
        default = given
    return default, named


def create_limits(
    rate_limit: str | None,
    quota: int | None,
    quota_refill: timedelta | str | None,
    now: datetime,
    rate_limits: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A new key's stored limit fields; its quota, if any, starts full ``now``."""
    refill = validate_refill(quota_refill)
    quota = validate_quota(quota)
    _refill_needs_quota(quota, refill)
    default, named = key_rate_limits(rate_limit, rate_limits)
    return {
        "rate_limit": default,
        "rate_limits": named,
        **(quota_changes(quota, refill, now) if quota is not None else {}),
    }


def owner_quota(
    quota: int | None, quota_refill: timedelta | str | None, now: datetime
) -> dict[str, Any]:
    """An owner's stored quota fields: a quota starts full ``now``."""
    refill = validate_refill(quota_refill)
    quota = validate_quota(quota)
    _refill_needs_quota(quota, refill)
    return quota_changes(quota, refill, now)


def quota_update(current: KeyRecord, given: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The stored quota fields after an update that gives ``quota`` and/or
    ``quota_refill``: a new quota starts full ``now``; a refill alone keeps what is left;
    removing the quota removes its refill."""
    quota = validate_quota(given["quota"]) if "quota" in given else current.quota
    if "quota_refill" in given:
        refill = validate_refill(given["quota_refill"])
        _refill_needs_quota(quota, refill)
    else:
        refill = current.quota_refill if quota is not None else None
    if "quota" in given:
        return quota_changes(quota, refill, now)
    changes: dict[str, Any] = {"quota_refill": refill}
    if refill is not None and current.quota_reset_at is None:
        changes["quota_reset_at"] = now
    return changes


def validate_ip_allowlist(cidrs: Iterable[str] | None) -> tuple[str, ...]:
    """IPv4/IPv6 CIDRs as stored (normalised, host bits zero; at most 256, no zone id, no
    IPv4-mapped network), or ``KeyManagementError``. ``None`` or empty: no allowlist
    (any address)."""
    if cidrs is None:
        return ()
    try:
        return normalize_cidrs(cidrs, strict=True)
    except ValueError as exc:
        raise KeyManagementError(f"ip_allowlist: {exc}") from None


def validate_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain JSON copy of ``metadata`` (mappings become dicts, tuples lists), or
    ``KeyManagementError`` naming the first offending place.

    One rule for every store, so a key accepted by SQLite or the memory store is never
    refused by Postgres: a mapping with string keys, every value JSON (strings, finite
    numbers, booleans, ``None``, lists, mappings), and no string, key or value, holding
    a NUL character or a lone surrogate (``jsonb`` rejects both, as it rejects NaN).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise KeyManagementError(
            f"metadata must be a mapping of strings to JSON values, not {type(metadata).__name__}"
        )
    try:
        result: dict[str, Any] = _json_copy(metadata, "metadata")
    except RecursionError:
        raise KeyManagementError(
            "metadata is nested too deeply (or contains itself) to be stored as JSON"
        ) from None
    return result


def _json_copy(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return _check_text(value, where)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise KeyManagementError(f"{where} is {value}, which JSON cannot hold")
        return float(value)
    if isinstance(value, Mapping):
        copy: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise KeyManagementError(
                    f"metadata keys must be strings; {where} has the key {key!r}"
                )
            copy[_check_text(key, f"a key of {where}")] = _json_copy(item, f"{where}[{key!r}]")
        return copy
    if isinstance(value, (list, tuple)):
        return [_json_copy(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise KeyManagementError(
        f"metadata must be JSON; {where} is a {type(value).__name__}, which JSON cannot hold"
    )


def _check_text(text: str, where: str) -> str:
    if "\x00" in text:
        raise KeyManagementError(
            f"{where} contains a NUL character (\\x00), which PostgreSQL cannot store"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise KeyManagementError(
            f"{where} is not valid Unicode (it holds a lone surrogate)"
        ) from None
    return str(text)


def aware(moment: datetime, what: str) -> datetime:
    """``moment`` if it is timezone-aware: a naive one would be read in some local time."""
    if moment.tzinfo is None:
        raise KeyManagementError(f"{what} must be timezone-aware")
    return moment


def not_negative(delta: timedelta, what: str) -> timedelta:
    if delta < timedelta(0):
        raise KeyManagementError(f"{what} must not be negative")
    return delta


def since_moment(since: timedelta | datetime, now: datetime) -> datetime:
    """A moment given as itself or as a ``timedelta`` back from ``now``."""
    if isinstance(since, timedelta):
        return now - not_negative(since, "since")
    return aware(since, "since")


def usage_start(since: timedelta | datetime, seconds: int, now: datetime) -> datetime:
    """The start of the UTC period of ``seconds`` that holds ``since``, so that the
    first bucket of a usage query is whole."""
    epoch = math.floor(since_moment(since, now).timestamp()) // seconds * seconds
    return datetime.fromtimestamp(epoch, timezone.utc)


def validate_limit(limit: int) -> int:
    """How many rows a listing returns: at least one."""
    if limit < 1:
        raise KeyManagementError("limit must be at least 1")
    return limit


def usage_seconds(by: str) -> int:
    """The length of a usage period named ``by`` (``minute``, ``hour``, ``day``)."""
    seconds = USAGE_GRANULARITIES.get(by)
    if seconds is None:
        raise KeyManagementError(f"by must be one of {', '.join(USAGE_GRANULARITIES)}, not {by!r}")
    return seconds


def later(now: datetime, delta: timedelta, what: str) -> datetime:
    """``now + delta``, or a ``KeyManagementError`` past the last ``datetime``."""
    try:
        return now + delta
    except OverflowError:
        raise KeyManagementError(
            f"{what} of {delta.days} days reaches past the last representable date"
            " (year 9999); choose a shorter one, or no expiry"
        ) from None


def _not_both(expires_at: bool, expires_in: bool) -> None:
    if expires_at and expires_in:
        raise KeyManagementError("give expires_at or expires_in, not both")


def expiry(
    now: datetime,
    expires_at: datetime | None,
    expires_in: timedelta | None,
    default: timedelta | None,
) -> datetime | None:
    """When a key set ``now`` expires: ``expires_at`` (in UTC), else ``expires_in`` (or
    ``default``) from now, else never."""
    _not_both(expires_at is not None, expires_in is not None)
    if expires_at is not None:
        aware(expires_at, "expires_at")
        try:
            return expires_at.astimezone(timezone.utc)
        except OverflowError:
            raise KeyManagementError(
                "expires_at is past the last representable date (year 9999)"
            ) from None
    delta = expires_in if expires_in is not None else default
    if delta is None:
        return None
    if delta <= timedelta(0):
        raise KeyManagementError("expires_in must be positive")
    return later(now, delta, "expires_in")


def update_changes(given: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The stored form of the fields an update gives, but its quota (``quota_update``):
    ``None`` clears an expiry, an allowlist or a rate limit, and empties the metadata."""
    changes: dict[str, Any] = {}
    if "scopes" in given:
        changes["scopes"] = validate_scopes(given["scopes"])
    if "name" in given:
        changes["name"] = validate_name(given["name"])
    if "metadata" in given:
        changes["metadata"] = validate_metadata(given["metadata"])
    _not_both("expires_at" in given, "expires_in" in given)
    if "expires_at" in given:
        expires_at = given["expires_at"]
        changes["expires_at"] = None if expires_at is None else expiry(now, expires_at, None, None)
    if "expires_in" in given:
        if not isinstance(given["expires_in"], timedelta):
            raise KeyManagementError("expires_in must be a timedelta")
        changes["expires_at"] = expiry(now, None, given["expires_in"], None)
    if "ip_allowlist" in given:
        changes["ip_allowlist"] = validate_ip_allowlist(given["ip_allowlist"])
    if "rate_limits" in given:
        default, changes["rate_limits"] = key_rate_limits(
            given.get("rate_limit"), given["rate_limits"]
        )
        if "rate_limit" in given or default is not None:
            changes["rate_limit"] = default
    elif "rate_limit" in given:
        changes["rate_limit"] = validate_rate_limit(given["rate_limit"])
    return changes
