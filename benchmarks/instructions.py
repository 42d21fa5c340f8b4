"""Instructions per request, counted by callgrind: what keystile adds to a Starlette route.

Instruction counts do not drift with the machine's load the way times do. Each arm (the
bare route, and the route behind keystile with N cached keys) runs in a process of its
own under ``valgrind --tool=callgrind --dump-before=getppid``. The process builds its arm,
answers 50 checked requests, then calls ``os.getppid()`` right before and right after its
loop of N direct ASGI requests (as in ``overhead.py``): callgrind writes out its counters
and starts again from zero on entering ``getppid``, so the second of those dumps holds
the request loop and nothing else (imports, filling the cache and drawing random keys
are in the first; shutting down in the last).

    instructions per request = instructions in the loop / N

Each arm runs twice, with 1 000 and 3 000 requests: the two counts per request must
agree (their spread is printed, and the section fails past 1 %). ``PYTHONHASHSEED=0``
keeps the runs alike. Needs valgrind (``apt-get install valgrind``); skipped without it.

    python benchmarks/instructions.py                  # 10, 1 000 and 10 000 keys
    python benchmarks/instructions.py --quick          # 1 000 keys
    python benchmarks/instructions.py --sizes 10 --budget 10   # + a key and an owner limit
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

from harness import Target, cli, print_table

__all__ = ["INSTRUCTION_TARGETS", "run_instructions"]

#: Instructions keystile may add per request (Starlette, direct ASGI), by cached keys.
INSTRUCTION_TARGETS = {10: 18_000, 1_000: 21_000, 10_000: 45_000}
DEFAULT_LENGTHS = (1_000, 3_000)
#: The libc function whose entry marks the loop's start and end (Python calls it only
#: through ``os.getppid``).
MARKER = "getppid"
#: The most two runs of one arm may differ per request before the count is not trusted.
MAX_SPREAD_PCT = 1.0
#: The ``--budget`` arms' name, and the most their request may cost against an unlimited
#: key's: a key with its own rate limit and its owner's, in this process.
BUDGET = "budget"
BUDGET_TARGET = 1.10


def _child(arm: str, requests: int) -> None:
    """Build the arm, warm it up, then serve ``requests`` direct ASGI calls between two
    calls of the marker."""
    from asgi import call_once, discard, http_scope, receive

    from apps import protect, starlette_app
    from keystile.tokens import generate_key

    if arm == "bare":
        app: Any = starlette_app()
        scope = http_scope("/ping", generate_key()[0].encode())
    elif arm.startswith(BUDGET):
        app, token = protect(starlette_app(), int(arm[len(BUDGET) :]), budget_policy())
        scope = http_scope("/ping", token)
    else:
        app, token = protect(starlette_app(), int(arm))
        scope = http_scope("/ping", token)

    async def main() -> None:
        for _ in range(50):
            status, _ = await call_once(app, scope)
            assert status == 200, status
        os.getppid()
        for _ in range(requests):
            await app(scope.copy(), receive, discard)
        os.getppid()
        if arm != "bare":
            stats = app.stats()
            assert stats.cache_misses == 0, stats
            await app.aclose()

    asyncio.run(main())


def budget_policy() -> Any:
    """A key's own rate limit and its owner's, both far above what the loop sends, so
    every request passes through both (``memory://``)."""
    from keystile.limits import LimitPolicy
    from keystile.stores.records import KeyRecord, OwnerLimits

    never = "100000000000/second"
    record = KeyRecord(
        id="bench",
        owner="bench",
        name="bench",
        prefix="ks",
        secret_hash="-",
        rate_limit=never,
        owner_limits=OwnerLimits("bench", {"burst": never}),
    )
    return LimitPolicy.from_record(record)


def _total(path: pathlib.Path) -> tuple[str, int]:
    """The trigger of one callgrind dump and the instructions it counted."""
    text = path.read_text()
    trigger = re.search(r"^desc: Trigger: (.*)$", text, re.MULTILINE)
    total = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    if trigger is None or total is None:
        raise RuntimeError(f"no trigger or no total in {path}")
    return trigger.group(1), int(total.group(1))


def _count(arm: str, requests: int, out_dir: str) -> dict[str, int]:
    """Instructions of one run: in the loop, and in the whole process."""
    out = pathlib.Path(out_dir) / f"callgrind.{arm}.{requests}"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--dump-before={MARKER}",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--child",
        arm,
        str(requests),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    parts = [
        _total(path)
        for path in (out.with_name(f"{out.name}.1"), out.with_name(f"{out.name}.2"), out)
    ]
    marked = [trigger for trigger, _ in parts[:2]]
    if any(MARKER not in t for t in marked) or out.with_name(f"{out.name}.3").exists():
        raise RuntimeError(f"expected exactly two dumps at {MARKER}, got {marked} ({out})")
    return {"loop": parts[1][1], "whole_process": sum(n for _, n in parts)}


def run_instructions(
    sizes: list[int], lengths: tuple[int, int] = DEFAULT_LENGTHS, budget_sizes: list[int] = ()
) -> tuple[dict[str, Any], list[Target]]:
    if shutil.which("valgrind") is None:
        print("  instructions: skipped (valgrind is not installed: apt-get install valgrind)")
        return {"skipped": "valgrind not installed"}, []
    from keystile._accel import compiled_kernel

    arms = ["bare", *(str(n) for n in sizes), *(f"{BUDGET}{n}" for n in budget_sizes)]
    runs: dict[str, list[dict[str, int]]] = {}
    per_request: dict[str, float] = {}
    spread: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="keystile-callgrind-") as tmp:
        for arm in arms:
            print(f"  instructions (callgrind): {arm} ...", flush=True)
            runs[arm] = [_count(arm, n, tmp) for n in lengths]
            each = [run["loop"] / n for run, n in zip(runs[arm], lengths, strict=True)]
            per_request[arm] = sum(each) / len(each)
            spread[arm] = (max(each) - min(each)) / per_request[arm] * 100
    added = {arm: per_request[arm] - per_request["bare"] for arm in arms if arm != "bare"}
    hit_path = compiled_kernel() or "pure Python"
    print_table(
        f"Instructions per request, Starlette route, direct ASGI (callgrind, the request loop "
        f"alone; runs of {lengths[0]:,} and {lengths[1]:,} requests; hit path: {hit_path})",
        ("app", *(f"per request, {n:,} requests" for n in lengths), "spread", "added by keystile"),
        [
            (
                _label(arm),
                *(f"{run['loop'] / n:,.0f}" for run, n in zip(runs[arm], lengths, strict=True)),
                f"{spread[arm]:.2f}%",
                "-" if arm == "bare" else f"{added[arm]:+,.0f}",
            )
            for arm in arms
        ],
    )
    budget_ratio = {
        n: per_request[f"{BUDGET}{n}"] / per_request[str(n)]
        for n in budget_sizes
        if str(n) in per_request
    }
    for n, ratio in budget_ratio.items():
        print(
            f"  a key with its own rate limit and its owner's (memory://), {n:,} keys:"
            f" {ratio:.3f}x the instructions of an unlimited key's request"
            f" (target <= {BUDGET_TARGET:.2f}x)"
        )
    unstable = {arm: s for arm, s in spread.items() if s > MAX_SPREAD_PCT}
    if unstable:
        raise AssertionError(f"per-request counts differ between runs by more than 1%: {unstable}")
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
    targets += [
        Target(
            "instructions",
            f"a request with a key and an owner limit vs an unlimited key's, {n:,} keys",
            ratio,
            BUDGET_TARGET,
            "x",
        )
        for n, ratio in budget_ratio.items()
    ]
    return {
        "hit_path": hit_path,
        "lengths": list(lengths),
        "runs": runs,
        "per_request": per_request,
        "spread_pct": spread,
        "added": added,
        "budget_ratio": budget_ratio,
    }, targets


def _label(arm: str) -> str:
    if arm == "bare":
        return "bare"
    if arm.startswith(BUDGET):
        return f"keystile, {int(arm[len(BUDGET) :]):,} keys, key + owner limit"
    return f"keystile, {int(arm):,} keys"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", help="cached keys (default 10 1000 10000)")
    parser.add_argument(
        "--budget",
        type=int,
        nargs="+",
        default=[],
        metavar="KEYS",
        help="also a key with its own and its owner's rate limit, at these cache sizes",
    )
    parser.add_argument("--lengths", type=int, nargs=2, default=list(DEFAULT_LENGTHS))


def _measure_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    sizes = args.sizes or ([1_000] if args.quick else list(INSTRUCTION_TARGETS))
    return run_instructions(sizes, (args.lengths[0], args.lengths[1]), args.budget)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(cli("instructions", __doc__, _measure_args, configure=_options))
