"""The Postgres store's usage: ``last_used_at`` in one statement per flush (quota uses in
the same transaction, with the batch's name), per-minute counts upserted from
``unnest``, and their sums by bucket."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..calls import Touching, UsageQuery
from ..records import QuotaState, UsageBucket, UsageCounts, UsageTotal, utcnow
from ..rules import BATCH_MEMORY, budget_states
from ..sql import touch_assignments
from .connection import Connection
from .schema import POSTGRES

__all__ = ["Usage"]


def _assignments(n: str, *, last_used: bool) -> str:
    """A usage write's ``SET`` list (``sql.touch_assignments``), ``n`` uses at ``t.at``."""
    return touch_assignments(
        POSTGRES,
        k="k.",
        at="t.at",
        n=n,
        zero="interval '0'",
        refill_due="t.at >= k.quota_reset_at + k.quota_refill",
        periods="floor(extract(epoch from (t.at - k.quota_reset_at))"
        " / extract(epoch from k.quota_refill))",
        last_used=last_used,
    )


#: A touch: ``last_used_at``, and a refill that fell due.
_TOUCH = _assignments("0", last_used=True)
#: A budget's uses, taken from every key of it (``t.n`` uses at ``t.at``).
_SPEND = _assignments("t.n", last_used=False)
_STATE = "k.budget_id, k.created_at, k.quota_remaining, k.quota_reset_at"
#: One statement per usage flush: every (key, minute) row added to what other processes
#: already wrote for it.
_USAGE_UPSERT = (
    "INSERT INTO {usage} AS u (key_id, minute, requests, rejected)"
    " SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[])"
    " ON CONFLICT (key_id, minute) DO UPDATE SET requests = u.requests + EXCLUDED.requests,"
    " rejected = u.rejected + EXCLUDED.rejected"
)


