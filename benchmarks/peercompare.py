"""Peers: the same FastAPI route and the same N keys behind keystile and behind the peer
libraries a user could pick instead (built by ``peers.py``, each as its README sets it up).

Every app is measured the same way: ``asgi.measure_asgi`` (sequential GETs through
httpx's ASGITransport, the full HTTP request/response cycle without a socket), and again
called directly through ASGI (no client in the timing), each request timed on its own.

keystile here is set up as its README says: ``APIKeyMiddleware`` with a SQLite
``database_url``, keys minted by ``KeyManager`` at the default argon2 parameters, and every
one of the N keys proven once (``verifier.verify``: store read + argon2) before the run, so
all N are cached, as in a warm process.
"""

from __future__ import annotations

import asyncio
import functools
import pathlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgi import BENCH_HEADERS, http_scope, measure_asgi, receive, run_lifespan
from fastapi import FastAPI
from harness import Target, fmt_us, median, p99, print_table
from starlette.types import ASGIApp, Message

from apps import mint
from keystile import DEFAULT_PARAMETERS, APIKeyMiddleware
from keystile.fastapi import CurrentKey

__all__ = ["DEFAULT_PEERS", "PEER_TARGET", "QUICK_PEERS", "run_peers"]

#: keystile at least this many times faster per request, at 1 000 keys.
PEER_TARGET = 20.0
DEFAULT_PEERS = [
    "fastapi-bare",
    "keyshield-cached",
    "keyshield-sql",
    "fastapi-keygate",
    "keyshield-cached-nodelay",
]
QUICK_PEERS = ["fastapi-bare", "keyshield-cached", "keyshield-sql", "fastapi-keygate"]
#: The peers the target is about (their defaults, as their READMEs set them up).
TARGET_PEERS = ("keyshield-cached", "keyshield-sql", "fastapi-keygate")


async def _build_keystile(n_keys: int, workdir: pathlib.Path, *, dependency: bool) -> Any:
    import peers

    url = f"sqlite:///{workdir / f'keystile-{dependency}.db'}"
    keys = await mint(url, n_keys, argon2=DEFAULT_PARAMETERS, pairs=True)
    app = FastAPI()
    if dependency:

        @app.get("/ping")
        async def ping_key(key: CurrentKey) -> dict[str, bool]:
            return {"ok": True}

    else:

        @app.get("/ping")
        async def ping() -> dict[str, bool]:
            return {"ok": True}

    middleware = APIKeyMiddleware(app, database_url=url)
    for key in keys:  # each key proven once (store read + argon2), as a warm process has
        await middleware.verifier.verify(key.key.encode())
    if len(middleware.verifier.cache) != n_keys:
        raise AssertionError("keystile did not cache every key")
    p = DEFAULT_PARAMETERS
    return peers.PeerApp(
        name="keystile+CurrentKey" if dependency else "keystile",
        description=(
            f"keystile APIKeyMiddleware, SQLite database_url, {n_keys:,} keys cached "
            f"(argon2id t={p.time_cost}, m={p.memory_cost // 1024} MiB, p={p.parallelism}, "
            "once per key), Bearer; "
            + (
                "the route takes the key via the CurrentKey dependency (README's FastAPI "
                "example: current_key + HTTPBearer + APIKeyHeader sub-dependencies)"
                if dependency
                else "the route is the bare one (the middleware alone enforces the key)"
            )
        ),
        app=middleware,
        headers={"Authorization": f"Bearer {keys[len(keys) // 2].key}"},
        aclose=middleware.aclose,
    )


