"""What usage limits cost, and how far a quota can be overshot.

    python benchmarks/ratelimits.py                       # everything (about a minute)
    python benchmarks/ratelimits.py --redis-url redis://127.0.0.1:6379/0 --skip-overshoot

1. In-process: a key with a rate limit vs a key without, direct ASGI calls into a bare
   Starlette route behind APIKeyMiddleware with 1 000 cached keys; interleaved rounds,
   medians, the ratio. The limits are checked right after the key is verified, as the
   middleware does (the check sits in a thin ASGI layer inside the middleware here, so the
   "no limit" row pays that layer's call too; the "middleware alone" row does not).
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
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from keystile.limits import MemoryRateLimiter, parse_rate_limit
from keystile.stores import store_from_url


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def bare() -> Starlette:
    return Starlette(routes=[Route("/", ok)])


def build(database_url: str, storage: str, **options: Any) -> APIKeyMiddleware:
    return APIKeyMiddleware(
        bare(),
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
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def mint_keys(url: str, n: int, **limits: Any) -> list[str]:
    async with KeyManager(store_from_url(url), argon2=CHEAPEST_PARAMETERS) as keys:
        return [
            (await keys.create(owner="bench", name=f"k{i}-{time.time_ns()}", **limits)).key
            for i in range(n)
        ]


async def time_calls(app: Any, key: str, n: int) -> float:
    """Median-free: µs per call over ``n`` calls (one sample)."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = scope_for(key)
    start = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    elapsed = time.perf_counter() - start
    assert set(statuses) == {200}, set(statuses)
    return elapsed / n * 1e6


async def in_process(rounds: int, calls: int, redis_url: str | None) -> None:
    url = f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    fill = await mint_keys(url, 998)
    [free] = await mint_keys(url, 1)
    [limited] = await mint_keys(url, 1, rate_limit="1000000000/second")
    [quota] = await mint_keys(url, 1, quota=10**12)
    variants: dict[str, tuple[Any, str]] = {}
    app = build(url, "memory://", flush_interval=3600)
    variants["key without limit"] = (app, free)
    variants["key with a rate limit (memory://)"] = (app, limited)
    variants["key with a quota (memory://)"] = (app, quota)
    if redis_url:
        redis_app = build(url, redis_url, flush_interval=3600)
        variants["key without limit, redis:// app"] = (redis_app, free)
        variants["key with a rate limit (redis://)"] = (redis_app, limited)
    for app in {id(a): a for a, _ in variants.values()}.values():
        for key in [*fill, free, limited, quota]:
            await time_calls(app, key, 1)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (app, key) in variants.items():
            samples[name].append(await time_calls(app, key, calls))
    base = statistics.median(samples["key without limit"])
    print(f"\n1. Per request, direct ASGI, 1 000 cached keys ({rounds} rounds x {calls} calls)")
    print(f"{'':44} {'median µs':>10} {'vs no limit':>12}")
    for name, values in samples.items():
        m = statistics.median(values)
        print(f"{name:44} {m:10.2f} {m / base:11.3f}x")
    for app in {id(a): a for a, _ in variants.values()}.values():
        await app.aclose()


def per_hit(n: int) -> None:
    print(f"\n2. One limiter hit ({n:,} hits, µs per hit, best of 5)")
    rate = parse_rate_limit("1000000000/second")
    ours = MemoryRateLimiter()

    def run(fn: Any) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - start) / n * 1e6)
        return best

    clock = time.monotonic
    print(
        f"{'keystile GCRA (MemoryRateLimiter.take)':44} {run(lambda: ours.take('k', rate, clock())):8.3f}"
    )
    # This script is named limits.py too: look the library up without its directory.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    sys.modules.pop("limits", None)
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
        return
    item = limits.parse("1000000000/second")
    for cls in (FixedWindowRateLimiter, SlidingWindowCounterRateLimiter, MovingWindowRateLimiter):
        limiter = cls(MemoryStorage())
        label = f"limits {limits.__version__} {cls.__name__}"
        print(f"{label:44} {run(lambda limiter=limiter: limiter.hit(item, 'k')):8.3f}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def overshoot(quota: int, flush: float, seconds: float, clients: int, storage: str) -> None:
    import httpx

    db = f"sqlite:///{tempfile.mkdtemp()}/overshoot.db"
    [key] = await mint_keys(db, 1, quota=quota)
    port = free_port()
    env = {
        **os.environ,
        "KS_BENCH_DB": db,
        "KS_BENCH_FLUSH": str(flush),
        "KS_BENCH_STORAGE": storage,
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the timed part
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "limits:server_app",
            "--app-dir",
            str(Path(__file__).parent),
            "--workers",
            "2",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    counts = {200: 0, 429: 0}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await http.get("/", headers={"X-API-Key": "nokey"})
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            start = time.monotonic()
            stop = start + seconds

            async def hammer() -> None:
                while time.monotonic() < stop:
                    r = await http.get("/", headers={"X-API-Key": key}, extensions={})
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1

            await asyncio.gather(*(hammer() for _ in range(clients)))
            elapsed = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    passed, total = counts[200], sum(counts.values())
    rate = total / elapsed / 2
    bound = 2 * flush * rate
    print(
        f"{storage:10} quota {quota}, flush_interval {flush}s: {total} requests in {elapsed:.1f}s "
        f"({rate:.0f}/s per worker); passed {passed}, overshoot {passed - quota} "
        f"(bound workers x flush_interval x rate = {bound:.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--hits", type=int, default=200_000)
    parser.add_argument("--redis-url", default=os.environ.get("KEYSTILE_TEST_REDIS_URL"))
    parser.add_argument("--skip-overshoot", action="store_true")
    parser.add_argument("--quota", type=int, default=300)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(in_process(args.rounds, args.calls, args.redis_url))
    per_hit(args.hits)
    if not args.skip_overshoot:
        print("\n4. Quota overshoot, 2 uvicorn workers on one SQLite database")
        storages = ["memory://"] + ([args.redis_url] if args.redis_url else [])
        for storage in storages:
            asyncio.run(
                overshoot(args.quota, args.flush_interval, args.seconds, args.clients, storage)
            )


if __name__ == "__main__":
    main()
