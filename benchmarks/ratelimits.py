"""What usage limits cost, and how far a quota can be overshot.

    python benchmarks/ratelimits.py                       # everything (about a minute)
    python benchmarks/ratelimits.py --redis-url redis://127.0.0.1:6379/0 --skip-overshoot

1. In-process: a key with a rate limit or a quota vs a key without, direct ASGI calls into
   a bare Starlette route behind APIKeyMiddleware with 1 000 cached keys; rounds
   interleaved ABBA, medians, the ratio to the key without limit.
2. The per-hit cost of the GCRA written for keystile vs the ``limits`` library's in-memory
   strategies (when installed).
3. Redis: the added latency per request of ``rate_limit_storage="redis://…"``.
4. Quota overshoot with ``memory://`` under 2 uvicorn workers sharing one SQLite database:
   requests as fast as a few clients can send them; passed - quota vs the bound
   workers x flush_interval x rate.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

from asgi import check_arms, http_scope, time_asgi, uvicorn, wait_http
from harness import (
    Target,
    batch_arms,
    cli,
    compare,
    fmt_us,
    interleave,
    interleave_async,
    print_table,
)

from apps import mint, starlette_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware
from keystile.limits import MemoryRateLimiter, parse_rate_limit

BENCH_DIR = pathlib.Path(__file__).resolve().parent
UNLIMITED = "1000000000/second"


def build(database_url: str, storage: str, **options: Any) -> APIKeyMiddleware:
    return APIKeyMiddleware(
        starlette_app(),
        database_url=database_url,
        argon2=CHEAPEST_PARAMETERS,
        rate_limit_storage=storage,
        **options,
    )


def server_app() -> APIKeyMiddleware:
    """The uvicorn factory of the overshoot run (options from the environment)."""
    return build(
        os.environ["KS_BENCH_DB"],
        os.environ.get("KS_BENCH_STORAGE", "memory://"),
        flush_interval=float(os.environ.get("KS_BENCH_FLUSH", "1.0")),
    )


def scope_for(key: str) -> dict[str, Any]:
    return http_scope("/ping", headers=[(b"host", b"bench"), (b"x-api-key", key.encode())])


async def in_process(rounds: int, calls: int, redis_url: str | None) -> dict[str, Any]:
    url = f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    fill = [k.key for k in await mint(url, 997)]
    free, limited, quota = [
        (await mint(url, 1, **fields))[0].key
        for fields in ({}, {"rate_limit": UNLIMITED}, {"quota": 10**12})
    ]
    app = build(url, "memory://", flush_interval=3600)
    variants: dict[str, tuple[Any, dict[str, Any]]] = {
        "key without limit": (app, scope_for(free)),
        "key with a rate limit (memory://)": (app, scope_for(limited)),
        "key with a quota (memory://)": (app, scope_for(quota)),
    }
    if redis_url:
        redis_app = build(url, redis_url, flush_interval=3600)
        variants["key without limit, redis:// app"] = (redis_app, scope_for(free))
        variants["key with a rate limit (redis://)"] = (redis_app, scope_for(limited))
    apps = {id(a): a for a, _ in variants.values()}.values()
    for a in apps:  # every key cached
        await time_asgi(a, [scope_for(k) for k in [*fill, free, limited, quota]])
    await check_arms(variants, calls=1)

    def sample(a: Any, scope: dict[str, Any]) -> Callable[[], Any]:
        return lambda: time_asgi(a, itertools.repeat(scope, calls))

    samples = await interleave_async({n: sample(a, s) for n, (a, s) in variants.items()}, rounds)
    await check_arms(variants, calls=1)
    for a in apps:
        await a.aclose()
    return compare(samples, "key without limit")


def per_hit(n: int) -> dict[str, float]:
    """µs per limiter hit, best of 5 interleaved rounds of ``n`` hits."""
    rate = parse_rate_limit(UNLIMITED)
    ours = MemoryRateLimiter()
    clock = time.monotonic
    hits: dict[str, Callable[[], object]] = {
        "keystile GCRA (MemoryRateLimiter.take)": lambda: ours.take("k", rate, clock())
    }
    try:
        import limits
        from limits.storage import MemoryStorage
        from limits.strategies import (
            FixedWindowRateLimiter,
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError:
        print("(the limits library is not installed: pip install limits)")
    else:
        item = limits.parse(UNLIMITED)
        for cls in (
            FixedWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
            MovingWindowRateLimiter,
        ):
            limiter = cls(MemoryStorage())
            hits[f"limits {limits.__version__} {cls.__name__}"] = lambda limiter=limiter: (
                limiter.hit(item, "k")
            )
    samples = interleave(batch_arms(lambda hit: hit(), hits, n), 5)
    return {name: min(values) for name, values in samples.items()}


async def overshoot(
    quota: int, flush: float, seconds: float, clients: int, storage: str
) -> dict[str, Any]:
    import httpx

    db = f"sqlite:///{tempfile.mkdtemp()}/overshoot.db"
    [key] = await mint(db, 1, quota=quota)
    env = {"KS_BENCH_DB": db, "KS_BENCH_FLUSH": str(flush), "KS_BENCH_STORAGE": storage}
    counts = {200: 0, 429: 0}
    options = ("--factory", "--workers", "2")
    with uvicorn("ratelimits:server_app", app_dir=BENCH_DIR, env=env, options=options) as (
        proc,
        base,
    ):
        await asyncio.to_thread(wait_http, f"{base}/ping", proc)
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            start = time.monotonic()
            stop = start + seconds

            async def hammer() -> None:
                while time.monotonic() < stop:
                    r = await http.get("/ping", headers={"X-API-Key": key.key})
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1

            await asyncio.gather(*(hammer() for _ in range(clients)))
            elapsed = time.monotonic() - start
    passed, total = counts[200], sum(counts.values())
    rate = total / elapsed / 2
    return {
        "storage": storage.split(":")[0] + "://",
        "quota": quota,
        "flush_interval": flush,
        "requests": total,
        "seconds": elapsed,
        "rate_per_worker": rate,
        "passed": passed,
        "overshoot": passed - quota,
        "bound": 2 * flush * rate,
    }


def run_ratelimits(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    rounds = args.rounds or (10 if args.quick else 40)
    results: dict[str, Any] = {"rounds": rounds, "calls": args.calls}
    results["per_request"] = asyncio.run(in_process(rounds, args.calls, args.redis_url))
    print_table(
        f"1. Per request, direct ASGI, 1 000 cached keys ({rounds} rounds x {args.calls} calls)",
        ("", "median µs", "vs no limit"),
        [
            (n, fmt_us(r["median_us"]), f"{r['ratio']:.3f}x")
            for n, r in results["per_request"].items()
        ],
    )
    hits = args.hits // 10 if args.quick else args.hits
    results["per_hit_us"] = per_hit(hits)
    print_table(
        f"2. One limiter hit ({hits:,} hits, µs per hit, best of 5)",
        ("limiter", "µs per hit"),
        [(n, f"{us:.3f}") for n, us in results["per_hit_us"].items()],
    )
    if not args.skip_overshoot:
        storages = ["memory://"] + ([args.redis_url] if args.redis_url else [])
        seconds = min(args.seconds, 2.0) if args.quick else args.seconds
        quota = args.quota or (50 if args.quick else 300)
        runs = [
            asyncio.run(overshoot(quota, args.flush_interval, seconds, args.clients, s))
            for s in storages
        ]
        results["overshoot"] = runs
        print_table(
            f"4. Quota overshoot, 2 uvicorn workers on one SQLite database, {args.clients} clients",
            (
                "storage",
                "quota",
                "flush_interval",
                "requests",
                "per worker/s",
                "passed",
                "overshoot",
                "bound W x flush x rate",
            ),
            [
                (
                    r["storage"],
                    str(r["quota"]),
                    f"{r['flush_interval']:g} s",
                    f"{r['requests']} in {r['seconds']:.1f} s",
                    f"{r['rate_per_worker']:.0f}",
                    str(r["passed"]),
                    str(r["overshoot"]),
                    f"{r['bound']:.0f}",
                )
                for r in runs
            ],
        )
    return results, []


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    parser.add_argument("--hits", type=int, default=200_000, help="limiter hits per sample")
    parser.add_argument("--redis-url", default=os.environ.get("KEYSTILE_TEST_REDIS_URL"))
    parser.add_argument("--skip-overshoot", action="store_true")
    parser.add_argument("--quota", type=int, help="uses (default 300; --quick 50)")
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)


if __name__ == "__main__":
    raise SystemExit(cli("ratelimits", __doc__, run_ratelimits, configure=_options))
