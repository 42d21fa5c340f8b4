"""KeyManager: mint, list, revoke, rotate and reap named keys (the CLI is a thin shell).

The rules users learned the hard way live here, so every caller gets them:

* names are trimmed, 1-64 printable characters;
* metadata is a JSON object that every store can hold (no NUL, no lone surrogate, no
  NaN), checked here so a key accepted on SQLite is never refused by Postgres;
* one active key per ``(owner, name)``: creating a second fails unless ``replace=True``,
  which revokes the old key(s) and mints the new one in one transaction;
* everything is owner-scoped: a key id of another owner behaves as an unknown id;
* a key is rotated at most once: its successor keeps its prefix and its lifetime;
* key ids may be given as shown (``ks_AbC123def456…``);
* usage limits live with the key: ``rate_limit`` (``10/second``…), ``quota`` uses,
  refilled every ``quota_refill``;
* ``update`` changes a live key (scopes, name, metadata, expiry, IP allowlist, limits)
  without changing its secret, and every running process hears of it as of a
  revocation; ``disable`` and ``enable`` switch a key off and on again; a revoked key
  can be none of these (a revocation is final for the record too);
* every change is recorded, in its own transaction, as an audit event naming its actor
  (``KeyManager(actor=...)``, or ``actor=`` per call); ``events`` reads them back;
* the plaintext key is returned exactly once, by ``create`` and ``rotate``.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Final, Literal

import anyio.to_thread
from starlette.exceptions import WebSocketException
from starlette.requests import HTTPConnection

from .config import resolve_database_url
from .durations import parse_duration
from .errors import (
    InvalidKeyName,
    KeyAlreadyRotated,
    KeyManagementError,
    KeyNotFound,
    ServiceUnavailable,
    StoreError,
)
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from .limits import normalize_rate_limit, quota_changes
from .principal import APIKeyUser, normalize_cidrs
from .responses import WEBSOCKET_TRY_AGAIN_LATER, KeystileHTTPException
from .stores import store_from_url
from .stores.protocol import KeyStore
from .stores.records import KeyEvent, KeyRecord, UsageBucket, UsageTotal, utcnow
from .stores.rules import SYSTEM_ACTOR, revoked_error
from .tokens import DEFAULT_PREFIX, generate_key, normalize_key_id, redact, validate_prefix

__all__ = [
    "DEFAULT_ROTATION_GRACE",
    "UNCHANGED",
    "CreatedKey",
    "KeyManager",
    "revoke_presented",
]

logger = logging.getLogger("keystile")

MAX_NAME_LENGTH = 64
MAX_OWNER_LENGTH = 255
#: ``KeyManager.usage``'s periods and their length in seconds.
UsageGranularity = Literal["minute", "hour", "day"]
USAGE_GRANULARITIES: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
#: How long the old key keeps working after ``rotate``.
DEFAULT_ROTATION_GRACE = timedelta(hours=1)
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token
LOGOUT_UNAVAILABLE = (
    "The logout could not be recorded because the key store is unavailable; the key still"
    " works. Retry shortly."
)


class _Unchanged:
    """The type of ``UNCHANGED``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


