"""Cold start under uvicorn workers: CPU seconds per key per worker, and the wall time to
warm N keys with 1, 2 and 4 workers.

A SQLite database holds N active keys at keystile's default argon2 parameters (one
secret shared by all keys, so minting them costs one hash, not N; verifying each key
still costs a full argon2 verification). ``uvicorn --workers W`` serves a Starlette route
behind ``APIKeyMiddleware``; 64 concurrent clients (``loadgen.py``, keep-alive) send each key's
first request, retrying a 503 from the argon2 guard (counted). Measured: the wall time
until every key has answered 200, and the CPU time of all worker processes over that
window divided by N (each key is proven once, by the worker its first request reached).

    python benchmarks/coldstart.py [KEYS]        # 10 000 keys (--quick: 500)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import tempfile
import time
import zlib
from datetime import datetime, timezone
from typing import Any

import psutil
from asgi import uvicorn, wait_http
from harness import Target, cli, print_table
from loadgen import send_all

from keystile import DEFAULT_PARAMETERS, KeyRecord
from keystile.hashing import SecretHasher
from keystile.stores import store_from_url
from keystile.tokens import CHECKSUM_LENGTH, _base62, new_key_id

__all__ = ["fill_keys", "run_coldstart", "warm", "workers_cpu"]

CLIENTS = 64
WORKERS = (1, 2, 4)
APP = """
import os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from keystile import APIKeyMiddleware

async def ping(request):
    return PlainTextResponse("pong")

app = Starlette(routes=[Route("/ping", ping)])
app.add_middleware(APIKeyMiddleware, database_url=os.environ["KEYSTILE_DATABASE_URL"])
"""


def _token(key_id: str, secret: str) -> str:
    body = f"ks_{key_id}_{secret}"
    return body + _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


async def fill_keys(url: str, n: int) -> list[str]:
    """``n`` active keys at keystile's default argon2 parameters in the store at ``url``,
    all with one secret (minting costs one hash); their tokens."""
    secret = "S" * 43
    secret_hash = SecretHasher(DEFAULT_PARAMETERS).hash(secret)
    store = store_from_url(url)
    await store.open()
    tokens = []
    now = datetime.now(timezone.utc)
    try:
        for i in range(n):
            key_id = new_key_id()
            await store.insert(
                KeyRecord(
                    id=key_id,
                    owner="bench",
                    name=f"k{i}",
                    prefix="ks",
                    secret_hash=secret_hash,
                    scopes=(),
                    created_at=now,
                )
            )
            tokens.append(_token(key_id, secret))
    finally:
        await store.close()
    return tokens


async def warm(order: list[tuple[str, str]]) -> tuple[float, int]:
    """GET every ``(url, token)`` of ``order`` with CLIENTS concurrent clients until it
    answers 200 (``loadgen.py``: a 503 or a dropped connection is retried); the wall time
    and the retries."""
    return await send_all(order, CLIENTS)


def workers_cpu(master: psutil.Process) -> float:
    """CPU of the uvicorn process and its workers (one worker: no child processes)."""
    total = 0.0
    for child in [master, *master.children(recursive=True)]:
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _one(tmp: str, n: int, workers: int) -> dict[str, float]:
    url = f"sqlite:///{pathlib.Path(tmp) / f'cold-{workers}.db'}"
    tokens = asyncio.run(fill_keys(url, n))
    (pathlib.Path(tmp) / "coldapp.py").write_text(APP)
    env = {"KEYSTILE_DATABASE_URL": url}
    # With every core busy with argon2, the load generator can be starved for seconds: a
    # worker would miss uvicorn's 5 s health check and be killed, or close a keep-alive
    # connection after 5 s idle just as the next request goes out on it. Two minutes each.
    options = (
        *("--workers", str(workers)),
        *("--timeout-worker-healthcheck", "120", "--timeout-keep-alive", "120"),
    )
    with uvicorn("coldapp:app", app_dir=tmp, env=env, options=options) as (process, base):
        ping = f"{base}/ping"
        if (first := wait_http(ping, process)).status_code != 401:
            raise RuntimeError(f"GET /ping without a key answered {first.status_code}")
        time.sleep(1.0)  # every worker up
        master = psutil.Process(process.pid)
        before = workers_cpu(master)
        wall, retried = asyncio.run(warm([(ping, token) for token in tokens]))
        cpu = workers_cpu(master) - before
    return {
        "workers": workers,
        "keys": n,
        "wall_s": wall,
        "worker_cpu_s": cpu,
        "cpu_ms_per_key": cpu / n * 1e3,
        "retried_503": retried,
    }


def run_coldstart(
    n: int = 10_000, workers: tuple[int, ...] = WORKERS
) -> tuple[dict[str, Any], list[Target]]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="keystile-cold-") as tmp:
        for w in workers:
            print(f"  cold start: {n:,} keys, {w} worker(s), {CLIENTS} clients ...", flush=True)
            runs.append(_one(tmp, n, w))
    print_table(
        f"Cold start under uvicorn: {n:,} keys, first request of each, {CLIENTS} clients "
        f"(SQLite, default argon2, {os.cpu_count()} CPUs)",
        ("workers", "wall time to warm", "worker CPU", "CPU ms per key", "retried"),
        [
            (
                str(r["workers"]),
                f"{r['wall_s']:.1f} s",
                f"{r['worker_cpu_s']:.1f} s",
                f"{r['cpu_ms_per_key']:.2f}",
                str(r["retried_503"]),
            )
            for r in runs
        ],
    )
    return {"keys": n, "clients": CLIENTS, "runs": runs}, []


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "keys", type=int, nargs="?", help="active keys (default 10000; --quick 500)"
    )


if __name__ == "__main__":
    raise SystemExit(
        cli(
            "cold",
            __doc__,
            lambda args: run_coldstart(args.keys or (500 if args.quick else 10_000)),
            configure=_options,
        )
    )
