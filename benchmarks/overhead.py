"""Overhead: a minimal Starlette and FastAPI route, bare vs behind keystile, called
directly through ASGI (scope, receive and send built here: no HTTP client in the timing).

Arms (bare, protected with each number of cached keys, and the digest + scan floor over
the same caches) are interleaved round by round, ABBA; each sample times a batch of calls.
Between samples every arm yields to the event loop once, so keystile's background tasks
run outside the timed window; a cache hit itself never yields. Ratios are of medians of
one interleaved run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from asgi import call_once, check_arms, http_scope, timed_arms
from harness import Target, compare, fmt_us, interleave_async, print_table, rounds_for
from starlette.types import ASGIApp

from apps import FloorMiddleware, close_checked, fastapi_app, protect, starlette_app

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


async def _run_framework(framework: str, sizes: list[int], budget: float) -> dict[str, Any]:
    factory = FRAMEWORKS[framework]
    _, token = protect(factory(), 1)  # a real-looking token for the bare arm's header
    arms: dict[str, tuple[ASGIApp, dict[str, Any]]] = {
        "bare": (factory(), http_scope("/ping", token))
    }
    middlewares = {}
    for n in sizes:
        middlewares[n], token = protect(factory(), n)
        arms[f"{n}"] = (middlewares[n], http_scope("/ping", token))
    for n in sizes:  # the yardstick: digest + scan and nothing else, over the same caches
        arms[f"floor {n}"] = (
            FloorMiddleware(factory(), middlewares[n].verifier.cache),
            arms[f"{n}"][1],
        )
    await check_arms(arms)
    for n, middleware in middlewares.items():
        denied, _ = await call_once(middleware, http_scope("/ping", headers=[]))
        if denied != 401:
            raise AssertionError(f"{framework} protected with {n} keys let a request through")

    sample = timed_arms(arms, CALLS_PER_SAMPLE)
    rounds = rounds_for(budget, await sample["bare"]() * CALLS_PER_SAMPLE, len(arms))
    samples = await interleave_async(sample, rounds)
    await check_arms(arms, calls=1)
    await close_checked(middlewares.values(), refusals=True)
    return {
        "framework": framework,
        "rounds": rounds,
        "calls_per_sample": CALLS_PER_SAMPLE,
        "arms": {
            name: {"cached_keys": None if name == "bare" else int(name.split()[-1]), **arm}
            for name, arm in compare(samples, "bare").items()
        },
    }


def _label(name: str, cached_keys: int) -> str:
    if name == "bare":
        return "bare"
    if name.startswith("floor"):
        return f"floor (digest + scan only), {cached_keys:,} keys"
    return f"keystile, {cached_keys:,} keys"


def run_overhead(sizes: list[int], budget: float) -> tuple[dict[str, Any], list[Target]]:
    """``budget``: rough seconds per framework."""
    results = {}
    for framework in FRAMEWORKS:
        print(f"  overhead (direct ASGI): {framework} ...", flush=True)
        results[framework] = asyncio.run(_run_framework(framework, sizes, budget))
    print_table(
        "Overhead per request, direct ASGI call (µs, median of batches of "
        f"{CALLS_PER_SAMPLE}; interleaved)",
        ("framework", "app", "median µs", "p99 µs", "vs bare", "added µs"),
        [
            (
                framework,
                _label(name, arm["cached_keys"]),
                fmt_us(arm["median_us"]),
                fmt_us(arm["p99_us"]),
                f"{arm['ratio']:.3f}x",
                "-" if name == "bare" else f"{arm['added_us']:+.2f}",
            )
            for framework, r in results.items()
            for name, arm in r["arms"].items()
        ],
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
