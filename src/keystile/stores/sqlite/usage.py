"""The SQLite store's usage: ``last_used_at`` and quotas in one transaction per flush,
and per-minute counts summed into buckets."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from ..calls import Touching, UsageQuery
from ..records import QuotaState, UsageBucket, UsageCounts, UsageTotal, utcnow
from ..rules import BATCH_MEMORY, budget_states
from ..sql import touch_assignments
from .connection import Connection, select_in
from .schema import SQLITE, transaction

__all__ = ["Usage"]


def _assignments(*, last_used: bool) -> str:
    """A usage write's ``SET`` list in SQLite's arithmetic: parameters ``(at, n, …)``."""
    return touch_assignments(
        SQLITE,
        k="",
        at="$1",
        n="$2",
        zero="0",
        refill_due="$1 - quota_reset_at >= quota_refill",
        periods="CAST(($1 - quota_reset_at) / quota_refill AS INTEGER)",
        last_used=last_used,
    )


#: One key's touch: parameters ``(at, 0, id)``, the time in UTC seconds.
_TOUCH = SQLITE.render(
    f"UPDATE keystile_keys SET {_assignments(last_used=True)} WHERE id = $3"  # noqa: S608
)
#: One budget's uses, taken from every key of it: parameters ``(at, uses, budget_id)``.
_SPEND = SQLITE.render(
    f"UPDATE keystile_keys SET {_assignments(last_used=False)} WHERE budget_id = $3"  # noqa: S608
)
#: One owner's uses: parameters ``(at, uses, owner)``.
_OWNER_SPEND = SQLITE.render(
    f"UPDATE keystile_owner_limits SET {_assignments(last_used=False)} WHERE owner = $3"  # noqa: S608
)
_OWNER_QUOTAS = (
    "SELECT owner, quota_remaining, quota_reset_at FROM keystile_owner_limits"
    " WHERE owner IN ({marks}) AND quota IS NOT NULL"
)
_BUDGETS_OF = "SELECT DISTINCT budget_id FROM keystile_keys WHERE id IN ({marks})"
_QUOTAS = (
    "SELECT budget_id, created_at, quota_remaining, quota_reset_at FROM keystile_keys"
    " WHERE budget_id IN ({marks}) AND quota IS NOT NULL"
)
_BATCH = "INSERT INTO keystile_quota_batches VALUES (?, ?) ON CONFLICT (batch) DO NOTHING"
_FORGET_BATCHES = "DELETE FROM keystile_quota_batches WHERE at < ?"
#: One row per (key, minute), added to by every process's flush.
_USAGE_UPSERT = (
    "INSERT INTO keystile_usage (key_id, minute, requests, rejected) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (key_id, minute) DO UPDATE SET requests = requests + excluded.requests,"
    " rejected = rejected + excluded.rejected"
)
_BUCKETS = (
    "SELECT (u.minute / :step) * :step AS start, SUM(u.requests), SUM(u.rejected)"
    " FROM keystile_usage AS u JOIN keystile_keys AS k ON k.id = u.key_id"
    " WHERE (:key IS NULL OR u.key_id = :key) AND k.owner = :owner"
    " AND u.minute >= :since AND u.minute < :until"
    " GROUP BY start ORDER BY start"
)
_TOP = (
    "SELECT u.key_id, k.name, SUM(u.requests) AS r, SUM(u.rejected) AS j"
    " FROM keystile_usage AS u JOIN keystile_keys AS k ON k.id = u.key_id"
    " WHERE k.owner = ? AND u.minute >= ? AND u.minute < ?"
    " GROUP BY u.key_id, k.name ORDER BY r DESC, j DESC, u.key_id LIMIT ?"
)
_PRUNE = (
    "DELETE FROM keystile_usage WHERE rowid IN (SELECT rowid FROM"
    " keystile_usage WHERE minute < ? LIMIT ?)"
)
#: Past any minute a store will hold: the open end of a period without ``until``.
_NO_END = 2**62


def _fresh(conn: sqlite3.Connection, batch: str | None, now: datetime) -> bool:
    """Whether the uses of ``batch`` were not taken yet (now they are, in this
    transaction); an unnamed batch always is."""
    if batch is None:
        return True
    conn.execute(_FORGET_BATCHES, ((now - BATCH_MEMORY).timestamp(),))
    return bool(conn.execute(_BATCH, (batch, now.timestamp())).rowcount)


def _minute(value: datetime | None) -> int:
    return int(value.timestamp()) if value is not None else _NO_END


class Usage(Connection):
    """The usage part of ``SQLiteKeyStore``."""

    async def _touch_many(self, touching: Touching) -> dict[str, QuotaState]:
        rows = [(at.timestamp(), 0, k) for k, at in touching.touches.items()]
        now = utcnow()
        spent, owners = touching.spends(now)
        ids = list(touching.touches)

        def touch(conn: sqlite3.Connection) -> dict[str, QuotaState]:
            with transaction(conn):
                conn.executemany(_TOUCH, rows)
                budgets = {row[0] for row in select_in(conn, _BUDGETS_OF, ids)}
                if (spent or owners) and _fresh(conn, touching.batch, now):
                    conn.executemany(_SPEND, [(at.timestamp(), n, b) for b, at, n in spent])
                    conn.executemany(_OWNER_SPEND, [(at.timestamp(), n, o) for o, at, n in owners])
                budgets.update(b for b, _, _ in spent)
                states = budget_states(
                    (r[0], SQLITE.decode("time", r[1]), r[2], SQLITE.decode("time", r[3]))
                    for r in select_in(conn, _QUOTAS, list(budgets))
                )
                for r in select_in(conn, _OWNER_QUOTAS, [o for o, _, _ in owners]):
                    states[f"owner:{r[0]}"] = QuotaState(r[1], SQLITE.decode("time", r[2]))
                return states

        return await self._run(touch)

    async def add_usage(self, counts: UsageCounts) -> None:
        rows = [
            (key_id, int(minute.timestamp()), requests, rejected)
            for (key_id, minute), (requests, rejected) in counts.items()
        ]
        if not rows:
            return

        def add(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(_USAGE_UPSERT, rows)

        await self._run(add)

    async def _buckets(self, query: UsageQuery) -> list[UsageBucket]:
        params = {
            "step": query.bucket_seconds,
            "key": query.key_id,
            "owner": query.owner,
            "since": _minute(query.since),
            "until": _minute(query.until),
        }
        rows = await self._run(lambda conn: conn.execute(_BUCKETS, params).fetchall())
        return [UsageBucket(datetime.fromtimestamp(r[0], timezone.utc), r[1], r[2]) for r in rows]

    async def top_usage(
        self, owner: str, *, since: datetime, until: datetime | None, limit: int
    ) -> list[UsageTotal]:
        params = (owner, _minute(since), _minute(until), limit)
        rows = await self._run(lambda conn: conn.execute(_TOP, params).fetchall())
        return [UsageTotal(row[0], row[1], row[2], row[3]) for row in rows]

    async def prune_usage(self, *, before: datetime, limit: int) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                pruned: int = conn.execute(_PRUNE, (_minute(before), limit)).rowcount
                return pruned

        return await self._run(prune)
