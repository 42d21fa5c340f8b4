"""Floods of bad keys must not starve valid cached requests.

Drives ``APIKeyMiddleware`` in-process over raw ASGI (no HTTP client in the way), with
the production argon2 parameters, on one event loop as one uvicorn worker would. Valid,
cached keys arrive at a steady rate while a flood arrives at a higher one, each request
its own task (as each would be its own connection), of:

* ``wrong-secret``: real key ids with fresh wrong secrets (valid checksums), so every
  one is a store read plus an argon2 verification (the negative cache cannot help);
* ``unknown``: fresh well-formed keys with random ids (a store read, no argon2);
* ``both``: half and half.

Reported per scenario: valid-request latency p50/p99/max against idle, flood requests
answered and how (401 / 503), how fast the 503s came back, the most argon2
verifications admitted at once (``argon2_in_flight``, bounded by
``max_pending_verifications``) and the most running at once in threads (bounded by
``argon2_concurrency``).

    python benchmarks/flood.py            # 3 s per scenario, flood at 3 000/s
    python benchmarks/flood.py --seconds 10 --flood-rate 8000
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from asgi import call_once, http_scope, ok_app
from harness import Target, cli, median, p99, print_table

from keystile import DEFAULT_PARAMETERS, APIKeyMiddleware, KeyManager, MemoryKeyStore
from keystile.tokens import generate_key


class CountingHasher:
    """Wraps the verifier's hasher to count argon2 verifications running at once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            result: tuple[bool, str | None] = self.inner.verify(secret_hash, secret)
            return result
        finally:
            with self._lock:
                self.running -= 1

    def hash(self, secret: str) -> str:
        result: str = self.inner.hash(secret)
        return result


async def call(app: APIKeyMiddleware, token: str) -> int:
    status, _ = await call_once(app, http_scope("/", headers=[(b"x-api-key", token.encode())]))
    return status


@dataclass
class Result:
    scenario: str
    valid: list[float] = field(default_factory=list)
    valid_wrong: int = 0
    flood: Counter[int] = field(default_factory=Counter)
    refused_latency: list[float] = field(default_factory=list)
    max_in_flight: int = 0
    max_threads: int = 0


