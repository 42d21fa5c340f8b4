"""The SQL both SQL stores share: the columns and how each kind of value is stored, the
rules of ``rules.py`` as predicates, and the statements whose text the dialects agree on.

Shared statements are written with Postgres' numbered parameters (``$1``); a
``Dialect`` renders them for its database (SQLite numbers them ``?1``, which lets a
parameter appear twice), and converts values to and from the columns.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol

from .calls import EventQuery
from .records import KeyEvent, KeyRecord, OwnerLimits

__all__ = [
    "COLUMNS",
    "EVENT_COLUMNS",
    "HOLDS_NAME",
    "KEY_COLUMNS",
    "OWNER_COLUMNS",
    "ROTATABLE",
    "STALE",
    "Dialect",
    "Kind",
    "Row",
    "Statements",
    "read",
    "touch_assignments",
]

#: How a column's values are stored; a ``Dialect`` converts each kind its own way.
Kind = Literal["text", "int", "time", "period", "strings", "json", "owner"]
Convert = Callable[[Any], Any]

#: The key table's columns, in ``KeyRecord``'s field order.
KEY_COLUMNS: dict[str, Kind] = {
    "id": "text",
    "owner": "text",
    "name": "text",
    "prefix": "text",
    "secret_hash": "text",
    "scopes": "strings",
    "metadata": "json",
    "created_at": "time",
    "expires_at": "time",
    "last_used_at": "time",
    "revoked_at": "time",
    "replaces": "text",
    "replaced_by": "text",
    "rate_limit": "text",
    "quota": "int",
    "quota_remaining": "int",
    "quota_refill": "period",
    "quota_reset_at": "time",
    "disabled_at": "time",
    "ip_allowlist": "strings",
    "budget_id": "text",
    "rate_limits": "json",
    "owner_limits": "owner",
}
COLUMNS = ", ".join(KEY_COLUMNS)
#: The owner-limits table: the limits as copied onto the owner's keys, and the quota's
#: columns (named as a key's, so a flush spends from both with one ``SET`` list).
OWNER_COLUMNS: dict[str, Kind] = {
    "owner": "text",
    "limits": "owner",
    "quota": "int",
    "quota_remaining": "int",
    "quota_refill": "period",
    "quota_reset_at": "time",
    "updated_at": "time",
}
#: The event table's columns but its sequence number (``Dialect.seq`` names that).
EVENT_COLUMNS: dict[str, Kind] = {
    "at": "time",
    "key_id": "text",
    "owner": "text",
    "action": "text",
    "actor": "text",
    "detail": "json",
}

#: ``KeyRecord.holds_name`` at ``{now}``: neither revoked nor expired.
HOLDS_NAME = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > {now})"
#: ``rules.rotatable`` at ``{now}``: active (holds its name, not disabled), no successor.
ROTATABLE = HOLDS_NAME + " AND disabled_at IS NULL AND replaced_by IS NULL"
#: ``rules.is_stale``: what the reaper takes.
STALE = (
    "revoked_at IS NULL AND ({include_disabled} OR disabled_at IS NULL)"
    " AND (COALESCE(last_used_at, created_at) < {unused_since}"
    " OR (expires_at IS NOT NULL AND expires_at <= {at}))"
)
#: ``rules.apply_uses`` for one row (``{k}`` qualifies its columns): a refill due by the
#: use time ``{at}`` sets the quota back to full at the period's start, then the ``{n}``
#: uses are taken, never below 0; ``last_used_at`` never goes backwards. Every
#: right-hand side reads the row as it was before the UPDATE. The dialect supplies the
#: time arithmetic: ``{refill_due}`` (a refill period has passed since
#: ``quota_reset_at``) and ``{periods}`` (how many whole ones).
_LAST_USED = "last_used_at = {greatest}(COALESCE({k}last_used_at, {at}), {at}), "
_TOUCH = (
    "quota_reset_at = CASE WHEN {due} THEN {k}quota_reset_at + {k}quota_refill * {periods}"
    " ELSE {k}quota_reset_at END,"
    " quota_remaining = CASE WHEN {k}quota IS NULL THEN {k}quota_remaining"
    " WHEN {due} THEN {greatest}({k}quota - {n}, 0)"
    " ELSE {greatest}(COALESCE({k}quota_remaining, {k}quota) - {n}, 0) END"
)
_DUE = "{k}quota IS NOT NULL AND {k}quota_refill > {zero} AND {k}quota_reset_at IS NOT NULL"


class Row(Protocol):
    """A fetched row, read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def touch_assignments(
    dialect: Dialect,
    *,
    k: str,
    at: str,
    n: str,
    zero: str,
    refill_due: str,
    periods: str,
    last_used: bool = True,
) -> str:
    """The ``SET`` list of a usage write (``_TOUCH``) in ``dialect``'s arithmetic; without
    ``last_used``, the quota's part alone (uses taken from a budget, not a key's touch)."""
    due = _DUE.format(k=k, zero=zero) + f" AND {refill_due}"
    fields = {"k": k, "at": at, "n": n, "due": due, "periods": periods}
    template = _LAST_USED + _TOUCH if last_used else _TOUCH
    return template.format(greatest=dialect.greatest, **fields)


