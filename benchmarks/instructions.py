"""Instructions per request, counted by callgrind: what keystile adds to a Starlette route.

Instruction counts do not drift with the machine's load the way times do. Each arm (the
bare route, and the route behind keystile with N cached keys) runs in a process of its
own under ``valgrind --tool=callgrind`` twice, with two numbers of requests; start-up
(imports, filling the cache) is the same in both runs and cancels out of

    instructions per request = (total(long run) - total(short run)) / (long - short)

Requests are direct ASGI calls, as in ``overhead.py``. ``PYTHONHASHSEED=0`` keeps the two
runs of an arm alike. Needs valgrind (``apt-get install valgrind``); skipped without it.

    python benchmarks/instructions.py                  # 10, 1 000 and 10 000 keys
    python benchmarks/instructions.py --child ARM N    # one run (what callgrind runs)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import Target, print_table  # noqa: E402

__all__ = ["INSTRUCTION_TARGETS", "run_instructions"]

#: Instructions keystile may add per request (Starlette, direct ASGI), by cached keys.
INSTRUCTION_TARGETS = {10: 18_000, 1_000: 21_000, 10_000: 45_000}
DEFAULT_LENGTHS = (1_000, 3_000)


def _child(arm: str, requests: int) -> None:
    """Build the arm, warm it up, then serve ``requests`` direct ASGI calls."""
    from apps import call_once, http_scope, protect, starlette_app
    from keystile.tokens import generate_key

    if arm == "bare":
        app: Any = starlette_app()
        scope = http_scope("/ping", generate_key()[0].encode())
    else:
        app, token = protect(starlette_app(), int(arm))
        scope = http_scope("/ping", token)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def main() -> None:
        for _ in range(50):
            status, _ = await call_once(app, scope)
            assert status == 200, status
        for _ in range(requests):
            await app(scope.copy(), receive, send)
        if arm != "bare":
            stats = app.stats()
            assert stats.cache_misses == 0, stats
            await app.aclose()

    asyncio.run(main())


def _count(arm: str, requests: int, out_dir: str) -> int:
    out = os.path.join(out_dir, f"callgrind.{arm}.{requests}")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--child",
        arm,
        str(requests),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    text = pathlib.Path(out).read_text()
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(m.group(1))


def run_instructions(
    sizes: list[int], lengths: tuple[int, int] = DEFAULT_LENGTHS
) -> tuple[dict[str, Any], list[Target]]:
    if shutil.which("valgrind") is None:
        print("  instructions: skipped (valgrind is not installed: apt-get install valgrind)")
        return {"skipped": "valgrind not installed"}, []
    from keystile._accel import compiled_kernel

    short, long = lengths
    arms = ["bare", *(str(n) for n in sizes)]
    per_request: dict[str, float] = {}
    totals: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="keystile-callgrind-") as tmp:
        for arm in arms:
            print(f"  instructions (callgrind): {arm} ...", flush=True)
            counts = [_count(arm, short, tmp), _count(arm, long, tmp)]
            totals[arm] = counts
            per_request[arm] = (counts[1] - counts[0]) / (long - short)
    bare = per_request["bare"]
    added = {arm: per_request[arm] - bare for arm in arms if arm != "bare"}
    hit_path = compiled_kernel() or "pure Python"
    print_table(
        f"Instructions per request, Starlette route, direct ASGI (callgrind; runs of {short:,} "
        f"and {long:,} requests; hit path: {hit_path})",
        ("app", "instructions/request", "added by keystile"),
        [
            (
                "bare" if arm == "bare" else f"keystile, {int(arm):,} keys",
                f"{per_request[arm]:,.0f}",
                "-" if arm == "bare" else f"{added[arm]:+,.0f}",
            )
            for arm in arms
        ],
    )
    targets = [
        Target(
            "instructions",
            f"instructions keystile adds per request at {n:,} keys",
            added[str(n)],
            limit,
            "instructions",
        )
        for n, limit in INSTRUCTION_TARGETS.items()
        if str(n) in added
    ]
    return {
        "hit_path": hit_path,
        "lengths": list(lengths),
        "totals": totals,
        "per_request": per_request,
        "added": added,
    }, targets


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("ARM", "REQUESTS"))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(INSTRUCTION_TARGETS))
    parser.add_argument("--lengths", type=int, nargs=2, default=list(DEFAULT_LENGTHS))
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    _, targets = run_instructions(args.sizes, (args.lengths[0], args.lengths[1]))
    for t in targets:
        print(" | ".join(t.row()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