async def scenario(
    name: str,
    app: APIKeyMiddleware,
    hasher: CountingHasher,
    valid: list[str],
    real_ids: list[str],
    *,
    seconds: float,
    legit_rate: float,
    flood_rate: float,
) -> Result:
    """Open-loop: requests arrive on a schedule, each as its own task (a connection), and
    a request's latency runs from its scheduled arrival, so time spent waiting for the
    event loop behind the flood counts."""
    result = Result(name)
    hasher.max_running = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending: set[asyncio.Task[None]] = set()

    async def valid_request(due: float, token: str) -> None:
        status = await call(app, token)
        result.valid.append(loop.time() - due)
        result.valid_wrong += status != 200

    async def flood_request(due: float, n: int) -> None:
        kind = name if name != "both" else ("wrong-secret", "unknown")[n % 2]
        if kind == "wrong-secret":
            token = generate_key(key_id=real_ids[n % len(real_ids)])[0]
        else:
            token = generate_key()[0]
        status = await call(app, token)
        result.flood[status] += 1
        if status == 503:
            result.refused_latency.append(loop.time() - due)

    async def arrivals(rate: float, make: Any) -> None:
        n = 0
        while True:
            due = started + n / rate
            if due >= started + seconds:
                return
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            task = asyncio.create_task(make(due, n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1

    async def monitor() -> None:
        while loop.time() < started + seconds or pending:
            result.max_in_flight = max(result.max_in_flight, app.verifier.argon2_in_flight)
            await asyncio.sleep(0)

    streams = [arrivals(legit_rate, lambda due, n: valid_request(due, valid[n % len(valid)]))]
    if name != "idle":
        streams.append(arrivals(flood_rate, flood_request))
    await asyncio.gather(monitor(), *streams)
    while pending:
        await asyncio.gather(*list(pending))
    result.max_threads = hasher.max_running
    return result


def _us(seconds: list[float], stat: Any) -> float:
    return stat([v * 1e6 for v in seconds]) if seconds else 0.0


async def _run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    store = MemoryKeyStore()
    manager = KeyManager(store)  # production argon2 parameters
    keys = [await manager.create(owner="bench", name=f"k{i}") for i in range(args.keys)]
    app = APIKeyMiddleware(ok_app, store=store, negative_ttl=30.0)
    hasher = CountingHasher(app.verifier.hasher)
    app.verifier.hasher = hasher  # type: ignore[assignment]
    valid = [k.key for k in keys]
    real_ids = [k.id for k in keys]
    for token in valid:  # warm the cache: every valid key proven once
        assert await call(app, token) == 200

    seconds = args.seconds or (1.0 if args.quick else 3.0)
    print(
        f"flood benchmark: {args.keys} cached valid keys; valid requests at "
        f"{args.legit_rate:.0f}/s, flood at {args.flood_rate:.0f}/s; "
        f"{seconds:g} s per scenario; argon2 "
        f"t={DEFAULT_PARAMETERS.time_cost} m={DEFAULT_PARAMETERS.memory_cost} KiB, "
        f"argon2_concurrency={app.verifier.argon2_concurrency}, "
        f"max_pending_verifications={app.verifier.max_pending_verifications}"
    )
    scenarios = {}
    for name in ("idle", "wrong-secret", "unknown", "both"):
        r = await scenario(
            name,
            app,
            hasher,
            valid,
            real_ids,
            seconds=seconds,
            legit_rate=args.legit_rate,
            flood_rate=args.flood_rate,
        )
        scenarios[name] = {
            "valid_requests": len(r.valid),
            "valid_p50_us": _us(r.valid, median),
            "valid_p99_us": _us(r.valid, p99),
            "valid_max_us": _us(r.valid, max),
            "valid_answered_wrong": r.valid_wrong,
            "flood_requests": sum(r.flood.values()),
            "flood_statuses": dict(r.flood),
            "refused_p50_us": _us(r.refused_latency, median),
            "refused_p99_us": _us(r.refused_latency, p99),
            "argon2_admitted_max": r.max_in_flight,
            "argon2_threads_max": r.max_threads,
        }
    idle_p99 = scenarios["idle"]["valid_p99_us"]
    print_table(
        f"Valid cached requests under a flood of bad keys ({args.flood_rate:.0f}/s), µs",
        (
            "scenario",
            "valid req",
            "p50",
            "p99",
            "max",
            "p99/idle",
            "wrong",
            "flood req",
            "401",
            "503",
            "503 p50",
            "503 p99",
            "in flight",
            "threads",
        ),
        [
            (
                name,
                str(s["valid_requests"]),
                f"{s['valid_p50_us']:.0f}",
                f"{s['valid_p99_us']:.0f}",
                f"{s['valid_max_us']:.0f}",
                f"{s['valid_p99_us'] / idle_p99:.1f}",
                str(s["valid_answered_wrong"]),
                str(s["flood_requests"]),
                str(s["flood_statuses"].get(401, 0)),
                str(s["flood_statuses"].get(503, 0)),
                f"{s['refused_p50_us']:.0f}",
                f"{s['refused_p99_us']:.0f}",
                str(s["argon2_admitted_max"]),
                str(s["argon2_threads_max"]),
            )
            for name, s in scenarios.items()
        ],
    )
    others = set().union(*(s["flood_statuses"] for s in scenarios.values())) - {401, 503}
    print(f"flood statuses other than 401/503: {sorted(others) or 'none'}")
    stats = app.stats()
    print(
        f"argon2 verifications {stats.argon2_verifications} "
        f"({stats.argon2_seconds / max(stats.argon2_verifications, 1) * 1e3:.1f} ms each); "
        f"rejects {dict(stats.rejects)}"
    )
    await app.aclose()
    return {"seconds": seconds, "scenarios": scenarios}, []


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, help="per scenario (default 3; --quick 1)")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--legit-rate", type=float, default=500.0, help="valid requests/s")
    parser.add_argument("--flood-rate", type=float, default=3000.0, help="bad requests/s")


if __name__ == "__main__":
    raise SystemExit(
        cli("flood", __doc__, lambda args: asyncio.run(_run(args)), configure=_options)
    )
