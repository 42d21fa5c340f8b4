"""keystile benchmarks: every measured number in one run, each next to its target.

    python benchmarks/run.py --quick                       # under two minutes
    python benchmarks/run.py --quick --only instructions   # the instruction counts (callgrind)
    python benchmarks/run.py --postgres-url postgresql://postgres@127.0.0.1:5432/test \\
        --json benchmarks/results/latest.json --plot docs/benchmark-latency.png

Sections (``--only`` picks some): ``hit`` (cache-hit verification vs cached keys, with
two references), ``overhead`` (bare vs protected route, direct ASGI), ``dependencies``
(keystile's FastAPI dependencies vs FastAPI's cheapest one), ``instructions``
(instructions keystile adds per request, callgrind), ``memory`` (RSS per cached key),
``server`` (the same under uvicorn + httptools + uvloop, pinned, with an A/A control),
``miss`` (argon2 cost, miss latency on SQLite and Postgres, cold start), ``cold`` (cold
start under 1, 2 and 4 uvicorn workers), ``fleet`` (a warm-up of every key on 4 uvicorn
workers with and without the verification memo, one Redis), ``last-used`` (batched last_used_at vs one
UPDATE per request, Postgres), ``peers`` (keyshield and fastapi-keygate). The Postgres
parts are skipped, with a message, without ``--postgres-url`` (or
``KEYSTILE_BENCH_POSTGRES_URL``), the fleet without ``--redis-url`` (or
``KEYSTILE_BENCH_REDIS_URL``).

The machine these run on may be shared: every section records the load average, and
``--wait-quiet SECONDS`` waits up to that long for it to drop before each section.

``--quick`` leaves out ``instructions`` unless ``--only`` names it: callgrind takes about
a minute per run on the 2-core machine and the section needs four, more than the rest of
the quick run together. Every section prints its wall and CPU time (the JSON keeps them):
on a busy machine the CPU time says what the run costs on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

from harness import (
    RESULTS,
    Outcome,
    Target,
    load_average,
    machine,
    print_targets,
    run_section,
    write_json,
    write_result,
)

SECTIONS = (
    "hit",
    "overhead",
    "dependencies",
    "instructions",
    "memory",
    "server",
    "miss",
    "cold",
    "fleet",
    "last-used",
    "peers",
)
#: Sections a --quick run leaves out unless --only names them (see the docstring).
SLOW_SECTIONS = ("instructions",)
#: What --quick promises; benchmarks/README.md and the README say the same.
QUICK_PROMISE = "under two minutes"
DEFAULT_RESULTS = RESULTS


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (servers, workers)."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "hit_sizes": [10, 100, 1_000, 10_000, 100_000],
            "hit_budget": 0.25,
            "overhead_sizes": [10, 1_000, 10_000],
            "overhead_budget": 4.0,
            "instruction_sizes": [1_000],
            "memory_keys": 100_000,
            "cold_workers_keys": 100,
            "fleet_keys": 100,
            "dependencies_budget": 4.0,
            "server_keys": [1_000],
            "server_duration": 2.0,
            "server_rounds": 2,
            "cold_keys": 200,
            "miss_requests": 20,
            "argon2_samples": (20, 3),
            "last_used_requests": 10_000,
            "last_used_keys": 100,
            "last_used_latency_requests": 1_000,
            "peer_keys": 20,
            "peer_budget": 3.0,
            "peer_max_requests": 500,
        }
    return {
        "hit_sizes": [10, 100, 1_000, 10_000, 100_000],
        "hit_budget": 1.0,
        "overhead_sizes": [10, 1_000, 10_000],
        "overhead_budget": 15.0,
        "instruction_sizes": [10, 1_000, 10_000],
        "memory_keys": 100_000,
        "cold_workers_keys": 10_000,
        "fleet_keys": 10_000,
        "dependencies_budget": 20.0,
        "server_keys": [10, 1_000, 10_000],
        "server_duration": 4.0,
        "server_rounds": 4,
        "cold_keys": 1_000,
        "miss_requests": 100,
        "argon2_samples": (50, 10),
        "last_used_requests": 10_000,
        "last_used_keys": 100,
        "last_used_latency_requests": 3_000,
        "peer_keys": 1_000,
        "peer_budget": 10.0,
        "peer_max_requests": 2_000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smaller run without instructions, {QUICK_PROMISE} on a quiet 2-core machine",
    )
    parser.add_argument("--json", type=pathlib.Path, help="write every number here")
    parser.add_argument("--plot", type=pathlib.Path, help="write the PNG plot here")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("KEYSTILE_BENCH_POSTGRES_URL"),
        help="libpq URL for the Postgres parts (default: $KEYSTILE_BENCH_POSTGRES_URL); "
        "each run works in a schema of its own and drops it",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KEYSTILE_BENCH_REDIS_URL"),
        help="Redis for the fleet section's verification memo (default: "
        "$KEYSTILE_BENCH_REDIS_URL); the run works under a key prefix of its own",
    )
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION", help=f"any of {SECTIONS}"
    )
    parser.add_argument(
        "--peers", nargs="+", metavar="PEER", help="peer configurations (see peers.py)"
    )
    parser.add_argument("--peer-keys", type=int, help="keys per peer (default 1000; --quick 20)")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each section, wait up to this long for the load average to drop",
    )
    args = parser.parse_args(argv)
    settings = _settings(args.quick)
    if args.peer_keys:
        settings["peer_keys"] = args.peer_keys
    sections = args.only or [s for s in SECTIONS if not (args.quick and s in SLOW_SECTIONS)]
    cpus = os.cpu_count() or 1

    results: dict[str, Any] = {
        "meta": {
            **machine("quick" if args.quick else "full"),
            "settings": settings,
            "load_average": {},
            "section_seconds": {},
        }
    }
    targets: list[Target] = []
    started = time.perf_counter()
    print(
        f"keystile benchmarks ({results['meta']['mode']}), Python {platform.python_version()}, "
        f"{cpus} CPUs, load average {load_average():.2f}, sections: {', '.join(sections)}",
        flush=True,
    )

    def section(name: str, measure: Callable[[], Outcome]) -> dict[str, Any]:
        """One section: its load average before and after, its targets, its own JSON, and
        the wall and CPU time it took (printed, and kept in the results)."""
        wall, cpu = time.perf_counter(), _cpu_seconds()
        data, section_targets = run_section(name, measure, wait_quiet=args.wait_quiet)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        results["meta"]["section_seconds"][name] = {"wall": wall, "cpu": cpu}
        print(f"  [{name}] {wall:.0f} s, CPU {cpu:.0f} s", flush=True)
        results["meta"]["load_average"][name] = data["load_average"]
        targets.extend(section_targets)
        write_result(name, (data, section_targets), mode=results["meta"]["mode"])
        return data

    if "hit" in sections:
        from hitpath import HIT_TARGETS, run_hitpath

        results["hit_path"] = section(
            "hit", lambda: run_hitpath(settings["hit_sizes"], settings["hit_budget"])
        )
        results["hit_path"]["targets"] = {str(n): v for n, v in HIT_TARGETS.items()}
    if "overhead" in sections:
        from overhead import run_overhead

        results["overhead"] = section(
            "overhead",
            lambda: run_overhead(settings["overhead_sizes"], settings["overhead_budget"]),
        )
    if "dependencies" in sections:
        from dependencies import run_dependencies

        results["dependencies"] = section(
            "dependencies", lambda: run_dependencies(1_000, settings["dependencies_budget"])
        )
    if "instructions" in sections:
        from instructions import run_instructions

        results["instructions"] = section(
            "instructions", lambda: run_instructions(settings["instruction_sizes"])
        )
    if "memory" in sections:
        from memory import run_memory

        results["memory"] = section("memory", lambda: run_memory(settings["memory_keys"]))
    if "server" in sections:
        from server import run_server

        results["server"] = section(
            "server",
            lambda: run_server(
                settings["server_keys"],
                duration=settings["server_duration"],
                rounds=settings["server_rounds"],
                use_wrk=not args.no_wrk,
            ),
        )
    if "miss" in sections:
        from misspath import run_misspath

        results["miss_path"] = section(
            "miss",
            lambda: run_misspath(
                postgres_url=args.postgres_url,
                n_cold=settings["cold_keys"],
                miss_requests=settings["miss_requests"],
                argon2_samples=settings["argon2_samples"],
            ),
        )
    if "cold" in sections:
        from coldstart import run_coldstart

        results["cold_workers"] = section(
            "cold", lambda: run_coldstart(settings["cold_workers_keys"])
        )
    if "fleet" in sections:
        if args.redis_url:
            from fleet import run_fleet

            results["fleet"] = section(
                "fleet",
                lambda: run_fleet(
                    settings["fleet_keys"], redis_url=args.redis_url, postgres_url=args.postgres_url
                ),
            )
        else:
            print("\n[fleet] skipped: needs --redis-url (or KEYSTILE_BENCH_REDIS_URL)")
    if "last-used" in sections:
        from usagewrites import run_usage_writes

        results["last_used"] = section(
            "last-used",
            lambda: run_usage_writes(
                args.postgres_url,
                requests=settings["last_used_requests"],
                n_keys=settings["last_used_keys"],
                latency_requests=settings["last_used_latency_requests"],
            ),
        )
    if "peers" in sections:
        from peercompare import DEFAULT_PEERS, QUICK_PEERS, run_peers

        names = args.peers or (QUICK_PEERS if args.quick else DEFAULT_PEERS)
        results["peers"] = section(
            "peers",
            lambda: run_peers(
                names,
                n_keys=settings["peer_keys"],
                budget=settings["peer_budget"],
                max_requests=settings["peer_max_requests"],
            ),
        )

    elapsed = time.perf_counter() - started
    results["meta"]["seconds"] = elapsed
    results["targets"] = [t.as_dict() for t in targets]
    print_targets(
        targets,
        f"Targets ({results['meta']['mode']} run, {elapsed:.0f} s, "
        f"load average {load_average():.2f})",
    )
    print(f"results: {write_json(results, args.json or DEFAULT_RESULTS / 'latest.json')}")
    plot_path = args.plot or DEFAULT_RESULTS / "latency.png"
    try:
        from plot import write_plot

        write_plot(plot_path, results)
        print(f"plot: {plot_path}")
    except ImportError as exc:
        print(f"plot skipped: {exc} (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
