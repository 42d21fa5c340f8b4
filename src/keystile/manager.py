"""KeyManager: mint, list, revoke, rotate and reap named keys (the CLI is a thin shell).

Every caller gets the same rules: each argument is checked by ``keystile.validation``
(names, owners, scopes, metadata, limits, allowlists, expiry) before a store is touched;
and here:

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
* the plaintext key is returned exactly once, by ``create`` and ``rotate``;
* with ``max_lifetime`` every key expires within it (``keystile.lifetime``).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import anyio.to_thread

from .database_url import resolve_database_url
from .errors import ConfigurationError, KeyAlreadyRotated, KeyNotFound
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from .keys import UNCHANGED, CreatedKey, Unchanged
from .lifetime import check_lifetime, lifetime_option
from .owners import OwnerOperations
from .stores import store_from_url
from .stores.protocol import KeyStore
from .stores.records import KeyEvent, KeyRecord, utcnow
from .stores.rules import SYSTEM_ACTOR, is_imported, revoked_error
from .tokens import DEFAULT_PREFIX, generate_key, normalize_key_id, validate_prefix
from .validation import (
    aware,
    create_limits,
    expiry,
    later,
    not_negative,
    quota_update,
    update_changes,
    validate_actor,
    validate_ip_allowlist,
    validate_limit,
    validate_metadata,
    validate_name,
    validate_owner,
    validate_scopes,
)
from .webhooks.operations import WebhookOperations

__all__ = ["DEFAULT_ROTATION_GRACE", "UNCHANGED", "CreatedKey", "KeyManager"]

#: How long the old key keeps working after ``rotate``.
DEFAULT_ROTATION_GRACE = timedelta(hours=1)


class KeyManager(OwnerOperations, WebhookOperations):
    """Async key management over a ``KeyStore``. Usable as ``async with``. An owner's
    limits and usage: :class:`~keystile.owners.OwnerOperations`; webhooks:
    :class:`~keystile.webhooks.operations.WebhookOperations`."""

    def __init__(
        self,
        store: KeyStore,
        *,
        prefix: str = DEFAULT_PREFIX,
        argon2: Argon2Parameters = DEFAULT_PARAMETERS,
        default_expires_in: timedelta | None = None,
        actor: str = SYSTEM_ACTOR,
        max_lifetime: timedelta | str | None = None,
    ) -> None:
        self.store = store
        #: The longest a key may live, from its creation; ``None``: no policy.
        self.max_lifetime = lifetime_option(max_lifetime)
        if self.max_lifetime and default_expires_in and default_expires_in > self.max_lifetime:
            raise ConfigurationError("default_expires_in is longer than max_lifetime")
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
        rate_limits: Mapping[str, str] | None = None,
        max_keys: int | None = None,
    ) -> CreatedKey:
        """Mint a key. Raises ``DuplicateKeyName`` if ``(owner, name)`` already has an
        active (or disabled) key, unless ``replace=True`` (then the old key is revoked
        atomically). With ``max_keys``, raises ``KeyLimitReached`` if ``owner`` would then
        hold more live (unrevoked, unexpired) keys, counted in the insert's transaction.

        ``rate_limit`` (``"10/second"``, ``"100/minute"``, ``"1000/hour"``, ``"N/day"``)
        and ``quota`` (uses, refilled every ``quota_refill``, e.g. ``"1d"``) are the key's
        usage limits, enforced by the middleware after the key is verified;
        ``rate_limits`` adds named ones (``{"burst": "5/second"}``; ``rate_limit`` is the
        one named ``default``), every one needing room; ``ip_allowlist`` (CIDRs) the
        addresses it may be used from."""
        now = utcnow()
        expires_at = expiry(now, expires_at, expires_in, self.default_expires_in)
        check_lifetime(self.max_lifetime, now, expires_at)
        limits = create_limits(rate_limit, quota, quota_refill, now, rate_limits)
        allowlist = validate_ip_allowlist(ip_allowlist)
        who = self._actor(actor)
        new = await self._mint(
            self.prefix,
            owner=validate_owner(owner),
            name=validate_name(name),
            scopes=validate_scopes(scopes),
            metadata=validate_metadata(metadata),
            created_at=now,
            expires_at=expires_at,
            ip_allowlist=allowlist,
            **limits,
        )
        # Passed only when set: a store of one's own written before the cap keeps working.
        cap = {} if max_keys is None else {"max_keys": max_keys}
        await self.store.insert(new.record, replace=replace, actor=who, **cap)
        return await self._as_stored(new)

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
        ``logout``, ``imported``, ``rehashed``), and every prune of the log (``pruned``,
        with no key and no owner), with its time, actor and detail. Filtered by owner, key
        (id or display form) and time (``since``: a moment, or a ``timedelta`` back from
        now); with ``limit``, the newest ``limit`` events."""
        if isinstance(since, timedelta):
            since = utcnow() - since
        return await self.store.list_events(
            owner=owner,
            key_id=normalize_key_id(key_id) if key_id is not None else None,
            since=None if since is None else aware(since, "since"),
            limit=None if limit is None else validate_limit(limit),
        )

    async def prune_events(self, *, older_than: timedelta, actor: str | None = None) -> int:
        """Delete audit events older than ``older_than``; returns how many. Events are
        kept until an operator prunes them, and every prune is itself recorded, in the
        same transaction, as a ``pruned`` event (actor, cutoff, count) that it keeps."""
        older_than = not_negative(older_than, "older_than")
        who = self._actor(actor)
        return await self.store.prune_events(before=utcnow() - older_than, actor=who)

    async def update(
        self,
        key_id: str,
        *,
        owner: str,
        scopes: Iterable[str] | Unchanged = UNCHANGED,
        name: str | Unchanged = UNCHANGED,
        metadata: Mapping[str, Any] | Unchanged | None = UNCHANGED,
        expires_at: datetime | Unchanged | None = UNCHANGED,
        expires_in: timedelta | Unchanged = UNCHANGED,
        ip_allowlist: Iterable[str] | Unchanged | None = UNCHANGED,
        rate_limit: str | Unchanged | None = UNCHANGED,
        quota: int | Unchanged | None = UNCHANGED,
        quota_refill: timedelta | str | Unchanged | None = UNCHANGED,
        actor: str | None = None,
        rate_limits: Mapping[str, str] | Unchanged | None = UNCHANGED,
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
        clears it; ``rate_limits`` replaces the named ones (``None``: none; a ``default``
        among them sets ``rate_limit``); a new ``quota`` starts full (its period, for
        ``quota_refill``, starts now); ``quota=None`` removes the quota and its refill.
        Raises ``KeyNotFound`` for an unknown id or another owner's key, and
        ``KeyManagementError`` for a revoked key: a revocation is final, decided by the
        store in the write itself, so an update racing a revocation never changes the
        revoked record."""
        key_id = normalize_key_id(key_id)
        who = self._actor(actor)
        fields = {
            "scopes": scopes,
            "name": name,
            "metadata": metadata,
            "expires_at": expires_at,
            "expires_in": expires_in,
            "ip_allowlist": ip_allowlist,
            "rate_limit": rate_limit,
            "rate_limits": rate_limits,
            "quota": quota,
            "quota_refill": quota_refill,
        }
        given = {key: value for key, value in fields.items() if value is not UNCHANGED}
        changes = update_changes(given, utcnow())
        if "quota" in given or "quota_refill" in given:
            current = await self.get(key_id, owner=owner)
            changes.update(quota_update(current, given, utcnow()))
        if "expires_at" in changes and self.max_lifetime is not None:
            created_at = (await self.get(key_id, owner=owner)).created_at
            check_lifetime(self.max_lifetime, created_at, changes["expires_at"])
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
        The successor of an imported key is a keystile key with the manager's prefix.

        The successor lives as long as the old key was meant to (``expires_at -
        created_at``, counted from now), or ``default_expires_in`` if the old key had no
        expiry. A key is rotated once: rotating it again, even concurrently, raises
        ``KeyAlreadyRotated`` (rotate its successor instead); a revoked, expired or
        disabled key raises ``KeyNotFound``. The successor keeps the IP allowlist.
        """
        grace = not_negative(grace, "grace")
        who = self._actor(actor)
        old = await self.get(key_id, owner=owner)
        self._check_rotatable(old, owner)
        now = utcnow()
        grace_until = later(now, grace, "grace")
        successor_expiry = self._successor_expiry(old, now)
        check_lifetime(self.max_lifetime, now, successor_expiry)
        new = await self._mint(
            self.prefix if is_imported(old) else old.prefix,
            owner=old.owner,
            name=old.name,
            scopes=old.scopes,
            metadata=validate_metadata(old.metadata),
            created_at=now,
            expires_at=successor_expiry,
            replaces=old.id,
            # The successor keeps the key's plan and spends the same budget: while the
            # old key is in grace both draw on one rate limit and one quota.
            budget_id=old.budget_id,
            rate_limit=old.rate_limit,
            rate_limits=dict(old.rate_limits),
            quota=old.quota,
            quota_remaining=old.quota_left(now),
            quota_refill=old.quota_refill,
            quota_reset_at=old.quota_reset_at,
            ip_allowlist=old.ip_allowlist,
        )
        updated = await self.store.rotate(
            old.id, owner, new.record, grace_until=grace_until, actor=who
        )
        if updated is None:
            # Changed since it was read (a concurrent rotation, revoke or expiry):
            # read it again to say which.
            current = await self.store.get_owned(old.id, owner) or old
            self._check_rotatable(current, owner, refused=True)
        return await self._as_stored(new)

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

    def _successor_expiry(self, old: KeyRecord, now: datetime) -> datetime | None:
        if old.expires_at is not None and old.expires_at > old.created_at:
            return later(now, old.expires_at - old.created_at, "the key's lifetime")
        return expiry(now, None, None, self.default_expires_in)

    @staticmethod
    def _check_rotatable(record: KeyRecord, owner: str, *, refused: bool = False) -> None:
        """Why ``record`` cannot be rotated, if it cannot (``refused``: the store said so)."""
        if record.replaced_by is not None:
            raise KeyAlreadyRotated(record.id, record.replaced_by)
        if refused or not record.is_active():
            raise KeyNotFound(
                f"key {record.id!r} of owner {owner!r} is not active; nothing to rotate"
            )

    async def _mint(self, prefix: str, **fields: Any) -> CreatedKey:
        """A new secret and its key record, not yet stored; argon2 runs off the event loop."""
        plaintext, parsed = generate_key(prefix)
        secret_hash = await anyio.to_thread.run_sync(self.hasher.hash, parsed.secret)
        record = KeyRecord(
            id=parsed.key_id, prefix=parsed.prefix, secret_hash=secret_hash, **fields
        )
        return CreatedKey(plaintext, record)

    async def _as_stored(self, new: CreatedKey) -> CreatedKey:
        """``new`` with its record as the store keeps it (defaults and rounding applied)."""
        stored = await self.store.get(new.id)
        return CreatedKey(new.key, stored or new.record)