async def _direct(app: ASGIApp, headers: dict[str, str], requests: int) -> list[float]:
    """Per-request µs of direct ASGI calls (inside the app's lifespan)."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    template = http_scope("/ping", headers=[*BENCH_HEADERS, *raw])
    status = 0

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    times: list[float] = []
    async with run_lifespan(app):
        for i in range(requests + 3):
            t0 = time.perf_counter_ns()
            await app(dict(template), receive, send)
            elapsed = (time.perf_counter_ns() - t0) / 1_000
            if status != 200:
                raise AssertionError(f"direct ASGI call got {status}")
            if i >= 3:
                times.append(elapsed)
    return times


async def _measure(
    build: Callable[[int, pathlib.Path], Awaitable[Any]],
    n_keys: int,
    workdir: pathlib.Path,
    *,
    budget: float,
    max_requests: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    peer = await build(n_keys, workdir)
    build_s = time.perf_counter() - t0
    try:
        probe = await measure_asgi(peer.app, peer.headers, requests=3, warmup=2)
        estimate = median(probe) / 1e6
        requests = max(5, min(max_requests, int(budget / 2 / estimate)))
        httpx_times = await measure_asgi(peer.app, peer.headers, requests=requests, warmup=3)
        direct_times = await _direct(peer.app, peer.headers, requests)
    finally:
        if peer.aclose is not None:
            await peer.aclose()
    return {
        "name": peer.name,
        "description": peer.description,
        "keys": n_keys,
        "requests": requests,
        "build_seconds": build_s,
        "median_us": median(httpx_times),
        "p99_us": p99(httpx_times),
        "direct_median_us": median(direct_times),
        "direct_p99_us": p99(direct_times),
    }


async def _run(
    names: list[str], n_keys: int, budget: float, max_requests: int
) -> list[dict[str, Any]]:
    import peers

    results = []
    with tempfile.TemporaryDirectory(prefix="keystile-peers-") as tmp:
        workdir = pathlib.Path(tmp)
        builders: dict[str, Callable[[int, pathlib.Path], Awaitable[Any]]] = {
            "keystile": functools.partial(_build_keystile, dependency=False),
            "keystile+CurrentKey": functools.partial(_build_keystile, dependency=True),
            **{name: peers.PEERS[name] for name in names},
        }
        for name, build in builders.items():
            print(f"  peers: {name}: {n_keys:,} keys ...", flush=True)
            r = await _measure(build, n_keys, workdir, budget=budget, max_requests=max_requests)
            print(
                f"  peers: {name}: built in {r['build_seconds']:.1f}s, "
                f"median {fmt_us(r['median_us'])} µs",
                flush=True,
            )
            results.append(r)
    return results


def run_peers(
    names: list[str], *, n_keys: int, budget: float, max_requests: int
) -> tuple[dict[str, Any], list[Target]]:
    try:
        import peers
    except ImportError as exc:
        message = f"peers SKIPPED: benchmarks/peers.py cannot be imported ({exc})"
        print(f"\n## {message}\n")
        return {"skipped": message}, [
            Target("peers", f"faster than {p} at 1,000 keys", float("nan"), PEER_TARGET, "x", True)
            for p in TARGET_PEERS
        ]
    missing = [n for n in names if n not in peers.PEERS]
    if missing:
        raise SystemExit(f"unknown peer(s) {missing}; known: {list(peers.PEERS)}")
    results = asyncio.run(_run(names, n_keys, budget, max_requests))
    ours = next(r for r in results if r["name"] == "keystile")
    ours_dep = next(r for r in results if r["name"] == "keystile+CurrentKey")
    bare = next((r for r in results if r["name"] == "fastapi-bare"), None)
    for r in results:
        r["ratio_to_keystile"] = r["median_us"] / ours["median_us"]
        r["ratio_to_keystile_dep"] = r["median_us"] / ours_dep["median_us"]
        r["direct_ratio_to_keystile"] = r["direct_median_us"] / ours["direct_median_us"]
        r["direct_ratio_to_keystile_dep"] = r["direct_median_us"] / ours_dep["direct_median_us"]
        if bare is not None:
            r["added_us"] = r["median_us"] - bare["median_us"]
            r["direct_added_us"] = r["direct_median_us"] - bare["direct_median_us"]
    print_table(
        f"Peers: one authenticated GET /ping, {n_keys:,} keys, FastAPI "
        "(httpx = asgi.measure_asgi through httpx.ASGITransport; direct = ASGI call, no client)",
        (
            "app",
            "httpx median µs",
            "p99 µs",
            "/ keystile",
            "/ keystile+dep",
            "direct median µs",
            "/ keystile",
            "/ keystile+dep",
            "direct, added vs bare µs",
            "requests",
        ),
        [
            (
                r["name"],
                fmt_us(r["median_us"]),
                fmt_us(r["p99_us"]),
                f"{r['ratio_to_keystile']:,.1f}x",
                f"{r['ratio_to_keystile_dep']:,.1f}x",
                fmt_us(r["direct_median_us"]),
                f"{r['direct_ratio_to_keystile']:,.1f}x",
                f"{r['direct_ratio_to_keystile_dep']:,.1f}x",
                fmt_us(r.get("direct_added_us", float("nan"))),
                str(r["requests"]),
            )
            for r in results
        ],
    )
    print("Configurations:")
    for r in results:
        print(f"  - {r['name']}: {r['description']}")
    print()
    targets = []
    for r in results:
        if r["name"] in TARGET_PEERS:
            note = (
                f"direct vs keystile alone {r['direct_ratio_to_keystile']:,.1f}x; through httpx "
                f"{r['ratio_to_keystile_dep']:,.1f}x / {r['ratio_to_keystile']:,.1f}x"
            )
            if bare is not None:
                note += f"; ceiling (peer / bare, httpx) {r['median_us'] / bare['median_us']:,.1f}x"
            if n_keys != 1_000:
                note += f"; at {n_keys:,} keys"
            targets.append(
                Target(
                    "peers",
                    f"faster than {r['name']} (direct ASGI, vs keystile+CurrentKey)",
                    r["direct_ratio_to_keystile_dep"],
                    PEER_TARGET,
                    "x",
                    at_least=True,
                    note=note,
                )
            )
    return {"keys": n_keys, "results": results}, targets