@dataclass(frozen=True)
class Dialect:
    """How one database takes the shared SQL and stores each kind of value.

    ``numbered`` is its parameter form (``N`` for the number); ``encoders``/``decoders``
    convert a kind to and from its column (a kind without one is stored as Python holds
    it; ``None`` always passes as NULL); ``casts`` are the SQL types parameters are cast
    to (Postgres); ``seq`` is the event table's sequence column."""

    numbered: str
    seq: str
    greatest: str
    least: str
    encoders: Mapping[Kind, Convert]
    decoders: Mapping[Kind, Convert]
    casts: Mapping[Kind, str] = field(default_factory=dict)

    def render(self, template: str) -> str:
        """``template``'s ``$n`` parameters in this dialect's form."""
        return re.sub(r"\$(\d+)", self.numbered.replace("N", r"\1"), template)

    def param(self, n: int, kind: Kind) -> str:
        """Parameter ``n``, cast to the type of a ``kind`` column where the dialect casts."""
        cast = self.casts.get(kind)
        return self.render(f"${n}") + (f"::{cast}" if cast else "")

    def encode(self, kind: Kind, value: Any) -> Any:
        encoder = self.encoders.get(kind)
        return value if encoder is None or value is None else encoder(value)

    def decode(self, kind: Kind, value: Any) -> Any:
        decoder = self.decoders.get(kind)
        return value if decoder is None or value is None else decoder(value)

    def field(self, name: str, value: Any) -> Any:
        """A new value of the key column ``name``, as the column takes it."""
        return self.encode(KEY_COLUMNS[name], value)

    def insert(self, table: str, columns: Mapping[str, Kind]) -> str:
        """``INSERT`` of one row of ``columns``, parameters 1…n in their order."""
        marks = (self.param(i, kind) for i, kind in enumerate(columns.values(), 1))
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})"  # noqa: S608

    def values(self, columns: Mapping[str, Kind], item: Any) -> list[Any]:
        """``item``'s attributes named by ``columns``, as the columns take them."""
        return [self.encode(kind, getattr(item, name)) for name, kind in columns.items()]

    def readers(self, columns: Mapping[str, Kind]) -> list[tuple[str, Convert | None]]:
        """What ``read`` takes to decode a row of ``columns``."""
        return [(name, self.decoders.get(kind)) for name, kind in columns.items()]

    def key_values(self, record: KeyRecord) -> list[Any]:
        return self.values(KEY_COLUMNS, record)

    def event_values(self, event: KeyEvent) -> list[Any]:
        return self.values(EVENT_COLUMNS, event)

    @cached_property
    def _key_readers(self) -> list[tuple[str, Convert | None]]:
        return self.readers(KEY_COLUMNS)

    @cached_property
    def _event_readers(self) -> list[tuple[str, Convert | None]]:
        return [*self.readers(EVENT_COLUMNS), (self.seq, None)]

    def record(self, row: Row) -> KeyRecord:
        """The key of a row of ``COLUMNS`` (the columns are ``KeyRecord``'s fields, in order)."""
        return KeyRecord(*read(row, self._key_readers))

    def event(self, row: Row) -> KeyEvent:
        """The event of a row of ``EVENT_COLUMNS`` and ``seq`` (``KeyEvent``'s fields)."""
        return KeyEvent(*read(row, self._event_readers))


