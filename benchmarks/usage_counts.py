"""Per-key usage counting: its cost on the hit path, and the statements a flush issues.

1. Hit path. ``APIKeyMiddleware`` over a trivial ASGI app, called directly (no HTTP),
   1 000 keys all cached, keys taken round-robin. Two arms of the same build: counting on
   (``UsageRecorder.count_usage = True``, the default) and off (``False``: ``touch``
   writes ``last_used_at`` alone), and an A/A control (a third middleware counting, like
   the first). Rounds are interleaved ABBA; a sample is the best of ``--passes`` passes
   over the 1 000 keys. Reported: the medians of µs per request and the median of the
   round-by-round on/off ratios. Target: at most 3 %.
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
import uuid
from typing import Any

from asgi import discard, http_scope, ok_app, receive, time_asgi
from harness import Target, cli, compare, fmt_us, interleave_async, print_table

from apps import count_statements, counted, mint, postgres_schema
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware
from keystile.tokens import generate_key

KEYS = 1_000
TARGET_PCT = 3.0
FLUSHES = 3


def scope_for(key: str) -> dict[str, Any]:
    return http_scope("/", headers=[(b"host", b"bench"), (b"x-api-key", key.encode())])


def middleware(url: str, **options: Any) -> APIKeyMiddleware:
    return APIKeyMiddleware(
        ok_app, database_url=url, argon2=CHEAPEST_PARAMETERS, flush_max=10_000_000, **options
    )


async def hit_path(rounds: int, passes: int) -> dict[str, Any]:
    url = f"memory://bench-{uuid.uuid4().hex}"
    scopes = [scope_for(k.key) for k in await mint(url, KEYS)]
    # One middleware per arm (three runtimes: their flush intervals differ), each left as
    # built: switching one recorder back and forth would disturb the attribute caches of
    # the interpreter and measure the switch, not the counting.
    apps = {
        arm: middleware(url, flush_interval=3600 + index)
        for index, arm in enumerate(("on", "off", "control"))
    }
    apps["off"].recorder.count_usage = False
    assert len({id(app.runtime) for app in apps.values()}) == 3
    for app in apps.values():
        await time_asgi(app, scopes)  # every key cached

    def sample(app: APIKeyMiddleware) -> Any:
        async def best_pass() -> float:
            best = min([await time_asgi(app, scopes, gc_off=True) for _ in range(passes)])
            await app.recorder.flush()
            return best

        return best_pass

    samples = await interleave_async({arm: sample(app) for arm, app in apps.items()}, rounds)
    for app in apps.values():
        await app.aclose()
    on = compare(samples, "off")["on"]
    return {
        "rounds": rounds,
        "passes": passes,
        "on_us": on["median_us"],
        "off_us": compare(samples, "off")["off"]["median_us"],
        "cost_pct": (on["paired_ratio"] - 1) * 100,
        "aa_control_pct": (compare(samples, "on")["control"]["paired_ratio"] - 1) * 100,
    }


async def flush_statements(postgres_url: str, requests_per_key: int) -> dict[str, Any]:
    import asyncpg

    async with postgres_schema(postgres_url) as (url, schema):
        minted = await mint(url, KEYS)
        raw = await asyncpg.connect(postgres_url)
        try:
            await count_statements(
                raw,
                schema,
                {"update": "UPDATE ON keystile_keys", "insert": "INSERT ON keystile_usage"},
            )
            app = middleware(url, flush_interval=3600)
            sent = rejected = 0
            for _ in range(FLUSHES):
                for _ in range(requests_per_key):
                    for key in minted:
                        await app(scope_for(key.key), receive, discard)
                        sent += 1
                for key in minted:
                    await app(scope_for(generate_key(key_id=key.id)[0]), receive, discard)
                    rejected += 1
                await app.recorder.flush()
            counts = await counted(raw, schema)
            stored = await raw.fetchrow(
                f'SELECT sum(requests) AS r, sum(rejected) AS j FROM "{schema}".keystile_usage'
            )
            await app.aclose()
        finally:
            await raw.close()
    if (stored["r"], stored["j"]) != (sent, rejected):
        raise AssertionError(
            f"stored {stored['r']} requests, {stored['j']} rejected; sent {sent} and {rejected}"
        )
    return {"flushes": FLUSHES, "requests": sent, "rejected": rejected, "statements": counts}


def run_usage_counts(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    rounds = args.rounds or (21 if args.quick else 101)
    hit = asyncio.run(hit_path(rounds, args.passes))
    print_table(
        f"Usage counting on the hit path, {KEYS:,} cached keys, direct ASGI "
        f"({rounds} interleaved rounds, best of {args.passes} passes each)",
        ("arm", "µs per request", "cost of counting", "A/A control"),
        [
            ("counting off", fmt_us(hit["off_us"], 3), "-", "-"),
            (
                "counting on",
                fmt_us(hit["on_us"], 3),
                f"{hit['cost_pct']:+.2f} %",
                f"{hit['aa_control_pct']:+.2f} %",
            ),
        ],
    )
    results: dict[str, Any] = {"hit_path": hit}
    targets = [
        Target(
            "usage counts",
            "cost of counting on the hit path (median of paired ratios)",
            hit["cost_pct"],
            TARGET_PCT,
            "%",
            note=f"A/A control {hit['aa_control_pct']:+.2f} %",
        )
    ]
    if args.postgres_url:
        flush = asyncio.run(flush_statements(args.postgres_url, args.requests_per_key))
        results["flush"] = flush
        print(
            f"flush statements (Postgres, {KEYS} keys, {FLUSHES} flushes, "
            f"{flush['requests']} requests, {flush['rejected']} wrong secrets): stored as sent"
        )
        for kind, table in (
            ("update", "UPDATE keystile_keys"),
            ("insert", "INSERT keystile_usage"),
        ):
            targets.append(
                Target(
                    "usage counts",
                    f"{table} statements per flush",
                    flush["statements"][kind] / FLUSHES,
                    1,
                    "statements",
                )
            )
    return results, targets


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passes", type=int, default=3, help="passes per sample (best kept)")
    parser.add_argument("--postgres-url", help="also count the statements of a flush")
    parser.add_argument("--requests-per-key", type=int, default=5)


if __name__ == "__main__":
    raise SystemExit(cli("usage-counts", __doc__, run_usage_counts, configure=_options))
