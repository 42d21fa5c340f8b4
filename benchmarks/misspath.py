"""Miss path: argon2 cost, full miss latency through the middleware, cold start.

* argon2id verify at keystile's parameters (``DEFAULT_PARAMETERS``) and at argon2-cffi's
  ``PasswordHasher()`` defaults, timed one call at a time.
* Full miss latency: a real key (minted with ``KeyManager`` at the default parameters)
  presented to ``APIKeyMiddleware`` over direct ASGI, the key evicted from the cache
  before every request (``middleware.evict``), so each request parses the key, reads the
  store and runs argon2 in a worker thread: on SQLite and on Postgres.
* Cold start: N active keys, a fresh middleware, the N first requests sent by 32
  concurrent clients; the time until every key has answered 200 (a 503 from the argon2
  guard is retried, and counted).
"""

from __future__ import annotations

import asyncio
import pathlib
import secrets
import tempfile
import time
from typing import Any

import argon2
from asgi import call_once, http_scope
from harness import Target, fmt_us, median, p99, print_table

from apps import mint, postgres_schema, starlette_app
from keystile import DEFAULT_PARAMETERS, APIKeyMiddleware
from keystile.hashing import SecretHasher
from keystile.manager import CreatedKey
from keystile.stores import store_from_url
from keystile.verifier import DEFAULT_ARGON2_CONCURRENCY

__all__ = ["run_misspath"]

COLD_START_CLIENTS = 32


def _argon2_costs(samples_chosen: int, samples_default: int) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    ours = SecretHasher(DEFAULT_PARAMETERS)
    library = argon2.PasswordHasher()
    out: dict[str, Any] = {}
    for name, verify, stored, n in (
        ("keystile", lambda h: ours.verify(h, secret), ours.hash(secret), samples_chosen),
        (
            "argon2-cffi default",
            lambda h: library.verify(h, secret),
            library.hash(secret),
            samples_default,
        ),
    ):
        verify(stored)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            verify(stored)
            times.append((time.perf_counter() - t0) * 1e6)
        out[name] = {"median_us": median(times), "p99_us": p99(times), "samples": n}
    p = DEFAULT_PARAMETERS
    out["keystile"]["parameters"] = (
        f"t={p.time_cost}, m={p.memory_cost // 1024} MiB, p={p.parallelism}"
    )
    lib = library
    out["argon2-cffi default"]["parameters"] = (
        f"t={lib.time_cost}, m={lib.memory_cost // 1024} MiB, p={lib.parallelism}"
    )
    return out


async def _miss_latency(url: str, key: CreatedKey, requests: int) -> dict[str, float]:
    middleware = APIKeyMiddleware(starlette_app(), database_url=url)
    scope = http_scope("/ping", key.key.encode())
    times: list[float] = []
    try:
        for i in range(requests + 3):
            middleware.evict(key.id)
            t0 = time.perf_counter()
            status, body = await call_once(middleware, scope)
            elapsed = (time.perf_counter() - t0) * 1e6
            if status != 200:
                raise AssertionError(f"miss got {status}: {body[:200]!r}")
            if i >= 3:
                times.append(elapsed)
        stats = middleware.stats()
    finally:
        await middleware.aclose()
    if stats.argon2_verifications != requests + 3:
        raise AssertionError(f"{stats.argon2_verifications} argon2 runs for {requests + 3} misses")
    return {
        "median_us": median(times),
        "p99_us": p99(times),
        "argon2_median_us": stats.argon2_seconds / stats.argon2_verifications * 1e6,
        "requests": requests,
    }


async def _cold_start(url: str, keys: list[CreatedKey]) -> dict[str, float]:
    middleware = APIKeyMiddleware(starlette_app(), database_url=url)
    queue: asyncio.Queue[CreatedKey] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    retried = 0
    failures: list[int] = []

    async def client() -> None:
        nonlocal retried
        while True:
            try:
                key = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            scope = http_scope("/ping", key.key.encode())
            while True:
                status, _ = await call_once(middleware, scope)
                if status != 503:
                    break
                retried += 1
                await asyncio.sleep(0.01)
            if status != 200:
                failures.append(status)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(COLD_START_CLIENTS)))
        elapsed = time.perf_counter() - t0
        stats = middleware.stats()
    finally:
        await middleware.aclose()
    if failures:
        raise AssertionError(f"cold start: {len(failures)} keys failed, first {failures[0]}")
    if stats.cache_size != len(keys):
        raise AssertionError(f"cold start cached {stats.cache_size} of {len(keys)} keys")
    return {
        "keys": len(keys),
        "seconds": elapsed,
        "ms_per_key": elapsed / len(keys) * 1e3,
        "retried_503": retried,
        "argon2_verifications": stats.argon2_verifications,
        "argon2_mean_ms": stats.argon2_seconds / max(stats.argon2_verifications, 1) * 1e3,
    }