#: ``KeyManager.update``'s default: leave this field as it is (``None`` clears it).
UNCHANGED: Final = _Unchanged()


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A freshly minted key. ``key`` is the plaintext: show it once, store it nowhere."""

    key: str = field(repr=False)
    record: KeyRecord

    @property
    def id(self) -> str:
        return self.record.id

    def __repr__(self) -> str:
        shown = redact(self.record.id, self.record.prefix)
        return f"CreatedKey(key={shown!r}, record={self.record!r})"


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
    if isinstance(quota, bool) or not isinstance(quota, int) or not 0 <= quota < 2**62:
        raise KeyManagementError(f"quota must be a whole number of uses >= 0, got {quota!r}")
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


def validate_actor(actor: str) -> str:
    """An audit actor: 1-255 printable characters (``alice@example.com``, ``cli:ops@host``)."""
    if not isinstance(actor, str) or not 1 <= len(actor) <= 255 or not actor.isprintable():
        raise KeyManagementError("actor must be 1-255 printable characters")
    return actor


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


class KeyManager:
    """Async key management over a ``KeyStore``. Usable as ``async with``."""

    def __init__(
        self,
        store: KeyStore,
        *,
        prefix: str = DEFAULT_PREFIX,
        argon2: Argon2Parameters = DEFAULT_PARAMETERS,
        default_expires_in: timedelta | None = None,
        actor: str = SYSTEM_ACTOR,
    ) -> None:
        self.store = store
        self.prefix = validate_prefix(prefix)
        self.hasher = SecretHasher(argon2)
        self.default_expires_in = default_expires_in
        #: Who changes are attributed to in the audit log unless a call names someone.
        self.actor = validate_actor(actor)

    @classmethod
    def from_url(cls, database_url: str | None = None, **options: Any) -> KeyManager:
        """A manager on the store a URL names (``KEYSTILE_DATABASE_URL`` or the default
        SQLite file when ``None``)."""
        return cls(store_from_url(resolve_database_url(database_url)), **options)

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    async def __aenter__(self) -> KeyManager:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- operations ------------------------------------------------------------------

    async def create(
        self,
        *,
        owner: str,
        name: str,
        scopes: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
        expires_in: timedelta | None = None,
        replace: bool = False,
        rate_limit: str | None = None,
        quota: int | None = None,
        quota_refill: timedelta | str | None = None,
        ip_allowlist: Iterable[str] | None = None,
        actor: str | None = None,
    ) -> CreatedKey:
        """Mint a key. Raises ``DuplicateKeyName`` if ``(owner, name)`` already has an
        active (or disabled) key, unless ``replace=True`` (then the old key is revoked
        atomically).

        ``rate_limit`` (``"10/second"``, ``"100/minute"``, ``"1000/hour"``, ``"N/day"``)
        and ``quota`` (uses, refilled every ``quota_refill``, e.g. ``"1d"``) are the key's
        usage limits, enforced by the middleware after the key is verified;
        ``ip_allowlist`` (CIDRs) the addresses it may be used from."""
        if expires_at is not None and expires_in is not None:
            raise KeyManagementError("give expires_at or expires_in, not both")
        now = utcnow()
        expires_at = self._expiry(now, expires_at, expires_in)
        limits = self._limits(rate_limit, quota, quota_refill, now)
        allowlist = validate_ip_allowlist(ip_allowlist)
        who = self._actor(actor)
        record, plaintext = await self._mint(
            owner=validate_owner(owner),
            name=validate_name(name),
            prefix=self.prefix,
            scopes=validate_scopes(scopes),
            metadata=validate_metadata(metadata),
            expires_at=expires_at,
            now=now,
        )
        record = dataclasses.replace(record, ip_allowlist=allowlist, **limits)
        await self.store.insert(record, replace=replace, actor=who)
        stored = await self.store.get(record.id)
        return CreatedKey(plaintext, stored or record)

    async def list(self, owner: str) -> builtins.list[KeyRecord]:
        """Every key of ``owner``, oldest first, revoked and expired ones included."""
        return await self.store.list_keys(owner)

    async def list_all(self) -> builtins.list[KeyRecord]:
        """Every owner's keys (by owner, then oldest first): for operators."""
        return await self.store.list_all()

    async def get(self, key_id: str, *, owner: str) -> KeyRecord:
        """``owner``'s key by its id or display form (``ks_AbC123def456…``)."""
        key_id = normalize_key_id(key_id)
        record = await self.store.get_owned(key_id, owner)
        if record is None:
            raise KeyNotFound(f"no key {key_id!r} for owner {owner!r}")
        return record

    async def revoke(self, key_id: str, *, owner: str, actor: str | None = None) -> bool:
        """Revoke ``owner``'s key (by id or display form); ``True`` if it was active,
        ``False`` if there was nothing to revoke (already revoked, or no such key of that
        owner). Idempotent: only a revocation that happened is recorded."""
        who = self._actor(actor)
        return await self.store.revoke(normalize_key_id(key_id), owner, at=utcnow(), actor=who)

    async def disable(self, key_id: str, *, owner: str, actor: str | None = None) -> KeyRecord:
        """Switch ``owner``'s key off until ``enable``: its requests are refused with 401
        ("The API key has been disabled.", told only to a caller who proved the secret),
        in every process at once, as after a revocation. Unlike ``revoke`` it can be undone,
        and the key keeps its name. Disabling a disabled key changes (and records) nothing;
        a revoked key raises ``KeyManagementError``."""
        return await self._switch(key_id, owner, utcnow(), actor)

    async def enable(self, key_id: str, *, owner: str, actor: str | None = None) -> KeyRecord:
        """Switch a disabled key of ``owner`` back on; a no-op (nothing recorded) if it is
        not disabled. A revoked key raises ``KeyManagementError``; an expired key stays
        refused."""
        return await self._switch(key_id, owner, None, actor)

    async def _switch(
        self, key_id: str, owner: str, disabled_at: datetime | None, actor: str | None
    ) -> KeyRecord:
        who = self._actor(actor)
        current = await self.get(key_id, owner=owner)
        if current.revoked_at is not None:
            raise revoked_error(current.id, owner)
        if (current.disabled_at is None) == (disabled_at is None):
            return current
        updated = await self.store.update(
            current.id, owner, {"disabled_at": disabled_at}, at=utcnow(), actor=who
        )
        if updated is None:
            raise KeyNotFound(f"no key {current.id!r} for owner {owner!r}")
        return updated

    async def events(
        self,
        *,
        owner: str | None = None,
        key_id: str | None = None,
        since: timedelta | datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[KeyEvent]:
        """The audit log, oldest first: every change to a key (``created``, ``replaced``,
        ``rotated``, ``revoked``, ``reaped``, ``updated``, ``disabled``, ``enabled``,
        ``logout``), and every prune of the log (``pruned``, with no key and no owner),
        with its time, actor and detail. Filtered by owner, key (id or display
        form) and time (``since``: a moment, or a ``timedelta`` back from now); with
        ``limit``, the newest ``limit`` events."""
        if isinstance(since, timedelta):
            since = utcnow() - since
        elif since is not None and since.tzinfo is None:
            raise KeyManagementError("since must be timezone-aware")
        if limit is not None and limit < 1:
            raise KeyManagementError("limit must be at least 1")
        return await self.store.list_events(
            owner=owner,
            key_id=normalize_key_id(key_id) if key_id is not None else None,
            since=since,
            limit=limit,
        )

    async def prune_events(self, *, older_than: timedelta, actor: str | None = None) -> int:
        """Delete audit events older than ``older_than``; returns how many. Events are
        kept until an operator prunes them, and every prune is itself recorded, in the
        same transaction, as a ``pruned`` event (actor, cutoff, count) that it keeps."""
        if older_than < timedelta(0):
            raise KeyManagementError("older_than must not be negative")
        who = self._actor(actor)
        return await self.store.prune_events(before=utcnow() - older_than, actor=who)

    async def usage(
        self,
        key_id: str,
        *,
        owner: str,
        since: timedelta | datetime,
        until: datetime | None = None,
        by: UsageGranularity = "minute",
    ) -> builtins.list[UsageBucket]:
        """``owner``'s key's usage (by id or display form): per ``by`` period (``minute``,
        ``hour`` or ``day``, UTC), the requests it authenticated and the attempts refused
        against it (wrong secret, revoked, expired, disabled), oldest first, periods
        without any omitted. ``since`` (a moment, or a ``timedelta`` back from now) is
        rounded down to the start of its period, so the first bucket is whole; ``until``
        is exclusive. Counts reach the store with each process's flush (``flush_interval``).
        Another owner's key raises ``KeyNotFound``."""
        seconds = USAGE_GRANULARITIES.get(by)
        if seconds is None:
            raise KeyManagementError(
                f"by must be one of {', '.join(USAGE_GRANULARITIES)}, not {by!r}"
            )
        record = await self.get(key_id, owner=owner)
        start = _period_start(_since(since), seconds)
        return await self.store.usage(
            record.id, owner, since=start, until=_until(until), bucket_seconds=seconds
        )

    async def top_keys(
        self, owner: str, *, since: timedelta | datetime, limit: int = 10
    ) -> builtins.list[UsageTotal]:
        """``owner``'s ``limit`` busiest keys since ``since`` (most requests first), with
        the attempts refused against each."""
        if limit < 1:
            raise KeyManagementError("limit must be at least 1")
        return await self.store.top_usage(owner, since=_since(since), until=None, limit=limit)

    async def update(
        self,
        key_id: str,
        *,
        owner: str,
        scopes: Iterable[str] | _Unchanged = UNCHANGED,
        name: str | _Unchanged = UNCHANGED,
        metadata: Mapping[str, Any] | _Unchanged | None = UNCHANGED,
        expires_at: datetime | _Unchanged | None = UNCHANGED,
        expires_in: timedelta | _Unchanged = UNCHANGED,
        ip_allowlist: Iterable[str] | _Unchanged | None = UNCHANGED,
        rate_limit: str | _Unchanged | None = UNCHANGED,
        quota: int | _Unchanged | None = UNCHANGED,
        quota_refill: timedelta | str | _Unchanged | None = UNCHANGED,
        actor: str | None = None,
    ) -> KeyRecord:
        """Change ``owner``'s key (by id or display form) without changing its secret;
        returns it as updated. Every running middleware hears of the change as of a
        revocation (at once in this process, by NOTIFY on Postgres, by the change log on
        SQLite) and applies it to the key's next request. The change and its ``updated``
        audit event (the fields set and their new values) are one transaction.

        Each field is left as it is unless given. ``scopes`` and ``metadata`` replace the
        key's own (``metadata=None``: empty); ``name`` keeps the no-sprawl rule (another
        key of ``owner`` holding that name: ``DuplicateKeyName``); ``expires_at=None``
        removes the expiry, ``expires_in`` sets it from now; ``ip_allowlist`` (IPv4/IPv6
        CIDRs) replaces the allowlist, ``None`` or ``[]`` removes it. ``rate_limit=None``
        clears it; a new ``quota`` starts full (its period, for ``quota_refill``, starts
        now); ``quota=None`` removes the quota and its refill. Raises ``KeyNotFound`` for
        an unknown id or another owner's key, and ``KeyManagementError`` for a revoked
        key: a revocation is final, decided by the store in the write itself, so an
        update racing a revocation never changes the revoked record."""
        key_id = normalize_key_id(key_id)
        who = self._actor(actor)
        changes: dict[str, Any] = {}
        if not isinstance(scopes, _Unchanged):
            changes["scopes"] = validate_scopes(scopes)
        if not isinstance(name, _Unchanged):
            changes["name"] = validate_name(name)
        if not isinstance(metadata, _Unchanged):
            changes["metadata"] = validate_metadata(metadata)
        if not isinstance(expires_at, _Unchanged) and not isinstance(expires_in, _Unchanged):
            raise KeyManagementError("give expires_at or expires_in, not both")
        if not isinstance(expires_at, _Unchanged):
            changes["expires_at"] = (
                None if expires_at is None else self._expiry(utcnow(), expires_at, None)
            )
        if not isinstance(expires_in, _Unchanged):
            if not isinstance(expires_in, timedelta):
                raise KeyManagementError("expires_in must be a timedelta")
            changes["expires_at"] = self._expiry(utcnow(), None, expires_in)
        if not isinstance(ip_allowlist, _Unchanged):
            changes["ip_allowlist"] = validate_ip_allowlist(ip_allowlist)
        if not isinstance(rate_limit, _Unchanged):
            changes["rate_limit"] = validate_rate_limit(rate_limit)
        if not isinstance(quota, _Unchanged) or not isinstance(quota_refill, _Unchanged):
            current = await self.get(key_id, owner=owner)
            now = utcnow()
            new_quota = current.quota if isinstance(quota, _Unchanged) else validate_quota(quota)
            refill = (
                current.quota_refill
                if isinstance(quota_refill, _Unchanged)
                else validate_refill(quota_refill)
            )
            if refill is not None and new_quota is None:
                if not isinstance(quota_refill, _Unchanged):
                    raise KeyManagementError("quota_refill needs a quota")
                refill = None
            if isinstance(quota, _Unchanged):
                changes["quota_refill"] = refill
                if refill is not None and current.quota_reset_at is None:
                    changes["quota_reset_at"] = now
            else:
                changes.update(quota_changes(new_quota, refill, now))
        updated = await self.store.update(key_id, owner, changes, at=utcnow(), actor=who)
        if updated is None:
            raise KeyNotFound(f"no key {key_id!r} for owner {owner!r}")
        return updated

    async def rotate(
        self,
        key_id: str,
        *,
        owner: str,
        grace: timedelta = DEFAULT_ROTATION_GRACE,
        actor: str | None = None,
    ) -> CreatedKey:
        """Mint a successor with the same owner, name, prefix, scopes and metadata; the old
        key keeps working for ``grace`` and then expires. Returns the new plaintext once.

        The successor lives as long as the old key was meant to (``expires_at -
        created_at``, counted from now), or ``default_expires_in`` if the old key had no
        expiry. A key is rotated once: rotating it again, even concurrently, raises
        ``KeyAlreadyRotated`` (rotate its successor instead); a revoked, expired or
        disabled key raises ``KeyNotFound``. The successor keeps the IP allowlist.
        """
        if grace < timedelta(0):
            raise KeyManagementError("grace must not be negative")
        who = self._actor(actor)
        old = await self.get(key_id, owner=owner)
        self._check_rotatable(old, owner)
        now = utcnow()
        grace_until = _later(now, grace, "grace")
        successor, plaintext = await self._mint(
            owner=old.owner,
            name=old.name,
            prefix=old.prefix,
            scopes=old.scopes,
            metadata=validate_metadata(old.metadata),
            expires_at=self._successor_expiry(old, now),
            now=now,
            replaces=old.id,
        )
        # The successor keeps the key's plan and what is left of its quota.
        successor = dataclasses.replace(
            successor,
            rate_limit=old.rate_limit,
            quota=old.quota,
            quota_remaining=old.quota_left(now),
            quota_refill=old.quota_refill,
            quota_reset_at=old.quota_reset_at,
            ip_allowlist=old.ip_allowlist,
        )
        updated = await self.store.rotate(
            old.id, owner, successor, grace_until=grace_until, actor=who
        )
        if updated is None:
            # Changed since it was read (a concurrent rotation, revoke or expiry):
            # read it again to say which.
            self._check_rotatable(await self.store.get_owned(old.id, owner) or old, owner)
            raise KeyNotFound(f"key {old.id!r} of owner {owner!r} is not active; nothing to rotate")
        stored = await self.store.get(successor.id)
        return CreatedKey(plaintext, stored or successor)

    async def reap(
        self,
        *,
        unused_for: timedelta = timedelta(days=90),
        dry_run: bool = False,
        include_disabled: bool = False,
        actor: str | None = None,
    ) -> builtins.list[KeyRecord]:
        """Revoke keys unused (by ``last_used_at``, else ``created_at``) for longer than
        ``unused_for``, and expired keys. Returns them; ``dry_run`` changes nothing.

        Disabled keys are left alone (an operator switched them off on purpose, and
        they are unused for that reason) unless ``include_disabled``."""
        now = utcnow()
        return await self.store.reap(
            unused_since=now - unused_for,
            at=now,
            dry_run=dry_run,
            include_disabled=include_disabled,
            actor=self._actor(actor),
        )

    # -- helpers ---------------------------------------------------------------------

    def _actor(self, actor: str | None) -> str:
        return self.actor if actor is None else validate_actor(actor)

    def _expiry(
        self, now: datetime, expires_at: datetime | None, expires_in: timedelta | None
    ) -> datetime | None:
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise KeyManagementError("expires_at must be timezone-aware")
            try:
                return expires_at.astimezone(timezone.utc)
            except OverflowError:
                raise KeyManagementError(
                    "expires_at is past the last representable date (year 9999)"
                ) from None
        delta = expires_in if expires_in is not None else self.default_expires_in
        if delta is None:
            return None
        if delta <= timedelta(0):
            raise KeyManagementError("expires_in must be positive")
        return _later(now, delta, "expires_in")

    def _successor_expiry(self, old: KeyRecord, now: datetime) -> datetime | None:
        if old.expires_at is not None and old.expires_at > old.created_at:
            return _later(now, old.expires_at - old.created_at, "the key's lifetime")
        return self._expiry(now, None, None)

    @staticmethod
    def _limits(
        rate_limit: str | None,
        quota: int | None,
        quota_refill: timedelta | str | None,
        now: datetime,
    ) -> dict[str, Any]:
        refill = validate_refill(quota_refill)
        quota = validate_quota(quota)
        if refill is not None and quota is None:
            raise KeyManagementError("quota_refill needs a quota")
        return {
            "rate_limit": validate_rate_limit(rate_limit),
            **(quota_changes(quota, refill, now) if quota is not None else {}),
        }

    @staticmethod
    def _check_rotatable(record: KeyRecord, owner: str) -> None:
        if record.replaced_by is not None:
            raise KeyAlreadyRotated(record.id, record.replaced_by)
        if not record.is_active():
            raise KeyNotFound(
                f"key {record.id!r} of owner {owner!r} is not active; nothing to rotate"
            )

    async def _mint(
        self,
        *,
        owner: str,
        name: str,
        prefix: str,
        scopes: tuple[str, ...],
        metadata: dict[str, Any],
        expires_at: datetime | None,
        now: datetime,
        replaces: str | None = None,
    ) -> tuple[KeyRecord, str]:
        plaintext, parsed = generate_key(prefix)
        secret_hash = await anyio.to_thread.run_sync(self.hasher.hash, parsed.secret)
        record = KeyRecord(
            id=parsed.key_id,
            owner=owner,
            name=name,
            prefix=parsed.prefix,
            secret_hash=secret_hash,
            scopes=scopes,
            metadata=metadata,
            created_at=now,
            expires_at=expires_at,
            replaces=replaces,
        )
        return record, plaintext


def _since(since: timedelta | datetime) -> datetime:
    if isinstance(since, timedelta):
        if since < timedelta(0):
            raise KeyManagementError("since must not be negative")
        return utcnow() - since
    if since.tzinfo is None:
        raise KeyManagementError("since must be timezone-aware")
    return since


def _until(until: datetime | None) -> datetime | None:
    if until is not None and until.tzinfo is None:
        raise KeyManagementError("until must be timezone-aware")
    return until


def _period_start(moment: datetime, seconds: int) -> datetime:
    """The start of the UTC period of ``seconds`` that holds ``moment``."""
    epoch = math.floor(moment.timestamp()) // seconds * seconds
    return datetime.fromtimestamp(epoch, timezone.utc)


def _later(now: datetime, delta: timedelta, what: str) -> datetime:
    try:
        return now + delta
    except OverflowError:
        raise KeyManagementError(
            f"{what} of {delta.days} days reaches past the last representable date"
            " (year 9999); choose a shorter one, or no expiry"
        ) from None


async def revoke_presented(conn: HTTPConnection) -> bool:
    """Revoke the key that authenticated this request (logout).

    Returns whether a key was revoked. Needs ``APIKeyMiddleware`` in front of the route.
    The audit log records it as ``logout`` by ``apikey:<name>`` (the key itself).

    The key leaves this process's cache first, so its next request here reaches the
    store whatever happens next. If the store cannot record the revocation, the key
    still works, and the client must be told: this raises
    :class:`~keystile.responses.KeystileHTTPException`, answered like the middleware's
    own 503 (``Retry-After``, error ``temporarily_unavailable``), or on a WebSocket
    closes with 1013 (try again later).
    """
    user = conn.scope.get("user")
    middleware = conn.scope.get("keystile")
    if not isinstance(user, APIKeyUser) or middleware is None:
        return False
    middleware.evict(user.key_id)
    try:
        revoked: bool = await middleware.store.revoke(
            user.key_id, user.owner, at=utcnow(), actor=user.display_name, action="logout"
        )
    except StoreError as exc:
        logger.warning("keystile: could not record the logout of key %s: %s", user.redacted, exc)
        if conn.scope["type"] == "websocket":
            raise WebSocketException(
                WEBSOCKET_TRY_AGAIN_LATER, reason="temporarily_unavailable"
            ) from exc
        error = ServiceUnavailable("store_unavailable", LOGOUT_UNAVAILABLE)
        raise KeystileHTTPException(
            error, realm=middleware.realm, header_name=middleware.header_name
        ) from exc
    # A request that raced the revocation may have cached the key again meanwhile.
    middleware.evict(user.key_id)
    return revoked
