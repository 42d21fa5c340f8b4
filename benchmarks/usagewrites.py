"""last_used_at on Postgres: keystile's batched recorder vs one UPDATE per request.

Statements and database time come from ``last_used.py`` (run as is, its report echoed
and its table read back). Request latency is measured here: the same keystile app over
direct ASGI, every key cached, twice side by side with requests alternating between
the two: once with the batched recorder (flushing every second, as in ``last_used.py``)
and once with an inner ASGI middleware that awaits ``UPDATE keystile_keys SET
last_used_at = $1 WHERE id = $2`` on every authenticated request (what a naive
implementation does), on its own asyncpg pool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import re
import time
from datetime import datetime, timezone
from typing import Any

import asyncpg
import last_used
from common import Target, fmt_us, median, p99, print_table
from misspath import postgres_schema
from starlette.types import ASGIApp, Receive, Scope, Send

from apps import call_once, http_scope, starlette_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from keystile.stores import store_from_url

__all__ = ["LAST_USED_TARGET", "run_usage_writes"]

#: naive / batched total database time, 10 000 requests over 100 keys.
LAST_USED_TARGET = 50.0


def _parse_last_used(report: str) -> dict[str, float]:
    """The numbers of ``last_used.py``'s table."""

    def row(label: str) -> list[str]:
        for line in report.splitlines():
            if line.startswith(label):
                return re.split(r"\s{2,}", line.strip())
        raise ValueError(f"no {label!r} row in last_used.py's report")

    batched, naive = row("keystile batched"), row("one UPDATE per request")
    flushes = re.search(r"recorder: (\d+) flushes, (\d+) rows written", report)
    return {
        "batched_statements": float(batched[1]),
        "batched_db_seconds": float(batched[2]),
        "naive_statements": float(naive[1]),
        "naive_db_seconds": float(naive[2]),
        "flushes": float(flushes.group(1)) if flushes else float("nan"),
        "rows_written": float(flushes.group(2)) if flushes else float("nan"),
    }


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
    async with postgres_schema(postgres_url) as url:
        async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
            keys = [await manager.create(owner="bench", name=f"k{i}") for i in range(n_keys)]
        schema = url.rsplit("schema=", 1)[1]
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
        arms: dict[str, tuple[ASGIApp, list[float]]] = {
            "batched": (batched, []),
            "naive": (naive, []),
        }
        try:
            for app, _ in arms.values():
                for scope in scopes:  # every key proven once: then only cache hits
                    status, body = await call_once(app, scope)
                    if status != 200:
                        raise AssertionError(f"warm-up got {status}: {body[:200]!r}")
            for i in range(requests):
                scope = scopes[i % n_keys]
                for name in ("batched", "naive") if i % 2 == 0 else ("naive", "batched"):
                    app, times = arms[name]
                    t0 = time.perf_counter()
                    status, _ = await call_once(app, scope)
                    times.append((time.perf_counter() - t0) * 1e6)
                    if status != 200:
                        raise AssertionError(f"{name} got {status}")
                # A real server yields between requests (socket reads): so does this loop.
                await asyncio.sleep(0)
            flushes_during_run = batched.recorder.flushes
        finally:
            await batched.aclose()
            await naive.aclose()
            await pool.close()
        replay = await _replay_flushes(url, [k.id for k in keys], flushes, rows_per_flush)
    return {
        name: {"median_us": median(times), "p99_us": p99(times), "requests": len(times)}
        for name, (_, times) in arms.items()
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
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        asyncio.run(last_used.run(args))
    report = buffer.getvalue()
    numbers = _parse_last_used(report)
    print(f"  last_used_at: request latency, {latency_requests:,} requests per arm ...", flush=True)
    flushes = int(numbers["flushes"])
    rows = max(1, round(numbers["rows_written"] / max(flushes, 1)))
    latency = asyncio.run(_latency(postgres_url, latency_requests, n_keys, flushes, rows))
    replayed = latency["replayed_flush_seconds"]
    ratio_replayed = numbers["naive_db_seconds"] / replayed
    ratio_db = numbers["naive_db_seconds"] / numbers["batched_db_seconds"]
    ratio_statements = numbers["naive_statements"] / max(numbers["batched_statements"], 1)
    print("\n## last_used_at on Postgres (benchmarks/last_used.py)\n")
    print("    " + report.strip().replace("\n", "\n    "))
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
        "report": report,
    }, [target]
