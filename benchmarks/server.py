"""Overhead under a real server: uvicorn on 127.0.0.1, bare vs protected, same route.

The servers (one process each, started side by side: two bare ones, the second an A/A
control, and one per number of cached keys) are driven in alternation by a closed-loop
load generator with a fixed number of keep-alive connections: ``wrk`` when installed
(``apt-get install wrk``), else a Python client (httpx, keep-alive, the same number of
connections). Each run lasts a fixed time; the server's CPU time over the run (user +
system, ``psutil``) divided by the requests it answered is its CPU per request.

uvicorn runs with ``--http httptools --loop uvloop`` (the ``bench`` extra installs both;
the stack is named in every result) and ``--no-access-log`` (access logging would dominate
both arms). With ``taskset`` and at least two CPUs, every server is pinned to the last CPU
and the load generator to the first, so they never compete for one core; unpinned, an A/A
run of bare against bare ranged 0.69-1.26x on the 2-core machine. The A/A ratio (the
second bare server against the first) is reported beside every protected/bare ratio: a
ratio closer to 1 than the A/A one is noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
from asgi import uvicorn, wait_http
from harness import Target, fmt_us, interleave, median, print_table

__all__ = ["SERVER_CPU_TARGET", "run_server"]

BENCH_DIR = pathlib.Path(__file__).resolve().parent
#: Server CPU per request, protected / bare, at 1 000 keys (pinned, httptools + uvloop).
SERVER_CPU_TARGET = (1_000, 1.12)
#: The HTTP stack every server runs.
STACK_OPTIONS = ("--http", "httptools", "--loop", "uvloop")
STACK = "uvicorn + httptools + uvloop"
#: With taskset and 2+ CPUs: servers on the last CPU, the load generator on the first.
PINNED = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
SERVER_CPU = (os.cpu_count() or 1) - 1
CLIENT_CPU = 0
#: The A/A control: a second bare server, measured like every other arm.
CONTROL = "bare (A/A)"


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if PINNED else []


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    token: str

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.process.pid).cpu_times()
        return t.user + t.system


@contextlib.contextmanager
def _servers(framework: str, arms: dict[str, int]) -> Iterator[dict[str, Server]]:
    """One uvicorn per arm, all started side by side, each checked: 200 with its token,
    401 without (protected arms)."""
    with (
        tempfile.TemporaryDirectory(prefix="keystile-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        started: dict[str, tuple[subprocess.Popen[bytes], str, pathlib.Path]] = {}
        for index, (name, n_keys) in enumerate(arms.items()):
            token_file = pathlib.Path(tmp) / f"arm{index}.token"
            env = {
                "KEYSTILE_BENCH_FRAMEWORK": framework,
                "KEYSTILE_BENCH_KEYS": str(n_keys),
                "KEYSTILE_BENCH_TOKEN_FILE": str(token_file),
            }
            process, base = stack.enter_context(
                uvicorn(
                    "server_app:create",
                    app_dir=BENCH_DIR,
                    env=env,
                    options=("--factory", *STACK_OPTIONS),
                    prefix=_pin(SERVER_CPU),
                )
            )
            started[name] = (process, f"{base}/ping", token_file)
        servers = {}
        for name, (process, url, token_file) in started.items():
            deadline = time.monotonic() + 60
            while not token_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn ({name}) did not start")
                time.sleep(0.1)
            token = token_file.read_text()
            ok = wait_http(url, process, headers={"Authorization": f"Bearer {token}"})
            if ok.status_code != 200:
                raise RuntimeError(f"{name}: GET /ping answered {ok.status_code}")
            if arms[name] and (denied := httpx.get(url, timeout=2)).status_code != 401:
                raise RuntimeError(f"{name}: no key got {denied.status_code}")
            servers[name] = Server(name, process, url, token)
        yield servers


# -- load generators ------------------------------------------------------------------


def _wrk(server: Server, connections: int, duration: float) -> dict[str, float]:
    cmd = [
        *_pin(CLIENT_CPU),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {server.token}",
        server.url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    served = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    if served is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {server.name}:\n{out}")
    scale = {"us": 1.0, "ms": 1e3, "s": 1e6}
    return {
        "requests": float(served.group(1)),
        "rps": float(rps.group(1)),
        "p50_us": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan"),
    }


def _python_client(server: Server, connections: int, duration: float) -> dict[str, float]:
    async def drive() -> dict[str, float]:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        headers = {"Authorization": f"Bearer {server.token}"}
        latencies: list[float] = []
        bad = 0
        async with httpx.AsyncClient(limits=limits, headers=headers) as client:
            deadline = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal bad
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    r = await client.get(server.url)
                    latencies.append((time.perf_counter() - t0) * 1e6)
                    bad += r.status_code != 200

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - t0
        if bad:
            raise RuntimeError(f"{bad} responses from {server.name} were not 200")
        return {
            "requests": float(len(latencies)),
            "rps": len(latencies) / elapsed,
            "p50_us": median(latencies),
        }

    if not PINNED:
        return asyncio.run(drive())
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        return asyncio.run(drive())
    finally:
        os.sched_setaffinity(0, affinity)


def run_server(
    n_keys: list[int],
    *,
    duration: float,
    rounds: int,
    connections: int = 8,
    framework: str = "starlette",
    use_wrk: bool = True,
) -> tuple[dict[str, Any], list[Target]]:
    wrk = shutil.which("wrk") if use_wrk else None
    generator = "wrk -t1" if wrk else "python httpx client"
    arms = {"bare": 0, CONTROL: 0, **{f"{n}": n for n in n_keys}}
    pinning = (
        f"servers on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}"
        if PINNED
        else "not pinned"
    )
    print(
        f"  uvicorn: {STACK}, {framework}, {list(arms)}, {generator}, {connections} "
        f"connections, {rounds} x {duration:g}s each, {pinning} ...",
        flush=True,
    )
    drive = _wrk if wrk else _python_client

    def sample(server: Server) -> Any:
        def run() -> dict[str, float]:
            before = server.cpu_seconds()
            result = drive(server, connections, duration)
            result["cpu_us_per_request"] = (
                (server.cpu_seconds() - before) / result["requests"] * 1e6
            )
            return result

        return run

    with _servers(framework, arms) as servers:
        for server in servers.values():  # warm-up
            drive(server, connections, 1.0)
        runs = interleave({name: sample(server) for name, server in servers.items()}, rounds)
    summary: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        summary[name] = {
            "rps": median([x["rps"] for x in rs]),
            "cpu_us_per_request": median([x["cpu_us_per_request"] for x in rs]),
            "p50_us": median([x["p50_us"] for x in rs]),
        }
    bare = summary["bare"]
    for s in summary.values():
        s["cpu_ratio"] = s["cpu_us_per_request"] / bare["cpu_us_per_request"]
        s["rps_ratio"] = s["rps"] / bare["rps"]
    control = summary[CONTROL]["cpu_ratio"]
    print_table(
        f"{STACK} on 127.0.0.1 ({framework}, {generator}, {connections} connections, "
        f"{pinning}, median of {rounds} runs of {duration:g}s)",
        (
            "app",
            "requests/s",
            "vs bare",
            "server CPU µs/request",
            "vs bare",
            "A/A (bare vs bare)",
            "p50 latency µs",
        ),
        [
            (
                name if not name[0].isdigit() else f"keystile, {int(name):,} keys",
                f"{s['rps']:,.0f}",
                f"{s['rps_ratio']:.3f}x",
                fmt_us(s["cpu_us_per_request"]),
                f"{s['cpu_ratio']:.3f}x",
                f"{control:.3f}x",
                fmt_us(s["p50_us"]),
            )
            for name, s in summary.items()
        ],
    )
    targets = []
    n, limit = SERVER_CPU_TARGET
    if f"{n}" in summary:
        targets.append(
            Target(
                "uvicorn",
                f"server CPU/request protected/bare at {n:,} keys",
                summary[f"{n}"]["cpu_ratio"],
                limit,
                "x",
                note=f"{STACK}, {pinning}; A/A control {control:.3f}x",
            )
        )
    return {
        "stack": STACK,
        "pinned": pinning,
        "aa_control_cpu_ratio": control,
        "framework": framework,
        "generator": generator,
        "connections": connections,
        "duration_s": duration,
        "rounds": rounds,
        "summary": summary,
        "runs": runs,
    }, targets