async def _run_store(
    url: str, n_cold: int, miss_requests: int, keys: list[CreatedKey]
) -> dict[str, Any]:
    return {
        "miss": await _miss_latency(url, keys[0], miss_requests),
        "cold_start": await _cold_start(url, keys[:n_cold]),
    }


async def _run(postgres_url: str | None, n_cold: int, miss_requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keystile-bench-") as tmp:
        sqlite_url = f"sqlite:///{pathlib.Path(tmp) / 'keys.db'}"
        t0 = time.perf_counter()
        keys = await mint(sqlite_url, n_cold, argon2=DEFAULT_PARAMETERS, pairs=True)
        out["mint_seconds"] = time.perf_counter() - t0
        out["sqlite"] = await _run_store(sqlite_url, n_cold, miss_requests, keys)
        if postgres_url:
            # The same rows (same hashes) copied into Postgres: no second round of hashing.
            async with postgres_schema(postgres_url) as (pg_url, _):
                source, target = store_from_url(sqlite_url), store_from_url(pg_url)
                await source.open()
                await target.open()
                try:
                    for key in keys:
                        record = await source.get(key.id)
                        assert record is not None
                        await target.insert(record)
                finally:
                    await source.close()
                    await target.close()
                out["postgres"] = await _run_store(pg_url, n_cold, miss_requests, keys)
    return out


async def _reachable(url: str) -> str | None:
    import asyncpg

    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def run_misspath(
    *, postgres_url: str | None, n_cold: int, miss_requests: int, argon2_samples: tuple[int, int]
) -> tuple[dict[str, Any], list[Target]]:
    print("  miss path: argon2 costs ...", flush=True)
    results: dict[str, Any] = {"argon2": _argon2_costs(*argon2_samples)}
    skip = None
    if postgres_url is None:
        skip = "no --postgres-url given"
    else:
        problem = asyncio.run(_reachable(postgres_url))
        if problem:
            skip = f"Postgres unreachable ({problem})"
    if skip:
        print(f"  miss path: Postgres parts SKIPPED: {skip}", flush=True)
        results["postgres_skipped"] = skip
    print(f"  miss path: minting {n_cold} keys, miss latency, cold start ...", flush=True)
    results.update(asyncio.run(_run(None if skip else postgres_url, n_cold, miss_requests)))

    a = results["argon2"]
    print_table(
        "argon2id verify (one call, µs)",
        ("hasher", "parameters", "median µs", "p99 µs", "samples"),
        [
            (name, r["parameters"], fmt_us(r["median_us"]), fmt_us(r["p99_us"]), str(r["samples"]))
            for name, r in a.items()
        ],
    )
    rows = []
    for store in ("sqlite", "postgres"):
        r = results.get(store)
        if r is None:
            rows.append((store, "skipped", "-", "-", "-", "-", "-"))
            continue
        m, c = r["miss"], r["cold_start"]
        rows.append(
            (
                store,
                fmt_us(m["median_us"]),
                fmt_us(m["p99_us"]),
                f"{c['keys']:,} keys in {c['seconds']:.2f} s",
                f"{c['ms_per_key']:.2f}",
                f"{c['retried_503']}",
                f"{c['argon2_mean_ms']:.2f}",
            )
        )
    print_table(
        "Miss path through the middleware (default argon2; cold start with "
        f"{COLD_START_CLIENTS} clients, argon2 concurrency {DEFAULT_ARGON2_CONCURRENCY})",
        (
            "store",
            "miss median µs",
            "miss p99 µs",
            "cold start",
            "ms per key",
            "503s retried",
            "argon2 mean ms",
        ),
        rows,
    )
    if skip:
        print(f"(Postgres: {skip})\n")
    results["cold_start_floor_ms_per_key"] = (
        a["keystile"]["median_us"] / 1e3 / DEFAULT_ARGON2_CONCURRENCY
    )
    return results, []
