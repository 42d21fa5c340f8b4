"""last_used_at: keystile's batched writer vs one UPDATE per request, on one Postgres.

Sends ``--requests`` authenticated requests spread over ``--keys`` keys through
``APIKeyMiddleware`` (over httpx's ASGITransport, no network), lets its ``UsageRecorder``
flush every ``--flush-interval`` seconds plus once at shutdown, and counts the UPDATE
statements Postgres itself saw with a statement-level trigger on ``keystile_keys``. The
DB time of the batched writer is the sum of its ``touch_many`` calls. Then it replays the
same (key, time) sequence as one autocommit ``UPDATE keystile_keys SET last_used_at = $1
WHERE id = $2`` per request on one connection, once with the counting trigger (to count)
and once without it (to time, so the trigger's own cost does not inflate the naive side).

Everything runs in a schema of its own, dropped at the end::

    python benchmarks/last_used.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import asyncpg
import httpx
from harness import Target, cli, print_table

from apps import count_statements, counted, mint, postgres_schema, starlette_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware
from keystile.stores.postgres import PostgresKeyStore

__all__ = ["measure", "report"]


class TimedStore(PostgresKeyStore):
    """The Postgres store, with the wall time of every ``touch_many`` (a flush) kept."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.flush_seconds: list[float] = []

    async def touch_many(self, touches: Mapping[str, datetime]) -> None:
        started = time.perf_counter()
        try:
            await super().touch_many(touches)
        finally:
            self.flush_seconds.append(time.perf_counter() - started)


async def _batched(url: str, keys: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """The requests through the middleware; the (key id, time) sequence they made."""
    store = TimedStore(url)
    app = APIKeyMiddleware(
        starlette_app(), store=store, argon2=CHEAPEST_PARAMETERS, flush_interval=args.flush_interval
    )
    order = [keys[i % len(keys)] for i in range(args.requests)]
    random.Random(args.seed).shuffle(order)
    sequence: list[tuple[str, datetime]] = []
    latest_start: dict[str, float] = {}
    started = time.perf_counter()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for key in order:
            latest_start[key.id] = time.time()
            r = await client.get("/ping", headers={"Authorization": f"Bearer {key.key}"})
            if r.status_code != 200:
                raise AssertionError(f"unexpected {r.status_code}: {r.text}")
            sequence.append((key.id, datetime.now(timezone.utc)))
            # A real server yields to the event loop between requests (socket reads); a
            # cache hit over ASGITransport never does, which would starve the recorder's
            # timer until shutdown.
            await asyncio.sleep(0)
    request_seconds = time.perf_counter() - started
    await app.aclose()  # the final flush
    stats = app.stats()
    await store.close()
    return {
        "sequence": sequence,
        "latest_start": latest_start,
        "request_seconds": request_seconds,
        "flushes": stats.flushes,
        "rows_written": stats.touches_written,
        "flush_failures": stats.flush_failures,
        "batched_db_seconds": sum(store.flush_seconds),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Statements and database time, batched and naive (``args``: postgres_url, requests,
    keys, flush_interval, seed)."""
    async with postgres_schema(args.postgres_url) as (url, schema):
        # Keys minted and verified with the same (cheap) argon2 parameters, so no hash
        # upgrade (an UPDATE of its own) muddies the count.
        keys = await mint(url, args.keys)
        raw = await asyncpg.connect(args.postgres_url)
        try:
            await count_statements(raw, schema, {"update": "UPDATE ON keystile_keys"})
            out = await _batched(url, keys, args)
            out["batched_statements"] = (await counted(raw, schema))["update"]
            rows = await raw.fetch(f'SELECT id, last_used_at FROM "{schema}".keystile_keys')
            latest = out.pop("latest_start")
            out["latest_ok"] = all(
                row["last_used_at"] is not None
                and row["last_used_at"].timestamp() >= latest[row["id"]] - 1e-6
                for row in rows
            )
            await raw.execute(f'UPDATE "{schema}".keystile_keys SET last_used_at = NULL')
            await counted(raw, schema)
            sql = f'UPDATE "{schema}".keystile_keys SET last_used_at = $1 WHERE id = $2'
            sequence = out.pop("sequence")
            naive = await asyncpg.connect(args.postgres_url)
            try:
                t0 = time.perf_counter()
                for key_id, at in sequence:
                    await naive.execute(sql, at, key_id)
                out["naive_counted_seconds"] = time.perf_counter() - t0
                out["naive_statements"] = (await counted(raw, schema))["update"]
                await raw.execute(
                    f'ALTER TABLE "{schema}".keystile_keys DISABLE TRIGGER count_update'
                )
                t0 = time.perf_counter()
                for key_id, at in sequence:
                    await naive.execute(sql, at, key_id)
                out["naive_db_seconds"] = time.perf_counter() - t0
            finally:
                await naive.close()
        finally:
            await raw.close()
    if out["batched_statements"] > out["flushes"]:
        raise AssertionError("more UPDATE statements than flushes")
    return out


def report(n: dict[str, Any], args: argparse.Namespace) -> None:
    requests, batched, naive = args.requests, n["batched_db_seconds"], n["naive_db_seconds"]
    print(
        f"last_used_at writes: {requests} requests over {args.keys} keys, flush_interval="
        f"{args.flush_interval}s; requests took {n['request_seconds']:.2f} s "
        f"({requests / n['request_seconds']:,.0f}/s over ASGI); recorder: {n['flushes']} "
        f"flushes, {n['rows_written']} rows written, {n['flush_failures']} failures; final "
        f"last_used_at >= latest request start for every key: {'yes' if n['latest_ok'] else 'NO'}"
    )
    print_table(
        "last_used_at on Postgres: UPDATE statements and database time",
        ("approach", "UPDATE statements", "total DB seconds", "per request"),
        [
            (
                f"keystile batched ({n['flushes']} flushes)",
                f"{n['batched_statements']}",
                f"{batched:.4f}",
                f"{batched / requests * 1e6:.2f} us",
            ),
            (
                "one UPDATE per request",
                f"{n['naive_statements']}",
                f"{naive:.4f}",
                f"{naive / requests * 1e6:.2f} us",
            ),
            (
                "ratio (naive / batched)",
                f"{n['naive_statements'] / max(n['batched_statements'], 1):,.0f}x",
                f"{naive / batched:,.0f}x" if batched else "-",
                "",
            ),
        ],
    )
    print(
        f"(naive statements counted in a pass with the counting trigger, "
        f"{n['naive_counted_seconds']:.4f} s; timed in a second pass without it)"
    )


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    if args.quick:
        args.requests = min(args.requests, 2_000)
    numbers = asyncio.run(measure(args))
    report(numbers, args)
    return numbers, []


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test", help="libpq URL"
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument(
        "--flush-interval", type=float, default=1.0, help="seconds between flushes (default 1)"
    )
    parser.add_argument("--seed", type=int, default=1)


if __name__ == "__main__":
    raise SystemExit(cli("last-used-db", __doc__, _run, configure=_options))
