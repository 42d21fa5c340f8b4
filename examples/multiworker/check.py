"""Automates README.md: uvicorn with 2 workers, a key revoked by the CLI, 401 everywhere.

For each round it mints a key with ``keystile create``, sends requests on fresh
connections until every worker pid has answered 200 (so every worker holds the key in
its cache), then runs ``keystile revoke`` while requests keep flowing, and measures, from
the key's ``revoked_at`` (set by the CLI just before its UPDATE commits), when each
worker answered its first 401, checking that no worker answers 200 after that. Its own
schema is created and dropped, so it never touches other keys. From the repository root::

    python examples/multiworker/check.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[2]
OWNER = "demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def keystile_command() -> list[str]:
    beside = Path(sys.executable).with_name("keystile")
    found = str(beside) if beside.exists() else shutil.which("keystile")
    if found is None:
        raise SystemExit("the keystile command is not installed (pip install -e .)")
    return [found]


async def cli(url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *keystile_command(),
        "--database-url",
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"keystile {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


class Traffic:
    """Requests on fresh connections (so the kernel spreads them over the workers)."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.key = key
        self.seen: list[tuple[float, str, int]] = []  # (time received, worker pid, status)

    async def one(self, client: httpx.AsyncClient) -> tuple[str, int]:
        r = await client.get("/whoami", headers={"Authorization": f"Bearer {self.key}"})
        if r.status_code not in (200, 401):
            raise SystemExit(f"unexpected {r.status_code}: {r.text}")
        pid = r.headers["x-worker-pid"]
        self.seen.append((time.time(), pid, r.status_code))
        return pid, r.status_code

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.base, limits=limits) as client:
            while not stop.is_set():
                await self.one(client)


async def until_every_worker(traffic: Traffic, workers: int, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len({pid for _, pid, s in traffic.seen if s == status}) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"not every one of {workers} workers answered {status} in {timeout}s")
        await asyncio.sleep(0.005)


async def one_round(url: str, base: str, workers: int, n: int) -> tuple[float, float]:
    """(last 200, every worker's first 401), in seconds after ``revoked_at``."""
    created = json.loads(
        await cli(url, "create", "--owner", OWNER, "--name", f"multi-{n}", "--json")
    )
    traffic = Traffic(base, created["key"])
    stop = asyncio.Event()
    senders = [asyncio.create_task(traffic.run(stop)) for _ in range(4)]
    try:
        await until_every_worker(traffic, workers, 200, timeout=30)
        await cli(url, "revoke", created["id"], "--owner", OWNER)
        await until_every_worker(traffic, workers, 401, timeout=5)
        await asyncio.sleep(0.3)  # traffic keeps flowing: every answer must stay 401
    finally:
        stop.set()
        await asyncio.gather(*senders)
    shown = json.loads(await cli(url, "show", created["id"], "--owner", OWNER, "--json"))
    revoked_at = datetime.fromisoformat(shown["revoked_at"]).timestamp()

    first_401: dict[str, float] = {}
    for at, pid, status in traffic.seen:
        if status == 401:
            first_401.setdefault(pid, at)
        elif pid in first_401:
            raise SystemExit(f"worker {pid} answered 200 after it had answered 401")
    last_200 = max(at for at, _, status in traffic.seen if status == 200)
    flipped = max(first_401.values())
    per_worker = ", ".join(
        f"pid {pid} {(at - revoked_at) * 1000:.1f} ms" for pid, at in sorted(first_401.items())
    )
    print(
        f"round {n}: {len(traffic.seen)} requests; first 401 after revoked_at: {per_worker};"
        f" last 200 at {(last_200 - revoked_at) * 1000:+.1f} ms"
    )
    return last_200 - revoked_at, flipped - revoked_at


async def main(args: argparse.Namespace) -> None:
    schema = f"keystile_multiworker_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in args.postgres_url else "?"
    url = f"{args.postgres_url}{sep}schema={schema}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    await cli(url, "init")
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "examples.multiworker.app:app",
        "--workers",
        str(args.workers),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        cwd=ROOT,
        env={**os.environ, "KEYSTILE_DATABASE_URL": url},
    )
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await client.get("/whoami")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.returncode is not None:
                        raise SystemExit("uvicorn did not start") from None
                    await asyncio.sleep(0.1)
        print(f"uvicorn with {args.workers} workers on {base}, keys in schema {schema}")
        rounds = [await one_round(url, base, args.workers, n) for n in range(1, args.rounds + 1)]
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), timeout=30)
        conn = await asyncpg.connect(args.postgres_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    for label, index in (("last 200", 0), ("every worker's first 401", 1)):
        ms = sorted(r[index] * 1000 for r in rounds)
        print(
            f"{label} after revoked_at: median {statistics.median(ms):.1f} ms,"
            f" worst {ms[-1]:.1f} ms over {len(ms)} revocations"
        )
    print(
        "(after the eviction the next request with the key is a cache miss: one argon2"
        " verify at the default cost, then 401; later ones come from the negative cache)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "KEYSTILE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
