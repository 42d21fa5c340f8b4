"""KeyManager: mint, list, revoke, rotate and reap named keys (the CLI is a thin shell).

The rules users learned the hard way live here, so every caller gets them:

* names are trimmed, 1-64 printable characters;
* one active key per ``(owner, name)``: creating a second fails unless ``replace=True``,
  which revokes the old key(s) and mints the new one in one transaction;
* everything is owner-scoped: a key id of another owner behaves as an unknown id;
* the plaintext key is returned exactly once, by ``create`` and ``rotate``.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import anyio.to_thread
from starlette.requests import HTTPConnection

from .config import resolve_database_url
from .errors import InvalidKeyName, KeyManagementError, KeyNotFound
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from .principal import APIKeyUser
from .stores import store_from_url
from .stores.base import KeyRecord, KeyStore, utcnow
from .tokens import DEFAULT_PREFIX, generate_key, redact, validate_prefix

__all__ = ["DEFAULT_ROTATION_GRACE", "CreatedKey", "KeyManager", "revoke_presented"]

MAX_NAME_LENGTH = 64
MAX_OWNER_LENGTH = 255
#: How long the old key keeps working after ``rotate``.
DEFAULT_ROTATION_GRACE = timedelta(hours=1)
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token


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


class KeyManager:
    """Async key management over a ``KeyStore``. Usable as ``async with``."""

    def __init__(
        self,
        store: KeyStore,
        *,
        prefix: str = DEFAULT_PREFIX,
        argon2: Argon2Parameters = DEFAULT_PARAMETERS,
        default_expires_in: timedelta | None = None,
    ) -> None:
        self.store = store
        self.prefix = validate_prefix(prefix)
        self.hasher = SecretHasher(argon2)
        self.default_expires_in = default_expires_in

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
    ) -> CreatedKey:
        """Mint a key. Raises ``DuplicateKeyName`` if ``(owner, name)`` already has an
        active key, unless ``replace=True`` (then the old key is revoked atomically)."""
        if expires_at is not None and expires_in is not None:
            raise KeyManagementError("give expires_at or expires_in, not both")
        now = utcnow()
        expires_at = self._expiry(now, expires_at, expires_in)
        record, plaintext = await self._mint(
            owner=validate_owner(owner),
            name=validate_name(name),
            scopes=validate_scopes(scopes),
            metadata=dict(metadata or {}),
            expires_at=expires_at,
            now=now,
        )
        await self.store.insert(record, replace=replace)
        stored = await self.store.get(record.id)
        return CreatedKey(plaintext, stored or record)

    async def list(self, owner: str) -> builtins.list[KeyRecord]:
        """Every key of ``owner``, oldest first, revoked and expired ones included."""
        return await self.store.list_keys(owner)

    async def get(self, key_id: str, *, owner: str) -> KeyRecord:
        record = await self.store.get_owned(key_id, owner)
        if record is None:
            raise KeyNotFound(f"no key {key_id!r} for owner {owner!r}")
        return record

    async def revoke(self, key_id: str, *, owner: str) -> bool:
        """Revoke ``owner``'s key; ``True`` if it was active, ``False`` if there was nothing
        to revoke (already revoked, or no such key of that owner). Idempotent."""
        return await self.store.revoke(key_id, owner, at=utcnow())

    async def rotate(
        self, key_id: str, *, owner: str, grace: timedelta = DEFAULT_ROTATION_GRACE
    ) -> CreatedKey:
        """Mint a successor with the same owner, name, scopes and metadata; the old key
        keeps working for ``grace`` and then expires. Returns the new plaintext once."""
        if grace < timedelta(0):
            raise KeyManagementError("grace must not be negative")
        old = await self.get(key_id, owner=owner)
        now = utcnow()
        successor, plaintext = await self._mint(
            owner=old.owner,
            name=old.name,
            scopes=old.scopes,
            metadata=dict(old.metadata),
            expires_at=self._expiry(now, None, None),
            now=now,
            replaces=old.id,
        )
        updated = await self.store.rotate(key_id, owner, successor, grace_until=now + grace)
        if updated is None:
            raise KeyNotFound(f"key {key_id!r} of owner {owner!r} is not active; nothing to rotate")
        stored = await self.store.get(successor.id)
        return CreatedKey(plaintext, stored or successor)

    async def reap(
        self, *, unused_for: timedelta = timedelta(days=90), dry_run: bool = False
    ) -> builtins.list[KeyRecord]:
        """Revoke keys unused (by ``last_used_at``, else ``created_at``) for longer than
        ``unused_for``, and expired keys. Returns them; ``dry_run`` changes nothing."""
        now = utcnow()
        return await self.store.reap(unused_since=now - unused_for, at=now, dry_run=dry_run)

    # -- helpers ---------------------------------------------------------------------

    def _expiry(
        self, now: datetime, expires_at: datetime | None, expires_in: timedelta | None
    ) -> datetime | None:
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise KeyManagementError("expires_at must be timezone-aware")
            return expires_at.astimezone(timezone.utc)
        delta = expires_in if expires_in is not None else self.default_expires_in
        if delta is None:
            return None
        if delta <= timedelta(0):
            raise KeyManagementError("expires_in must be positive")
        return now + delta

    async def _mint(
        self,
        *,
        owner: str,
        name: str,
        scopes: tuple[str, ...],
        metadata: dict[str, Any],
        expires_at: datetime | None,
        now: datetime,
        replaces: str | None = None,
    ) -> tuple[KeyRecord, str]:
        plaintext, parsed = generate_key(self.prefix)
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


async def revoke_presented(conn: HTTPConnection) -> bool:
    """Revoke the key that authenticated this request (logout) and evict it at once.

    Returns whether a key was revoked. Needs ``APIKeyMiddleware`` in front of the route.
    """
    user = conn.scope.get("user")
    middleware = conn.scope.get("keystile")
    if not isinstance(user, APIKeyUser) or middleware is None:
        return False
    revoked: bool = await middleware.store.revoke(user.key_id, user.owner, at=utcnow())
    middleware.evict(user.key_id)
    return revoked