class Usage(Connection):
    """The usage part of ``PostgresKeyStore``."""

    async def _touch_many(self, touching: Touching) -> dict[str, QuotaState]:
        keys, q = self._sql.keys, self._sql
        # The rows are locked in id order before they are updated, whatever order the
        # batch and the plan have: workers flushing the same keys never deadlock.
        touch_sql = (
            f"UPDATE {keys} AS k SET {_TOUCH}"  # noqa: S608
            " FROM (SELECT t.id, t.at FROM unnest($1::text[], $2::timestamptz[]) AS t(id, at)"
            f" JOIN {keys} AS l ON l.id = t.id ORDER BY l.id FOR UPDATE OF l) AS t"
            f" WHERE k.id = t.id RETURNING {_STATE}, k.quota"
        )
        touches, batch = touching.touches, touching.batch
        ids = list(touches)
        ats = [touches[k] for k in ids]

        async def touch(conn: Any) -> dict[str, QuotaState]:
            rows = await conn.fetch(touch_sql, ids, ats) if ids else []
            return budget_states(tuple(r)[:4] for r in rows if r["quota"] is not None)

        now = utcnow()
        spent, owners = touching.spends(now)
        if not spent and not owners:
            return await self._idempotent("touch_many", touch) if ids else {}
        budgets = [b for b, _, _ in spent]
        spend_sql = (
            f"UPDATE {keys} AS k SET {_SPEND}"  # noqa: S608
            " FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) AS t(b, at, n)"
            " WHERE k.budget_id = t.b"
        )
        owner_sql = (
            f"UPDATE {q.owners} AS k SET {_SPEND}"  # noqa: S608
            " FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) AS t(b, at, n)"
            " WHERE k.owner = t.b"
        )
        lock_keys_sql = (
            f"SELECT 1 FROM {keys} WHERE id = ANY($1::text[])"  # noqa: S608
            " OR budget_id = ANY($2::text[]) ORDER BY id FOR UPDATE"
        )
        lock_owners_sql = (
            f"SELECT 1 FROM {q.owners} WHERE owner = ANY($1::text[])"  # noqa: S608
            " ORDER BY owner FOR UPDATE"
        )
        states_sql = (
            f"SELECT {_STATE} FROM {keys} AS k"  # noqa: S608
            " WHERE k.budget_id = ANY($1::text[]) AND k.quota IS NOT NULL"
        )
        owner_states_sql = (
            f"SELECT owner, quota_remaining, quota_reset_at FROM {q.owners}"  # noqa: S608
            " WHERE owner = ANY($1::text[]) AND quota IS NOT NULL"
        )
        # One transaction: the batch's name is stored with its uses, so a retry after a
        # lost commit acknowledgement finds it and takes nothing twice.
        async with self._connection("touch_many") as conn, conn.transaction():
            # Every key row this flush writes (touched, or of a budget it spends), then
            # every owner row, each in one order, before any is written: see touch_sql.
            await conn.execute(lock_keys_sql, ids, budgets)
            await conn.execute(lock_owners_sql, [o for o, _, _ in owners])
            touched = await touch(conn)
            fresh = batch is None or await conn.fetchval(
                f"INSERT INTO {q.batches} (batch, at) VALUES ($1, $2)"  # noqa: S608
                " ON CONFLICT (batch) DO NOTHING RETURNING 1",
                batch,
                now,
            )
            if batch is not None:
                await conn.execute(
                    f"DELETE FROM {q.batches} WHERE at < $1",  # noqa: S608
                    now - BATCH_MEMORY,
                )
            if fresh:
                for statement, spends in ((spend_sql, spent), (owner_sql, owners)):
                    if spends:
                        columns = [list(column) for column in zip(*spends, strict=True)]
                        await conn.execute(statement, *columns)
            rows = await conn.fetch(states_sql, [*touched.keys() | set(budgets)])
            owner_rows = await conn.fetch(owner_states_sql, [o for o, _, _ in owners])
        states = budget_states(tuple(r) for r in rows)
        for r in owner_rows:
            states[f"owner:{r['owner']}"] = QuotaState(r["quota_remaining"], r["quota_reset_at"])
        return states

    async def add_usage(self, counts: UsageCounts) -> None:
        if not counts:
            return
        # Sorted, so two processes upserting the same rows lock them in the same order.
        keys = sorted(counts)
        args = (
            [k for k, _ in keys],
            [m for _, m in keys],
            [counts[k][0] for k in keys],
            [counts[k][1] for k in keys],
        )
        # Adding is not idempotent (a retry after a lost acknowledgement would count
        # twice): no retry here; the recorder keeps a failed batch and tries again.
        async with self._connection("add_usage") as conn:
            await conn.execute(_USAGE_UPSERT.format(usage=self._sql.usage), *args)

    async def _buckets(self, query: UsageQuery) -> list[UsageBucket]:
        sql = (
            "SELECT to_timestamp(floor(extract(epoch FROM u.minute) / $5) * $5) AS start,"  # noqa: S608
            " sum(u.requests)::bigint AS requests, sum(u.rejected)::bigint AS rejected"
            f" FROM {self._sql.usage} AS u JOIN {self._sql.keys} AS k ON k.id = u.key_id"
            " WHERE ($1::text IS NULL OR u.key_id = $1) AND k.owner = $2 AND u.minute >= $3"
            " AND ($4::timestamptz IS NULL OR u.minute < $4) GROUP BY 1 ORDER BY 1"
        )

        async def usage(conn: Any) -> list[UsageBucket]:
            rows = await conn.fetch(
                sql, query.key_id, query.owner, query.since, query.until, query.bucket_seconds
            )
            return [UsageBucket(r["start"], r["requests"], r["rejected"]) for r in rows]

        return await self._idempotent("usage", usage)

    async def top_usage(
        self, owner: str, *, since: datetime, until: datetime | None, limit: int
    ) -> list[UsageTotal]:
        sql = (
            "SELECT u.key_id, k.name, sum(u.requests)::bigint AS requests,"  # noqa: S608
            " sum(u.rejected)::bigint AS rejected"
            f" FROM {self._sql.usage} AS u JOIN {self._sql.keys} AS k ON k.id = u.key_id"
            " WHERE k.owner = $1 AND u.minute >= $2 AND ($3::timestamptz IS NULL OR u.minute < $3)"
            " GROUP BY u.key_id, k.name ORDER BY requests DESC, rejected DESC, u.key_id LIMIT $4"
        )

        async def top(conn: Any) -> list[UsageTotal]:
            rows = await conn.fetch(sql, owner, since, until, limit)
            return [UsageTotal(r["key_id"], r["name"], r["requests"], r["rejected"]) for r in rows]

        return await self._idempotent("top_usage", top)

    async def prune_usage(self, *, before: datetime, limit: int) -> int:
        sql = (
            f"DELETE FROM {self._sql.usage} WHERE ctid = ANY(ARRAY(SELECT ctid FROM"  # noqa: S608
            f" {self._sql.usage} WHERE minute < $1 LIMIT $2))"
        )

        async def prune(conn: Any) -> int:
            status: str = await conn.execute(sql, before, limit)
            return int(status.rsplit(" ", 1)[-1])

        return await self._idempotent("prune_usage", prune)
