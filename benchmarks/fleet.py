"""Fleet warm-up on one Redis: N keys served by every one of 4 uvicorn workers, with and
without the verification memo, in the same run.

Postgres (``--postgres-url``, a schema of its own, dropped afterwards; a fleet's store) or
else a SQLite file holds N active keys at keystile's default argon2 parameters (one secret
shared by all keys, so minting costs one hash; every verification still costs a full
argon2 run). Each arm starts 4 uvicorn processes of one worker each (a fleet: every
process has its own runtime and cache, as ``uvicorn --workers 4`` gives, but each on a
port of its own, so the load generator can send every key to every worker), all pinned
to the last CPU and the load generator to the first (``taskset``, as in ``server.py``).
The arms:

* ``without memo``: as keystile runs with no ``verification_memo``;
* ``with memo``: ``verification_memo`` on the Redis of ``--redis-url`` (a key prefix of
  its own, deleted afterwards), the secret from ``KEYSTILE_MEMO_SECRET``.

64 concurrent clients (``loadgen.py``, keep-alive) send the 4 x N requests (every key to every
worker) in one shuffled order, the same in both arms, retrying a 503 from the argon2
guard or a dropped connection (counted). Measured per arm: argon2 verifications and memo hits summed from each
worker's ``/stats``, the wall time until every worker has answered every key with 200,
the CPU time of the 4 workers over that window (``psutil``) and Redis's own CPU
(``INFO cpu``, the whole server); then the same requests again, all cache hits, for the
CPU a request costs without any miss. Targets, for any N: at most 1.05 x N argon2 runs with the
memo (10 500 at 10 000 keys, 40 000 without), and at most a third of the CPU.

    python benchmarks/fleet.py [KEYS] [--redis-url URL] [--postgres-url URL]
                                                # 10 000 keys (--quick: 100)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import random
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
from asgi import uvicorn, wait_http
from coldstart import fill_keys, warm, workers_cpu
from harness import Target, cli, median, print_table
from server import CLIENT_CPU, PINNED, SERVER_CPU

__all__ = ["run_fleet"]

WORKERS = 4
CLIENTS = 64
#: Argon2 runs allowed with the memo, per key: the first proof, and a few raced ones.
ARGON2_PER_KEY_TARGET = 1.05
CPU_RATIO_TARGET = 1 / 3
DEFAULT_REDIS_URL = os.environ.get("KEYSTILE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_POSTGRES_URL = os.environ.get("KEYSTILE_BENCH_POSTGRES_URL")
ARMS = ("without memo", "with memo")
APP = """
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from keystile import APIKeyMiddleware

async def ping(request):
    return PlainTextResponse("pong")

async def stats(request):
    return JSONResponse(request.scope["keystile"].stats().as_dict())

