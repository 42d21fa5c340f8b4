"""last_used_at on Postgres: keystile's batched recorder vs one UPDATE per request.

Statements and database time come from ``last_used.py`` (its ``measure``, its report
printed as is). Request latency is measured here: the same keystile app over
direct ASGI, every key cached, twice side by side with requests alternating between
the two: once with the batched recorder (flushing every second, as in ``last_used.py``)
and once with an inner ASGI middleware that awaits ``UPDATE keystile_keys SET
last_used_at = $1 WHERE id = $2`` on every authenticated request (what a naive
implementation does), on its own asyncpg pool.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import asyncpg
import last_used
from asgi import call_once, http_scope
from harness import Target, fmt_us, interleave_async, median, p99, print_table
from starlette.types import ASGIApp, Receive, Scope, Send

from apps import mint, postgres_schema, starlette_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware
from keystile.stores import store_from_url

__all__ = ["LAST_USED_TARGET", "run_usage_writes"]

#: naive / batched total database time, 10 000 requests over 100 keys.
LAST_USED_TARGET = 50.0


class NaiveLastUsed:
    """One awaited UPDATE per authenticated request, before the app runs."""

    def __init__(self, app: ASGIApp, pool: asyncpg.Pool, table: str) -> None:
        self.app = app
        self.pool = pool
        self.sql = f"UPDATE {table} SET last_used_at = $1 WHERE id = $2"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        if scope["type"] == "http" and getattr(user, "key_id", None):
            await self.pool.execute(self.sql, datetime.now(timezone.utc), user.key_id)
        await self.app(scope, receive, send)


async def _replay_flushes(url: str, key_ids: list[str], flushes: int, rows: int) -> float:
    """Seconds of ``flushes`` batched writes of ``rows`` keys each, on an idle event loop:
    the database time of the recorder's flushes without the requests it ran among."""
    store = store_from_url(url)
    await store.open()
    try:
        await store.touch_many({key_ids[0]: datetime.now(timezone.utc)})  # connect, prepare
        total = 0.0
        for _ in range(flushes):
            batch = {k: datetime.now(timezone.utc) for k in key_ids[:rows]}
            t0 = time.perf_counter()
            await store.touch_many(batch)
            total += time.perf_counter() - t0
    finally:
        await store.close()
    return total


async def _latency(
    postgres_url: str, requests: int, n_keys: int, flushes: int, rows_per_flush: int
) -> dict[str, Any]:
    async with postgres_schema(postgres_url) as (url, schema):
        keys = await mint(url, n_keys)
        pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=4)
        batched = APIKeyMiddleware(
            starlette_app(),
            database_url=url,
            argon2=CHEAPEST_PARAMETERS,
            flush_interval=1.0,
        )
        naive = APIKeyMiddleware(
            NaiveLastUsed(starlette_app(), pool, f'"{schema}".keystile_keys'),
            database_url=url,
            argon2=CHEAPEST_PARAMETERS,
            flush_interval=3600.0,
            flush_max=10**9,
        )
        scopes = [http_scope("/ping", k.key.encode()) for k in keys]

        def one_request(name: str, app: ASGIApp) -> Callable[[], Awaitable[float]]:
            """µs of one request, the keys taken in turn."""
            turn = itertools.cycle(scopes)

            async def sample() -> float:
                t0 = time.perf_counter()
                status, _ = await call_once(app, next(turn))
                elapsed = (time.perf_counter() - t0) * 1e6
                if status != 200:
                    raise AssertionError(f"{name} got {status}")
                return elapsed

            return sample

        try:
            for app in (batched, naive):
                for scope in scopes:  # every key proven once: then only cache hits
                    status, body = await call_once(app, scope)
                    if status != 200:
                        raise AssertionError(f"warm-up got {status}: {body[:200]!r}")
            # A real server yields between requests (socket reads): so does the harness.
            samples = await interleave_async(
                {"batched": one_request("batched", batched), "naive": one_request("naive", naive)},
                requests,
            )
            flushes_during_run = batched.recorder.flushes
        finally:
            await batched.aclose()
            await naive.aclose()
            await pool.close()
        replay = await _replay_flushes(url, [k.id for k in keys], flushes, rows_per_flush)
    return {
        name: {"median_us": median(times), "p99_us": p99(times), "requests": len(times)}
        for name, times in samples.items()
    } | {"batched_flushes_during_run": flushes_during_run, "replayed_flush_seconds": replay}


