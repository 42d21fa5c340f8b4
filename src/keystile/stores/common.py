"""What every store does the same way around its own transactions, written once.

``CommonStore`` carries the public signatures of the calls that change keys (and of the
two queries with many filters), checks the rules before a change and tells the
in-process bus after it commits. A store supplies the ``_``-hooks, each one transaction
taking the call as one value from ``calls.py``. The other protocol calls have nothing
to share and each store writes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from . import calls
from .bus import LocalChangeBus
from .protocol import ChangeListener
from .records import KeyEvent, KeyRecord, OwnerLimits, QuotaState, UsageBucket
from .rules import (
    SYSTEM_ACTOR,
    check_updatable,
    event_detail,
    owner_limits_event,
    revoked_error,
)

__all__ = ["CommonStore"]

T = TypeVar("T")


class CommonStore(ABC):
    """The shared half of a ``KeyStore`` (see the module docstring)."""

    _bus: LocalChangeBus

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        return self._bus.subscribe(listener)

    def _publish(self, key_ids: Iterable[str]) -> None:
        """Tell this process's listeners, once the change has committed."""
        for key_id in key_ids:
            self._bus.publish(key_id)

    def _published(self, key_id: str, outcome: T) -> T:
        """``outcome`` of a change to ``key_id``, after telling the listeners if it says the
        key changed (``True``, or the key as changed; ``False`` or ``None``: nothing)."""
        if outcome:
            self._bus.publish(key_id)
        return outcome

    async def insert(
        self,
        record: KeyRecord,
        *,
        replace: bool = False,
        actor: str = SYSTEM_ACTOR,
        max_keys: int | None = None,
    ) -> list[str]:
        replaced = await self._insert(calls.Insertion(record, replace, actor, max_keys))
        self._publish(replaced)
        return replaced

    async def import_keys(
        self,
        records: Sequence[KeyRecord],
        *,
        details: Mapping[str, Mapping[str, Any]],
        actor: str = SYSTEM_ACTOR,
    ) -> list[str]:
        return await self._import(calls.Importing(tuple(records), details, actor))

    async def revoke(
        self,
        key_id: str,
        owner: str,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
        action: str = "revoked",
    ) -> bool:
        event = KeyEvent(at, key_id, owner, action, actor)
        return self._published(key_id, await self._revoke(event))

    async def rotate(
        self,
        key_id: str,
        owner: str,
        successor: KeyRecord,
        *,
        grace_until: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        rotation = calls.Rotation(key_id, owner, successor, grace_until, actor)
        return self._published(key_id, await self._rotate(rotation))

    async def reap(
        self,
        *,
        unused_since: datetime,
        at: datetime,
        dry_run: bool,
        include_disabled: bool = False,
        actor: str = SYSTEM_ACTOR,
    ) -> list[KeyRecord]:
        stale = await self._reap(calls.Reaping(unused_since, at, dry_run, include_disabled, actor))
        if not dry_run:
            self._publish(r.id for r in stale)
        return stale

    async def update(
        self,
        key_id: str,
        owner: str,
        changes: Mapping[str, Any],
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> KeyRecord | None:
        check_updatable(changes)
        detail = event_detail(changes)
        if not changes:
            current = await self.get_owned(key_id, owner)
            if current is not None and current.revoked_at is not None:
                raise revoked_error(key_id, owner)
            return current
        change = calls.Change(key_id, owner, dict(changes), at, actor, detail)
        return self._published(key_id, await self._update(change))

    async def set_owner_limits(
        self,
        owner: str,
        limits: OwnerLimits | None,
        *,
        at: datetime,
        actor: str = SYSTEM_ACTOR,
    ) -> bool:
        event = owner_limits_event(owner, limits, at, actor)
        changed = await self._put_owner_limits(owner, limits, event)
        if changed is None:
            return False
        self._publish(changed)
        return True

    async def touch_many(
        self,
        touches: Mapping[str, datetime],
        uses: Mapping[str, int] | None = None,
        *,
        batch: str | None = None,
    ) -> dict[str, QuotaState]:
        return await self._touch_many(calls.Touching(touches, uses or {}, batch))

    async def usage(
        self,
        key_id: str | None,
        owner: str,
        *,
        since: datetime,
        until: datetime | None,
        bucket_seconds: int,
    ) -> list[UsageBucket]:
        return await self._buckets(calls.UsageQuery(key_id, owner, since, until, bucket_seconds))

    async def list_events(
        self,
        *,
        owner: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[KeyEvent]:
        """Oldest first; with ``limit``, the newest ``limit`` events."""
        bounded = limit if limit is not None and limit > 0 else None
        return await self._list_events(calls.EventQuery(owner, key_id, since, bounded))

    @abstractmethod
    async def get_owned(self, key_id: str, owner: str) -> KeyRecord | None: ...

    @abstractmethod
    async def _insert(self, insertion: calls.Insertion) -> list[str]:
        """Insert the key with its events, after revoking the keys holding its name if
        the insertion replaces them (else it refuses). Returns their ids."""

    @abstractmethod
    async def _import(self, importing: calls.Importing) -> list[str]:
        """Insert each key whose id is free, with its ``imported`` event, in one
        transaction; the ids inserted."""

    @abstractmethod
    async def _revoke(self, event: KeyEvent) -> bool:
        """Revoke ``event.owner``'s unrevoked key ``event.key_id`` and record ``event``."""

    @abstractmethod
    async def _rotate(self, rotation: calls.Rotation) -> KeyRecord | None: ...

    @abstractmethod
    async def _reap(self, reaping: calls.Reaping) -> list[KeyRecord]: ...

    @abstractmethod
    async def _update(self, change: calls.Change) -> KeyRecord | None:
        """Write ``change`` unless the key is revoked (``revoked_error``) or would take a
        name another key holds (``duplicate_name``); ``None``: no such key of the owner."""

    @abstractmethod
    async def _put_owner_limits(
        self, owner: str, limits: OwnerLimits | None, event: KeyEvent
    ) -> list[str] | None:
        """Set (or with ``None`` delete) ``owner``'s limits, copy them onto every key of
        the owner and record ``event``, in one transaction; the ids of the owner's keys
        (to evict), or ``None`` when there was nothing to delete (nothing written)."""

    @abstractmethod
    async def _touch_many(self, touching: calls.Touching) -> dict[str, QuotaState]:
        """Write the touches and take the uses, in one transaction (``KeyStore.touch_many``);
        the quota state of each budget touched or spent."""

    @abstractmethod
    async def _buckets(self, query: calls.UsageQuery) -> list[UsageBucket]: ...

    @abstractmethod
    async def _list_events(self, query: calls.EventQuery) -> list[KeyEvent]: ...