app = Starlette(routes=[Route("/ping", ping), Route("/stats", stats)])
app.add_middleware(
    APIKeyMiddleware,
    database_url=os.environ["KEYSTILE_DATABASE_URL"],
    exempt_paths=["/stats"],
    verification_memo=os.environ.get("KEYSTILE_BENCH_MEMO") or None,
)
"""


@contextlib.contextmanager
def _fleet(tmp: str, env: dict[str, str]) -> Iterator[list[tuple[psutil.Process, str]]]:
    """WORKERS uvicorn processes of the fleet app, each checked (401 without a key)."""
    # As in coldstart.py: with every core on argon2, the load generator may be starved for
    # seconds; keep-alive connections must not close under it.
    options = ("--timeout-keep-alive", "120")
    prefix = ("taskset", "-c", str(SERVER_CPU)) if PINNED else ()
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(
                uvicorn("fleetapp:app", app_dir=tmp, env=env, options=options, prefix=prefix)
            )
            for _ in range(WORKERS)
        ]
        for process, base in started:
            if (first := wait_http(f"{base}/ping", process)).status_code != 401:
                raise RuntimeError(f"GET /ping without a key answered {first.status_code}")
        yield [(psutil.Process(process.pid), base) for process, base in started]


@contextlib.contextmanager
def _database(tmp: str, postgres_url: str | None) -> Iterator[str]:
    """The store's URL: a Postgres schema of its own (dropped afterwards), else SQLite."""
    if postgres_url is None:
        yield f"sqlite:///{pathlib.Path(tmp) / 'fleet.db'}"
        return
    schema = f"keystile_fleet_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in postgres_url else "?"
    try:
        yield f"{postgres_url}{sep}schema={schema}"
    finally:

        async def drop() -> None:
            import asyncpg

            conn = await asyncpg.connect(postgres_url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


@contextlib.contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    """This process (the load generator) on ``cpu`` meanwhile, when the workers are pinned
    to another: unpinned, they take each other's core at the scheduler's whim."""
    if not PINNED:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _redis_cpu(url: str) -> float:
    import redis

    conn = redis.Redis.from_url(url)
    try:
        info = conn.info("cpu")
    finally:
        conn.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _drop_prefix(url: str, prefix: str) -> None:
    import redis

    conn = redis.Redis.from_url(url)
    try:
        keys = list(conn.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            conn.delete(*keys[start : start + 1000])
    finally:
        conn.close()


def _arm(
    tmp: str, database_url: str, tokens: list[str], memo_url: str | None, redis_url: str
) -> dict[str, Any]:
    env = {
        "KEYSTILE_DATABASE_URL": database_url,
        "KEYSTILE_BENCH_MEMO": memo_url or "",
        "KEYSTILE_MEMO_SECRET": secrets.token_urlsafe(32),
    }
    with _fleet(tmp, env) as workers:
        order = [(f"{base}/ping", token) for token in tokens for _, base in workers]
        random.Random(len(tokens)).shuffle(order)
        cpu_before = [workers_cpu(process) for process, _ in workers]
        redis_before = _redis_cpu(redis_url)
        with _pinned(CLIENT_CPU):
            wall, retried = asyncio.run(warm(order))
        cpu = [
            workers_cpu(process) - before
            for (process, _), before in zip(workers, cpu_before, strict=True)
        ]
        redis_cpu = _redis_cpu(redis_url) - redis_before
        stats = [httpx.get(f"{base}/stats", timeout=30).json() for _, base in workers]
        hits_before = sum(workers_cpu(process) for process, _ in workers)
        with _pinned(CLIENT_CPU):
            asyncio.run(warm(order))
        hit_pass = sum(workers_cpu(process) for process, _ in workers) - hits_before
    return {
        "wall_s": wall,
        "served": len(order),
        "retried_503": retried,
        "argon2_per_worker": [s["argon2_verifications"] for s in stats],
        "argon2": sum(s["argon2_verifications"] for s in stats),
        "argon2_seconds": sum(s["argon2_seconds"] for s in stats),
        "memo_hits": sum(s["memo_hits"] for s in stats),
        "memo_misses": sum(s["memo_misses"] for s in stats),
        "memo_errors": sum(s["memo_errors"] for s in stats),
        "worker_cpu_per_worker_s": cpu,
        "worker_cpu_s": sum(cpu),
        "redis_cpu_s": redis_cpu,
        "hit_pass_cpu_s": hit_pass,
    }


def run_fleet(
    n: int = 10_000,
    *,
    redis_url: str = DEFAULT_REDIS_URL,
    postgres_url: str | None = DEFAULT_POSTGRES_URL,
    rounds: int = 1,
) -> tuple[dict[str, Any], list[Target]]:
    """Both arms, ``rounds`` times (the order swapped every other round)."""
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    prefix = f"keystile-bench-{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in redis_url else "?"
    store = "Postgres" if postgres_url else "SQLite"
    with (
        tempfile.TemporaryDirectory(prefix="keystile-fleet-") as tmp,
        _database(tmp, postgres_url) as database_url,
    ):
        (pathlib.Path(tmp) / "fleetapp.py").write_text(APP)
        print(f"  fleet: minting {n:,} keys ...", flush=True)
        tokens = asyncio.run(fill_keys(database_url, n))
        try:
            for round_ in range(rounds):
                for arm in ARMS if round_ % 2 == 0 else ARMS[::-1]:
                    memo_url = (
                        f"{redis_url}{sep}key_prefix={prefix}-{round_}"
                        if arm == "with memo"
                        else None
                    )
                    print(f"  fleet: {n:,} keys x {WORKERS} workers, {arm} ...", flush=True)
                    runs[arm].append(_arm(tmp, database_url, tokens, memo_url, redis_url))
        finally:
            for round_ in range(rounds):
                _drop_prefix(redis_url, f"{prefix}-{round_}")
    summary = {
        arm: {
            key: median([r[key] for r in arm_runs])
            for key in (
                "argon2",
                "memo_hits",
                "wall_s",
                "worker_cpu_s",
                "redis_cpu_s",
                "hit_pass_cpu_s",
            )
        }
        for arm, arm_runs in runs.items()
    }
    without, with_memo = summary["without memo"], summary["with memo"]
    cpu_ratio = with_memo["worker_cpu_s"] / without["worker_cpu_s"]
    cpu_ratio_redis = (with_memo["worker_cpu_s"] + with_memo["redis_cpu_s"]) / (
        without["worker_cpu_s"] + without["redis_cpu_s"]
    )
    print_table(
        f"Fleet warm-up: {n:,} keys, every key to each of {WORKERS} uvicorn workers, "
        f"{CLIENTS} clients ({store}, default argon2, {os.cpu_count()} CPUs, one Redis)",
        (
            "arm",
            "argon2 runs",
            "per worker",
            "memo hits",
            "wall",
            "worker CPU",
            "Redis CPU",
            "retried",
        ),
        [
            (
                arm,
                f"{r['argon2']:,}",
                " / ".join(f"{a:,}" for a in r["argon2_per_worker"]),
                f"{r['memo_hits']:,}",
                f"{r['wall_s']:.1f} s",
                f"{r['worker_cpu_s']:.1f} s",
                f"{r['redis_cpu_s']:.2f} s",
                str(r["retried_503"]),
            )
            for arm in ARMS
            for r in runs[arm]
        ],
    )
    # Worker CPU per request: an argon2 miss (the arm without the memo), a cache hit (the
    # second pass), and what is left per memo-verified miss once the argon2 runs are paid.
    per_argon2 = without["worker_cpu_s"] / (WORKERS * n)
    per_hit = with_memo["hit_pass_cpu_s"] / (WORKERS * n)
    per_memo_hit = (with_memo["worker_cpu_s"] - with_memo["argon2"] * per_argon2) / max(
        1, with_memo["memo_hits"]
    )
    floor = (with_memo["argon2"] * per_argon2 + with_memo["memo_hits"] * per_hit) / without[
        "worker_cpu_s"
    ]
    print(
        f"  worker CPU with / without the memo: {cpu_ratio:.3f} "
        f"({cpu_ratio_redis:.3f} counting Redis's CPU, which other clients of it share)\n"
        f"  worker CPU per request: {per_argon2 * 1e3:.2f} ms an argon2 miss, "
        f"{per_memo_hit * 1e3:.2f} ms a miss the memo answered (store read, Redis round trip), "
        f"{per_hit * 1e3:.2f} ms a cache hit (the same requests again); the ratio if the "
        f"memo's misses cost a cache hit: {floor:.3f}"
    )
    targets = [
        Target(
            "fleet",
            f"argon2 runs, {n:,} keys x {WORKERS} workers, with the memo",
            with_memo["argon2"],
            round(ARGON2_PER_KEY_TARGET * n),
            "runs",
            note=f"{without['argon2']:,.0f} without the memo",
        ),
        Target(
            "fleet",
            "worker CPU of the warm-up, with / without the memo",
            cpu_ratio,
            CPU_RATIO_TARGET,
            "x",
            note=f"{cpu_ratio_redis:.3f} counting Redis's CPU",
        ),
    ]
    data = {
        "keys": n,
        "store": store,
        "workers": WORKERS,
        "clients": CLIENTS,
        "runs": runs,
        "summary": summary,
        "cpu_ratio": cpu_ratio,
        "cpu_ratio_with_redis": cpu_ratio_redis,
        "cpu_ms_per_request": {
            "argon2_miss": per_argon2 * 1e3,
            "memo_answered_miss": per_memo_hit * 1e3,
            "cache_hit": per_hit * 1e3,
        },
        "cpu_ratio_if_memo_misses_cost_a_hit": floor,
    }
    return data, targets


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "keys", type=int, nargs="?", help="active keys (default 10000; --quick 100)"
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="the Redis of the memo (default $KEYSTILE_BENCH_REDIS_URL or "
        "redis://127.0.0.1:6379/0); the run works under a key prefix of its own",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="the key store (default $KEYSTILE_BENCH_POSTGRES_URL; a schema of its own, "
        "dropped afterwards); without it, a SQLite file",
    )


if __name__ == "__main__":
    raise SystemExit(
        cli(
            "fleet",
            __doc__,
            lambda args: run_fleet(
                args.keys or (100 if args.quick else 10_000),
                redis_url=args.redis_url,
                postgres_url=args.postgres_url,
                rounds=args.rounds or 1,
            ),
            configure=_options,
        )
    )