def run_usage_writes(
    postgres_url: str | None, *, requests: int, n_keys: int, latency_requests: int
) -> tuple[dict[str, Any], list[Target]]:
    if postgres_url is None:
        print("\n## last_used_at: SKIPPED (no --postgres-url given)\n")
        return {"skipped": "no --postgres-url given"}, [
            Target(
                "last_used_at", "naive/batched DB time", float("nan"), LAST_USED_TARGET, "x", True
            )
        ]
    print(
        f"  last_used_at: {requests:,} requests over {n_keys} keys (last_used.py) ...", flush=True
    )
    args = argparse.Namespace(
        postgres_url=postgres_url, requests=requests, keys=n_keys, flush_interval=1.0, seed=1
    )
    numbers = asyncio.run(last_used.measure(args))
    print(f"  last_used_at: request latency, {latency_requests:,} requests per arm ...", flush=True)
    flushes = int(numbers["flushes"])
    rows = max(1, round(numbers["rows_written"] / max(flushes, 1)))
    latency = asyncio.run(_latency(postgres_url, latency_requests, n_keys, flushes, rows))
    replayed = latency["replayed_flush_seconds"]
    ratio_replayed = numbers["naive_db_seconds"] / replayed
    ratio_db = numbers["naive_db_seconds"] / numbers["batched_db_seconds"]
    ratio_statements = numbers["naive_statements"] / max(numbers["batched_statements"], 1)
    last_used.report(numbers, args)
    print_table(
        f"last_used_at on Postgres: {requests:,} requests over {n_keys} keys; latency: direct "
        f"ASGI, {latency_requests:,} requests per arm, alternating",
        (
            "approach",
            "UPDATE statements",
            "DB s, in run",
            "DB s, idle replay",
            "median µs/request",
            "p99 µs/request",
        ),
        [
            (
                f"keystile batched recorder ({flushes} flushes x {rows} rows)",
                f"{numbers['batched_statements']:.0f}",
                f"{numbers['batched_db_seconds']:.4f}",
                f"{replayed:.4f}",
                fmt_us(latency["batched"]["median_us"]),
                fmt_us(latency["batched"]["p99_us"]),
            ),
            (
                "one UPDATE per request",
                f"{numbers['naive_statements']:.0f}",
                "-",
                f"{numbers['naive_db_seconds']:.4f}",
                fmt_us(latency["naive"]["median_us"]),
                fmt_us(latency["naive"]["p99_us"]),
            ),
            (
                "naive / batched",
                f"{ratio_statements:,.0f}x",
                f"{ratio_db:,.0f}x",
                f"{ratio_replayed:,.0f}x",
                f"{latency['naive']['median_us'] / latency['batched']['median_us']:.1f}x",
                f"{latency['naive']['p99_us'] / latency['batched']['p99_us']:.1f}x",
            ),
        ],
    )
    print(
        "DB s, in run: wall time of the recorder's touch_many calls while requests were being\n"
        "served on the same event loop (last_used.py), so it includes waiting for the loop;\n"
        "idle replay: the same number of flushes of the same size on an idle loop, like the\n"
        "naive side, which last_used.py times in a replay loop with nothing else running.\n"
    )
    target = Target(
        "last_used_at",
        f"naive/batched DB time ({requests:,} requests, {n_keys} keys, idle replay)",
        ratio_replayed,
        LAST_USED_TARGET,
        "x",
        at_least=True,
        note=f"in-run flush wall time: {ratio_db:,.0f}x; statements {ratio_statements:,.0f}x",
    )
    return {
        "requests": requests,
        "keys": n_keys,
        **numbers,
        "db_time_ratio_in_run": ratio_db,
        "db_time_ratio_replayed": ratio_replayed,
        "replayed_batched_db_seconds": replayed,
        "statement_ratio": ratio_statements,
        "latency": latency,
    }, [target]
