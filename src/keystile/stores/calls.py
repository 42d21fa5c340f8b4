"""The calls a store implements in one transaction, each as one value: its arguments,
and the rules the store applies to them (the check before the write, the key as
written, the events it records). ``CommonStore`` builds them; the stores' hooks take them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import KeyLimitReached, KeyManagementError
from .records import KeyEvent, KeyRecord
from .rules import (
    Spend,
    check_name_free,
    duplicate_name,
    imported_events,
    insert_events,
    is_stale,
    names_matter,
    reap_events,
    revoked_error,
    rotate_events,
    split_uses,
    successor_of,
    update_action,
)

__all__ = [
    "Change",
    "EventQuery",
    "Importing",
    "Insertion",
    "Reaping",
    "Rotation",
    "Touching",
    "UsageQuery",
]


@dataclass(frozen=True, slots=True)
class Insertion:
    """An ``insert`` call: ``record``, replacing the keys holding its name if ``replace``."""

    record: KeyRecord
    replace: bool
    actor: str
    #: The most live keys (``holds_name``) the owner may hold with this one, or ``None``.
    max_keys: int | None = None

    def check(self, holders: Sequence[str]) -> None:
        """Refuse while keys ``holders`` hold the name, unless they are to be replaced."""
        check_name_free(self.record, holders, self.replace)

    def check_room(self, live: int, holders: Sequence[str]) -> None:
        """Refuse a key past ``max_keys``: ``live`` keys held, ``holders`` of them replaced.
        Counted in the insert's transaction, so concurrent inserts cannot pass it."""
        if self.max_keys is not None and live - len(holders) >= self.max_keys:
            raise KeyLimitReached(self.record.owner, self.max_keys)

    def new_key(self, replaced: Sequence[str]) -> KeyRecord:
        """The key as inserted: it ``replaces`` the newest key it replaced, if any."""
        return successor_of(self.record, replaced)

    def events(self, inserted: KeyRecord, replaced: Sequence[str], at: datetime) -> list[KeyEvent]:
        return insert_events(inserted, replaced, at, self.actor)


@dataclass(frozen=True, slots=True)
class Importing:
    """An ``import_keys`` call: ``records`` to insert where their id is free, each with
    its ``imported`` event (``details`` by key id: where it came from)."""

    records: Sequence[KeyRecord]
    details: Mapping[str, Mapping[str, Any]]
    actor: str

    def events(self, inserted: Sequence[KeyRecord], at: datetime) -> list[KeyEvent]:
        return imported_events(inserted, self.details, at, self.actor)


@dataclass(frozen=True, slots=True)
class Rotation:
    """A ``rotate`` call: ``successor`` replaces ``owner``'s key ``key_id``."""

    key_id: str
    owner: str
    successor: KeyRecord
    grace_until: datetime
    actor: str

    def new_key(self) -> KeyRecord:
        """The successor as inserted: it ``replaces`` the rotated key."""
        return dataclasses.replace(self.successor, replaces=self.key_id)

    def events(self, old: KeyRecord, at: datetime) -> list[KeyEvent]:
        """``old``, as the rotation left it, ``rotated``; its successor ``created``."""
        return rotate_events(old, self.new_key(), at, self.actor)


@dataclass(frozen=True, slots=True)
class Reaping:
    """A ``reap`` call: which keys it takes (``is_stale``) and what it records."""

    unused_since: datetime
    at: datetime
    dry_run: bool
    include_disabled: bool
    actor: str

    def is_stale(self, record: KeyRecord) -> bool:
        return is_stale(record, self.unused_since, self.at, self.include_disabled)

    def events(self, stale: Sequence[KeyRecord]) -> list[KeyEvent]:
        return reap_events(stale, self.unused_since, self.at, self.actor)


@dataclass(frozen=True, slots=True)
class Change:
    """An ``update`` call, checked (``check_updatable``): ``fields`` maps each field to
    set to its new value; never empty (an empty change writes nothing)."""

    key_id: str
    owner: str
    fields: Mapping[str, Any]
    at: datetime
    actor: str
    detail: Mapping[str, Any]

    @property
    def names_matter(self) -> bool:
        """Whether the change can make the key take a name another key holds."""
        return names_matter(self.fields)

    def revoked(self) -> KeyManagementError:
        """What the change raises when the key turns out to be revoked."""
        return revoked_error(self.key_id, self.owner)

    def duplicate(self, name: str) -> KeyManagementError:
        """What it raises when the key would take ``name`` while another key holds it."""
        return duplicate_name(self.owner, name)

    def event(self) -> KeyEvent:
        """The audit event it records: ``updated``, ``disabled`` or ``enabled``."""
        action = update_action(self.fields)
        return KeyEvent(self.at, self.key_id, self.owner, action, self.actor, self.detail)


@dataclass(frozen=True, slots=True)
class Touching:
    """A ``touch_many`` call: the latest use of each key, and the uses to take from each
    budget (empty: none), named ``batch`` so a replay takes nothing twice (``None``: not
    named, always taken)."""

    touches: Mapping[str, datetime]
    uses: Mapping[str, int]
    batch: str | None

    def spends(self, now: datetime) -> tuple[list[Spend], list[Spend]]:
        """The uses as ``(budget, at, n)`` for keys' budgets and ``(owner, at, n)`` for
        owners' (``split_uses``)."""
        return split_uses(self.uses, self.touches, now)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A ``usage`` call: ``owner``'s key's counts (``key_id=None``: all its keys') in
    buckets of ``bucket_seconds``."""

    key_id: str | None
    owner: str
    since: datetime
    until: datetime | None
    bucket_seconds: int


@dataclass(frozen=True, slots=True)
class EventQuery:
    """A ``list_events`` call: the filters given, and ``limit`` (``None``: all)."""

    owner: str | None
    key_id: str | None
    since: datetime | None
    limit: int | None

    def filters(self) -> list[tuple[str, str, Any]]:
        """``(column, operator, value)`` of each filter given, for a ``WHERE``."""
        given = (("owner", "=", self.owner), ("key_id", "=", self.key_id))
        return [f for f in (*given, ("at", ">=", self.since)) if f[2] is not None]

    def matches(self, event: KeyEvent) -> bool:
        return (
            (self.owner is None or event.owner == self.owner)
            and (self.key_id is None or event.key_id == self.key_id)
            and (self.since is None or event.at >= self.since)
        )
