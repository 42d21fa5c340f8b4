"""Overhead: a minimal Starlette and FastAPI route, bare vs behind keystile, called
directly through ASGI (scope, receive and send built here: no HTTP client in the timing).

Arms (bare, and protected with each number of cached keys) are interleaved round by
round, the order reversed every other round; each sample times a batch of calls with
``time.perf_counter_ns``. Between batches every arm yields to the event loop once
(``asyncio.sleep(0)``), so keystile's background tasks run outside the timed window; a
cache hit itself never yields. Ratios are of medians of one interleaved run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from common import Target, fmt_us, median, p99, print_table
from starlette.types import ASGIApp, Message

from apps import FloorMiddleware, call_once, fastapi_app, http_scope, protect, starlette_app

__all__ = ["OVERHEAD_TARGETS", "run_overhead"]

#: Protected/bare median ratio, per framework and number of cached keys.
OVERHEAD_TARGETS: dict[tuple[str, int], float] = {
    ("starlette", 10): 1.25,
    ("starlette", 1_000): 1.30,
    ("starlette", 10_000): 1.45,
    ("fastapi", 1_000): 1.1,
}
CALLS_PER_SAMPLE = 50

FRAMEWORKS: dict[str, Callable[[], ASGIApp]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
}


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


async def _batch(app: ASGIApp, scope: dict[str, Any], calls: int) -> float:
    perf = time.perf_counter_ns
    receive, send = _receive, _send
    t0 = perf()
    for _ in range(calls):
        await app(scope.copy(), receive, send)
    return (perf() - t0) / calls / 1_000


async def _run_framework(framework: str, sizes: list[int], budget: float) -> dict[str, Any]:
    factory = FRAMEWORKS[framework]
    arms: dict[str, tuple[ASGIApp, dict[str, Any]]] = {}
    bare = factory()
    _, token = protect(factory(), 1)  # a real-looking token for the bare arm's header
    arms["bare"] = (bare, http_scope("/ping", token))
    middlewares = {}
    for n in sizes:
        middleware, token = protect(factory(), n)
        middlewares[n] = middleware
        arms[f"{n}"] = (middleware, http_scope("/ping", token))
    # The yardstick: digest + scan and nothing else, over the same caches.
    for n in sizes:
        floor = FloorMiddleware(factory(), middlewares[n].verifier.cache)
        arms[f"floor {n}"] = (floor, arms[f"{n}"][1])
    for name, (app, scope) in arms.items():
        for _ in range(20):  # warm-up, and proof that every arm answers 200
            status, body = await call_once(app, scope)
            if status != 200:
                raise AssertionError(f"{framework} {name}: got {status} {body[:200]!r}")
    for n, middleware in middlewares.items():
        denied, _ = await call_once(middleware, {**http_scope("/ping", b""), "headers": []})
        if denied != 401:
            raise AssertionError(f"{framework} protected with {n} keys let a request through")

    estimate = await _batch(bare, arms["bare"][1], CALLS_PER_SAMPLE)
    rounds = max(15, int(budget * 1e6 / (estimate * CALLS_PER_SAMPLE * len(arms) * 1.3)))
    samples: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            app, scope = arms[name]
            samples[name].append(await _batch(app, scope, CALLS_PER_SAMPLE))
            await asyncio.sleep(0)
    for name, (app, scope) in arms.items():
        status, _ = await call_once(app, scope)
        if status != 200:
            raise AssertionError(f"{framework} {name}: got {status} after the run")
    for middleware in middlewares.values():
        await middleware.aclose()
        stats = middleware.stats()
        if stats.cache_misses:
            raise AssertionError(f"{framework}: {stats.cache_misses} cache misses during the run")
    bare_median = median(samples["bare"])
    return {
        "framework": framework,
        "rounds": rounds,
        "calls_per_sample": CALLS_PER_SAMPLE,
        "arms": {
            name: {
                "cached_keys": None if name == "bare" else int(name.split()[-1]),
                "median_us": median(s),
                "p99_us": p99(s),
                "ratio": median(s) / bare_median,
                "added_us": median(s) - bare_median,
            }
            for name, s in samples.items()
        },
    }


def run_overhead(sizes: list[int], budget: float) -> tuple[dict[str, Any], list[Target]]:
    """``budget``: rough seconds per framework."""
    results = {}
    for framework in FRAMEWORKS:
        print(f"  overhead (direct ASGI): {framework} ...", flush=True)
        results[framework] = asyncio.run(_run_framework(framework, sizes, budget))

    rows = []
    for framework, r in results.items():
        for name, arm in r["arms"].items():
            if name == "bare":
                label = "bare"
            elif name.startswith("floor"):
                label = f"floor (digest + scan only), {arm['cached_keys']:,} keys"
            else:
                label = f"keystile, {int(name):,} keys"
            rows.append(
                (
                    framework,
                    label,
                    fmt_us(arm["median_us"]),
                    fmt_us(arm["p99_us"]),
                    f"{arm['ratio']:.3f}x",
                    "-" if name == "bare" else f"{arm['added_us']:+.2f}",
                )
            )
    print_table(
        "Overhead per request, direct ASGI call (µs, median of batches of "
        f"{CALLS_PER_SAMPLE}; interleaved)",
        ("framework", "app", "median µs", "p99 µs", "vs bare", "added µs"),
        rows,
    )
    targets = []
    for (framework, n), limit in OVERHEAD_TARGETS.items():
        arm = results[framework]["arms"].get(f"{n}")
        if arm is not None:
            floor = results[framework]["arms"].get(f"floor {n}")
            targets.append(
                Target(
                    "overhead",
                    f"{framework} protected/bare at {n:,} keys",
                    arm["ratio"],
                    limit,
                    "x",
                    note=f"floor (digest + scan only) {floor['ratio']:.2f}x" if floor else "",
                )
            )
    return results, targets
