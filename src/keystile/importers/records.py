"""From another library's keys to keystile records: the rules an import keeps, written once.

A source (``drf_api_key``, ``keygate``, ``keyshield``, ``files``) reads its keys into
``SourceKey`` values; :func:`import_keys` turns them into records and writes them in one
transaction (``KeyStore.import_keys``), each with an ``imported`` audit event:

* the record id is ``<tag>.<public part>`` (``keystile.legacy.formats``), so the
  middleware finds the key from its string, and a second import of the same source
  finds every key already there and changes nothing (``exists``);
* the hash is kept as the source stored it, with its algorithm (``legacy.schemes``);
  an unknown algorithm or a malformed hash skips the key (``unknown_algorithm``,
  ``invalid_hash``), never stores something no middleware could check;
* the owner is ``--owner``, else the source's own owner, else (``--owner-from name``)
  the key's name; a key without one is skipped (``no_owner``);
* keystile's one-name rule holds: a key whose name another key of its owner holds is
  renamed ``<name> (<public part>)``, and a name keystile cannot take (control
  characters, too long) becomes ``imported <public part>``; both are counted as renamed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..errors import KeyManagementError
from ..legacy.formats import LegacyFormat
from ..legacy.schemes import UnsupportedHash, check_hash
from ..stores.protocol import KeyStore
from ..stores.records import KeyRecord, utcnow
from ..stores.rules import SYSTEM_ACTOR, imported_hash
from ..validation import (
    MAX_NAME_LENGTH,
    validate_name,
    validate_owner,
    validate_rate_limit,
    validate_scopes,
)

__all__ = ["ImportReport", "Skipped", "SourceKey", "import_keys", "keys_of"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SourceKey:
    """One key as its source library holds it. ``source_id`` names it in messages and the
    audit log (never the hash); ``public`` is the part of the key string that finds it."""

    source_id: str
    public: str
    algorithm: str
    hash: str = field(repr=False)
    name: str | None = None
    owner: str | None = None
    scopes: tuple[str, ...] = ()
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    disabled: bool = False
    rate_limit: str | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A row a source could not read as a key, and why (``invalid_row``, …)."""

    reason: str


def keys_of(
    rows: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], SourceKey]
) -> list[SourceKey | Skipped]:
    """``key`` of each row, or ``Skipped("invalid_row")`` for a row it cannot read (a bad
    time, a value of the wrong type: ``ValueError`` or ``TypeError``)."""
    keys: list[SourceKey | Skipped] = []
    for row in rows:
        try:
            keys.append(key(row))
        except (ValueError, TypeError):
            keys.append(Skipped("invalid_row"))
    return keys


@dataclass(slots=True)
class ImportReport:
    """What an import did (or, with ``dry_run``, would do): the keys it wrote, and how
    many it skipped or renamed, by reason."""

    source: str
    dry_run: bool
    read: int = 0
    key_ids: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    renamed: Counter[str] = field(default_factory=Counter)

    @property
    def imported(self) -> int:
        return len(self.key_ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``keystile import … --json``)."""
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "read": self.read,
            "imported": self.imported,
            "skipped": dict(sorted(self.skipped.items())),
            "renamed": dict(sorted(self.renamed.items())),
            "key_ids": list(self.key_ids),
        }


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def import_keys(
    store: KeyStore,
    keys: Sequence[SourceKey | Skipped],
    *,
    source: str,
    key_format: LegacyFormat,
    owner: str | None = None,
    owner_from_name: bool = False,
    actor: str = SYSTEM_ACTOR,
    dry_run: bool = False,
) -> ImportReport:
    """Write ``keys`` into ``store`` as keystile records (see the module docstring), in
    one transaction; with ``dry_run``, write nothing and report what would be written."""
    report = ImportReport(source, dry_run, read=len(keys))
    now = utcnow()
    fresh: dict[str, tuple[KeyRecord, dict[str, Any]]] = {}
    for key in keys:
        try:
            if isinstance(key, Skipped):
                raise _Skip(key.reason)
            record, detail = _record(key, source, key_format, owner, owner_from_name, now, report)
            if record.id in fresh:
                raise _Skip("duplicate")
            fresh[record.id] = (record, detail)
        except _Skip as skip:
            report.skipped[skip.reason] += 1
    existing = await store.get_many(list(fresh))
    report.skipped["exists"] += len(existing)
    records = await _named(
        store, [r for r, _ in fresh.values() if r.id not in existing], now, report
    )
    if dry_run:
        report.key_ids = [r.id for r in records]
    elif records:
        details = {r.id: fresh[r.id][1] for r in records}
        report.key_ids = await store.import_keys(records, details=details, actor=actor)
        report.skipped["exists"] += len(records) - report.imported
    report.skipped = +report.skipped
    return report


def _record(
    key: SourceKey,
    source: str,
    key_format: LegacyFormat,
    owner: str | None,
    owner_from_name: bool,
    now: datetime,
    report: ImportReport,
) -> tuple[KeyRecord, dict[str, Any]]:
    """The keystile record of ``key`` and its event's detail, or ``_Skip`` saying why not."""
    try:
        stored = check_hash(key.algorithm, key.hash)
    except UnsupportedHash as exc:
        raise _Skip(exc.reason) from None
    try:
        key_id = key_format.record_id(key.public)
    except ValueError:
        raise _Skip("invalid_id") from None
    whose = owner or (key.name if owner_from_name else key.owner)
    if whose is None:
        raise _Skip("no_owner")
    whose = _checked(validate_owner, whose, "invalid_owner")
    scopes = _checked(validate_scopes, key.scopes, "invalid_scopes")
    rate_limit = _checked(validate_rate_limit, key.rate_limit, "invalid_limit")
    name = _fallback_name(key.public)
    if key.name is not None:
        try:
            name = validate_name(key.name)
        except KeyManagementError:
            report.renamed["invalid_name"] += 1
    record = KeyRecord(
        id=key_id,
        owner=whose,
        name=name,
        prefix=key_format.tag,
        secret_hash=imported_hash(key.algorithm, stored),
        scopes=scopes,
        metadata={"imported_from": source, "source_id": key.source_id},
        created_at=key.created_at or now,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        disabled_at=now if key.disabled else None,
        rate_limit=rate_limit,
    )
    return record, {"source": source, "source_id": key.source_id, "algorithm": key.algorithm}


def _checked(check: Callable[[Any], T], value: Any, reason: str) -> T:
    try:
        return check(value)
    except KeyManagementError:
        raise _Skip(reason) from None


def _fallback_name(public: str) -> str:
    return f"imported {public}"


async def _named(
    store: KeyStore, records: list[KeyRecord], now: datetime, report: ImportReport
) -> list[KeyRecord]:
    """``records`` with the names keystile's one-name rule lets them hold: a key whose
    name another key of its owner holds (in the store, or earlier in the import) is
    renamed ``<name> (<public part>)``."""
    held: set[tuple[str, str]] = set()
    for owner in {r.owner for r in records}:
        held.update((owner, k.name) for k in await store.list_keys(owner) if k.holds_name(now))
    named = []
    for record in records:
        if record.holds_name(now):
            if (record.owner, record.name) in held:
                public = record.id.partition(".")[2]
                name = f"{record.name[: MAX_NAME_LENGTH - len(public) - 3]} ({public})"
                record = dataclasses.replace(record, name=name)
                report.renamed["duplicate_name"] += 1
            held.add((record.owner, record.name))
        named.append(record)
    return named
