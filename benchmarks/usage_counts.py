"""Per-key usage counting: its cost on the hit path, and the statements a flush issues.

1. Hit path. ``APIKeyMiddleware`` over a trivial ASGI app, called directly (no HTTP),
   1 000 keys all cached, keys taken round-robin. Two arms of the same build: counting on
   (``UsageRecorder.count_usage = True``, the default) and off (``False``: ``touch``
   writes ``last_used_at`` alone). Samples of ``--batch`` requests alternate between the
   arms; reported are the medians of µs per request and the difference. Target: at most
   3 %.
2. Flush statements (with ``--postgres-url``). The same traffic, plus a wrong secret per
   key, against Postgres in a schema of its own (dropped at the end); statement-level
   triggers count the UPDATEs of ``keystile_keys`` and the INSERTs into
   ``keystile_usage`` Postgres itself saw per flush. Target: one of each per flush.

::

    python benchmarks/usage_counts.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import uuid
from typing import Any

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, generate_key
from keystile.stores import store_from_url

KEYS = 1_000
TARGET_PCT = 3.0


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    return None


def scope_for(key: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 50000),
    }


async def mint_keys(url: str, n: int) -> list[tuple[str, str]]:
    async with KeyManager(store_from_url(url), argon2=CHEAPEST_PARAMETERS) as keys:
        minted = []
        for i in range(n):
            created = await keys.create(owner="bench", name=f"k{i}")
            minted.append((created.key, created.id))
        return minted


async def batch(app: APIKeyMiddleware, headers: list[list[tuple[bytes, bytes]]]) -> float:
    """µs per request over one pass of ``headers`` (one request per key)."""
    perf = time.perf_counter_ns
    gc.disable()
    try:
        t0 = perf()
        for h in headers:
            await app(
                {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": h},
                receive,
                send,
            )
        return (perf() - t0) / len(headers) / 1_000
    finally:
        gc.enable()


async def hit_path(samples: int, rounds: int) -> tuple[float, float, float, float]:
    url = f"memory://bench-{uuid.uuid4().hex}"
    minted = await mint_keys(url, KEYS)
    # Two middlewares (two runtimes: their flush intervals differ), one per arm, each
    # left as built: switching one recorder back and forth would disturb the attribute
    # caches of the interpreter and measure the switch, not the counting.
    # A third arm, counting on like the first: the A/A control, which shows how far two
    # identical middlewares differ on this machine before any difference is read as cost.
    apps: dict[Any, APIKeyMiddleware] = {
        arm: APIKeyMiddleware(
            ok_app,
            database_url=url,
            argon2=CHEAPEST_PARAMETERS,
            flush_interval=3600 + index,
            flush_max=10_000_000,
        )
        for index, arm in enumerate((True, False, "control"))
    }
    apps[False].recorder.count_usage = False
    assert len({id(app.runtime) for app in apps.values()}) == 3
    headers = [scope_for(key)["headers"] for key, _ in minted]
    for app in apps.values():
        for h in headers:  # every key cached
            await app({**scope_for("x"), "headers": list(h)}, receive, send)
    on: list[float] = []
    off: list[float] = []
    ratios: list[float] = []
    controls: list[float] = []
    for i in range(samples):
        # ABCCBA within a sample, so a load spike hits every arm alike; the order alternates.
        order: tuple[Any, ...] = (False, True, "control")
        arms = (*order, *reversed(order)) if i % 2 == 0 else (*reversed(order), *order)
        times: dict[Any, float] = {True: 0.0, False: 0.0, "control": 0.0}
        for arm in arms:
            times[arm] += min(
                [await batch(apps[arm], [list(h) for h in headers]) for _ in range(rounds)]
            )
        on.append(times[True] / 2)
        off.append(times[False] / 2)
        ratios.append(times[True] / times[False])
        controls.append(times["control"] / times[True])
        for app in apps.values():
            await app.recorder.flush()
    for app in apps.values():
        await app.aclose()
    return (
        statistics.median(on),
        statistics.median(off),
        statistics.median(ratios),
        statistics.median(controls),
    )


async def flush_statements(postgres_url: str, requests_per_key: int) -> None:
    import asyncpg

    schema = f"bench_usage_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    raw = await asyncpg.connect(postgres_url)
    q = f'"{schema}"'
    try:
        minted = await mint_keys(url, KEYS)
        await raw.execute(
            f"""
            CREATE TABLE {q}.statements (kind text PRIMARY KEY, n bigint NOT NULL);
            INSERT INTO {q}.statements VALUES ('update', 0), ('insert', 0);
            CREATE FUNCTION {q}.count_update() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN UPDATE {q}.statements SET n = n + 1 WHERE kind = 'update'; RETURN NULL; END $$;
            CREATE FUNCTION {q}.count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN UPDATE {q}.statements SET n = n + 1 WHERE kind = 'insert'; RETURN NULL; END $$;
            CREATE TRIGGER count_updates AFTER UPDATE ON {q}.keystile_keys
                FOR EACH STATEMENT EXECUTE FUNCTION {q}.count_update();
            CREATE TRIGGER count_inserts AFTER INSERT ON {q}.keystile_usage
                FOR EACH STATEMENT EXECUTE FUNCTION {q}.count_insert();
            """
        )
        app = APIKeyMiddleware(
            ok_app,
            database_url=url,
            argon2=CHEAPEST_PARAMETERS,
            flush_interval=3600,
            flush_max=10_000_000,
        )
        flushes = 3
        sent = rejected = 0
        for _ in range(flushes):
            for _ in range(requests_per_key):
                for key, _ in minted:
                    await app(scope_for(key), receive, send)
                    sent += 1
            for _, key_id in minted:
                await app(scope_for(generate_key(key_id=key_id)[0]), receive, send)
                rejected += 1
            await app.recorder.flush()
        counts = dict(await raw.fetch(f"SELECT kind, n FROM {q}.statements"))
        stored = await raw.fetchrow(
            f"SELECT sum(requests) AS r, sum(rejected) AS j FROM {q}.keystile_usage"
        )
        await app.aclose()
        print(
            f"\nflush statements (Postgres, {KEYS} keys, {flushes} flushes, {sent} requests,"
            f" {rejected} wrong secrets):"
        )
        print(
            f"  UPDATE keystile_keys:   {counts['update']} ({counts['update'] / flushes:g} per flush)"
        )
        print(
            f"  INSERT keystile_usage:  {counts['insert']} ({counts['insert'] / flushes:g} per flush)"
        )
        print(f"  stored: {stored['r']} requests, {stored['j']} rejected")
        ok = counts["update"] == flushes and counts["insert"] == flushes
        ok &= (stored["r"], stored["j"]) == (sent, rejected)
        print(f"  one statement per kind per flush: {'yes' if ok else 'NO'}")
    finally:
        await raw.execute(f"DROP SCHEMA IF EXISTS {q} CASCADE")
        await raw.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=101, help="samples per arm")
    parser.add_argument("--rounds", type=int, default=3, help="passes per sample (min kept)")
    parser.add_argument("--postgres-url", help="also count the statements of a flush")
    parser.add_argument("--requests-per-key", type=int, default=5)
    args = parser.parse_args()
    on, off, ratio, control = await hit_path(args.samples, args.rounds)
    cost = (ratio - 1) * 100
    print(f"hit path, {KEYS} cached keys, direct ASGI, median of {args.samples} samples per arm:")
    print(f"  counting off: {off:.3f} µs/request")
    print(f"  counting on:  {on:.3f} µs/request")
    verdict = "within" if cost <= TARGET_PCT else "OVER"
    print(
        f"  cost of counting (median of the per-sample on/off ratios): {cost:+.2f} %"
        f" ({verdict} the {TARGET_PCT:g} % target)"
    )
    print(
        f"  A/A control (a second middleware counting, against the first): "
        f"{(control - 1) * 100:+.2f} %"
    )
    if args.postgres_url:
        await flush_statements(args.postgres_url, args.requests_per_key)


if __name__ == "__main__":
    asyncio.run(main())