class Statements:
    """The statements both SQL stores run, rendered for one dialect; ``prefix`` qualifies
    the tables (Postgres: the quoted schema and a dot)."""

    def __init__(self, dialect: Dialect, prefix: str = "") -> None:
        self.dialect = dialect
        self.keys = keys = f"{prefix}keystile_keys"
        self.events = events = f"{prefix}keystile_events"
        self.usage = f"{prefix}keystile_usage"
        self.batches = f"{prefix}keystile_quota_batches"
        self.owners = owners = f"{prefix}keystile_owner_limits"
        r = dialect.render
        select = f"SELECT {COLUMNS} FROM {keys}"  # noqa: S608
        self.get = r(f"{select} WHERE id = $1")
        self.get_owned = r(f"{select} WHERE id = $1 AND owner = $2")
        self.list_keys = r(f"{select} WHERE owner = $1 ORDER BY created_at, id")
        self.list_all = f"{select} ORDER BY owner, created_at, id"
        #: The keys holding a name (``insert``), oldest first.
        self.name_holders = r(
            f"SELECT id FROM {keys} WHERE owner = $1 AND name = $2"  # noqa: S608
            f" AND {HOLDS_NAME.format(now='$3')} ORDER BY created_at, id"
        )
        #: How many keys of an owner hold their names (``insert`` with ``max_keys``).
        self.live_count = r(
            f"SELECT count(*) FROM {keys} WHERE owner = $1"  # noqa: S608
            f" AND {HOLDS_NAME.format(now='$2')}"
        )
        #: Whether a key other than ``$3`` holds a name (``update``).
        self.other_holder = r(
            f"SELECT 1 FROM {keys} WHERE owner = $1 AND name = $2 AND id <> $3"  # noqa: S608
            f" AND {HOLDS_NAME.format(now='$4')}"
        )
        self.revoke = r(
            f"UPDATE {keys} SET revoked_at = $1"  # noqa: S608
            " WHERE id = $2 AND owner = $3 AND revoked_at IS NULL"
        )
        #: The old key's side of a rotation: successor, and expiry cut to the grace end.
        self.rotate = r(
            f"UPDATE {keys} SET replaced_by = $1,"  # noqa: S608
            f" expires_at = {dialect.least}(COALESCE(expires_at, $2), $2)"
            f" WHERE id = $3 AND owner = $4 AND {ROTATABLE.format(now='$5')}"
        )
        stale = STALE.format(include_disabled="$1", unused_since="$2", at="$3")
        self.stale = r(f"{select} WHERE {stale} ORDER BY created_at, id")
        self.insert_key = dialect.insert(keys, KEY_COLUMNS)
        #: An imported key, unless its id is taken; returns its id when inserted.
        self.insert_new_key = self.insert_key + " ON CONFLICT (id) DO NOTHING RETURNING id"
        self.insert_event = dialect.insert(events, EVENT_COLUMNS)
        self.prune_events = r(f"DELETE FROM {events} WHERE at < $1")  # noqa: S608
        self.set_hash = r(f"UPDATE {keys} SET secret_hash = $1 WHERE id = $2")  # noqa: S608
        #: A new hash while the stored one is still ``$3``; returns the key's owner.
        self.replace_hash = r(
            f"UPDATE {keys} SET secret_hash = $1"  # noqa: S608
            " WHERE id = $2 AND secret_hash = $3 RETURNING owner"
        )
        #: A new key takes its owner's limits (insert and rotate, in their transaction).
        self.adopt_owner_limits = r(
            f"UPDATE {keys} SET owner_limits = (SELECT limits FROM {owners}"  # noqa: S608
            " WHERE owner = $2) WHERE id = $1"
        )
        #: The owner's limits copied onto every key of the owner: ``(limits, owner)``.
        self.share_owner_limits = r(
            f"UPDATE {keys} SET owner_limits = {dialect.param(1, 'owner')}"  # noqa: S608
            " WHERE owner = $2"
        )
        self.owner_keys = r(f"SELECT id FROM {keys} WHERE owner = $1")  # noqa: S608
        self.get_owner_limits = r(
            f"SELECT limits, quota_remaining, quota_reset_at FROM {owners}"  # noqa: S608
            " WHERE owner = $1"
        )
        self.delete_owner_limits = r(f"DELETE FROM {owners} WHERE owner = $1")  # noqa: S608
        owner_values = ", ".join(
            dialect.param(i, kind) for i, kind in enumerate(OWNER_COLUMNS.values(), 1)
        )
        updates = ", ".join(f"{c} = excluded.{c}" for c in OWNER_COLUMNS if c != "owner")
        self.put_owner_limits = (
            f"INSERT INTO {owners} ({', '.join(OWNER_COLUMNS)}) VALUES ({owner_values})"  # noqa: S608
            f" ON CONFLICT (owner) DO UPDATE SET {updates}"
        )

    def owner_values(self, limits: OwnerLimits) -> list[Any]:
        """The owner table's row of ``limits`` (``OWNER_COLUMNS``)."""
        d = self.dialect
        values = {**{name: getattr(limits, name, None) for name in OWNER_COLUMNS}, "limits": limits}
        return [d.encode(kind, values[name]) for name, kind in OWNER_COLUMNS.items()]

    def owner_limits(self, row: Row) -> OwnerLimits:
        """An owner's limits from ``get_owner_limits``'s row: as set, with the quota's
        count as the flushes left it."""
        d = self.dialect
        limits: OwnerLimits = d.decode("owner", row["limits"])
        return dataclasses.replace(
            limits,
            quota_remaining=row["quota_remaining"],
            quota_reset_at=d.decode("time", row["quota_reset_at"]),
        )

    def update_key(self, fields: Sequence[str]) -> str:
        """``UPDATE`` of ``fields`` (parameters 1…n) of the unrevoked key with the id and
        owner of parameters n+1 and n+2."""
        d = self.dialect
        sets = ", ".join(f"{f} = {d.param(i, KEY_COLUMNS[f])}" for i, f in enumerate(fields, 1))
        n = len(fields)
        return d.render(
            f"UPDATE {self.keys} SET {sets}"  # noqa: S608
            f" WHERE id = ${n + 1} AND owner = ${n + 2} AND revoked_at IS NULL"
        )

    def select_events(self, query: EventQuery) -> tuple[str, list[Any]]:
        """The newest events matching ``query``, newest first, and the parameters."""
        d = self.dialect
        params: list[Any] = []
        where: list[str] = []
        for column, operator, value in query.filters():
            params.append(d.encode(EVENT_COLUMNS[column], value))
            where.append(f"{column} {operator} {d.render(f'${len(params)}')}")
        sql = f"SELECT {d.seq}, {', '.join(EVENT_COLUMNS)} FROM {self.events}"  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY at DESC, {d.seq} DESC"
        if query.limit is not None:
            params.append(query.limit)
            sql += " LIMIT " + d.render(f"${len(params)}")
        return sql, params


def read(row: Row, readers: list[tuple[str, Convert | None]]) -> list[Any]:
    """The row's values, decoded: run for every key a store reads, so kept lean."""
    values = [row[name] for name, _ in readers]
    for i, (_, decode) in enumerate(readers):
        if decode is not None and values[i] is not None:
            values[i] = decode(values[i])
    return values
