"""What ``KeyManager`` does for an owner rather than one key: the limits every key of the
owner shares (named rate limits, a quota with its refill), and usage, per key or summed
over the owner's keys.

An owner's limits are copied onto each of its keys in the transaction that sets them, so
a verified key carries them, and every running process hears of the change as of a
revocation. Their quota is spent from one budget, ``owner:OWNER``, whatever key is used.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import datetime, timedelta

from .errors import KeyManagementError, KeyNotFound
from .stores.protocol import KeyStore
from .stores.records import OwnerLimits, UsageBucket, UsageTotal, utcnow
from .tokens import normalize_key_id
from .validation import (
    UsageGranularity,
    aware,
    owner_quota,
    since_moment,
    usage_seconds,
    usage_start,
    validate_limit,
    validate_owner,
    validate_rate_limits,
)

__all__ = ["OwnerOperations"]


class OwnerOperations:
    """The owner half of ``KeyManager`` (which supplies ``store`` and ``_actor``)."""

    store: KeyStore

    def _actor(self, actor: str | None) -> str:
        raise NotImplementedError

    async def set_owner_limits(
        self,
        owner: str,
        *,
        rate_limits: Mapping[str, str] | None = None,
        quota: int | None = None,
        quota_refill: timedelta | str | None = None,
        actor: str | None = None,
    ) -> OwnerLimits:
        """Give ``owner`` limits of its own, shared by all its keys (their own limits
        apply too; a request needs room in every one): named rate limits
        (``{"burst": "50/second", "sustained": "10000/hour"}``) and a ``quota`` of uses
        refilled every ``quota_refill`` (e.g. ``"30d"``), starting full now. Replaces
        what the owner had; reaches every running process as a revocation does."""
        owner = validate_owner(owner)
        named = validate_rate_limits(rate_limits)
        now = utcnow()
        quota_fields = owner_quota(quota, quota_refill, now)
        if not named and quota_fields["quota"] is None:
            raise KeyManagementError(
                "give rate_limits and/or a quota (clear_owner_limits removes an owner's limits)"
            )
        limits = OwnerLimits(owner, named, updated_at=now, **quota_fields)
        await self.store.set_owner_limits(owner, limits, at=now, actor=self._actor(actor))
        return limits

    async def owner_limits(self, owner: str) -> OwnerLimits | None:
        """``owner``'s own limits, with what is left of its quota (``None``: none)."""
        return await self.store.get_owner_limits(validate_owner(owner))

    async def clear_owner_limits(self, owner: str, *, actor: str | None = None) -> bool:
        """Remove ``owner``'s limits (its keys keep their own); ``False`` if it had none."""
        owner = validate_owner(owner)
        who = self._actor(actor)
        return await self.store.set_owner_limits(owner, None, at=utcnow(), actor=who)

    async def usage(
        self,
        key_id: str | None = None,
        *,
        owner: str,
        since: timedelta | datetime,
        until: datetime | None = None,
        by: UsageGranularity = "minute",
    ) -> builtins.list[UsageBucket]:
        """``owner``'s key's usage (by id or display form), or with ``key_id=None`` the
        owner's totals over all its keys: per ``by`` period (``minute``, ``hour`` or
        ``day``, UTC), the requests authenticated and the attempts refused (wrong secret,
        revoked, expired, disabled), oldest first, periods without any omitted. ``since``
        (a moment, or a ``timedelta`` back from now) is rounded down to the start of its
        period, so the first bucket is whole; ``until`` is exclusive. Counts reach the
        store with each process's flush (``flush_interval``). Another owner's key raises
        ``KeyNotFound``."""
        seconds = usage_seconds(by)
        owner = validate_owner(owner)
        if key_id is not None:
            key_id = normalize_key_id(key_id)
            if await self.store.get_owned(key_id, owner) is None:
                raise KeyNotFound(f"no key {key_id!r} for owner {owner!r}")
        start = usage_start(since, seconds, utcnow())
        until = None if until is None else aware(until, "until")
        return await self.store.usage(
            key_id, owner, since=start, until=until, bucket_seconds=seconds
        )

    async def top_keys(
        self, owner: str, *, since: timedelta | datetime, limit: int = 10
    ) -> builtins.list[UsageTotal]:
        """``owner``'s ``limit`` busiest keys since ``since`` (most requests first), with
        the attempts refused against each."""
        limit = validate_limit(limit)
        return await self.store.top_usage(
            owner, since=since_moment(since, utcnow()), until=None, limit=limit
        )
