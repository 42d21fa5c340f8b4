"""Import time: what keystile adds to an app that has already imported Starlette.

Each run is a fresh ``python -X importtime -c "<Starlette imports>; <statement>"`` (the
Starlette modules an app imports first: ``starlette.applications``,
``starlette.responses``, ``starlette.routing``, ``starlette.authentication``), for two
statements: ``import keystile``, and ``from keystile import APIKeyMiddleware`` (what an
app runs; the package imports a public name's module on first use). A baseline process
runs the Starlette imports alone. Arms run interleaved, in a new random order each
round. Reported, as medians over the runs:

* keystile's imports: the cumulative import time of the top-level ``keystile`` entries
  (the package, then the modules a lazily imported name loads): what the statement
  costs once Starlette is loaded;
* ``added CPU``: the process's CPU time (user + system, from ``getrusage``) minus the
  baseline's; start-up and exit included, but not the time spent waiting for a core, so
  it holds up better than wall-clock times on a loaded machine (a cross-check);
* the modules and packages that cost most in them (their own time, ``self``), and the
  third-party packages they load.

Bytecode is compiled once, by a warm-up run, into a temporary ``PYTHONPYCACHEPREFIX``
(``PYTHONDONTWRITEBYTECODE`` is dropped for the runs): an installed keystile has its
``.pyc`` files, and compiling the sources anew in every run would swamp the rest.

``--ref SRC`` adds a second keystile arm from another source tree (e.g. the main
branch's ``src``), measured in the same run, for a before/after.

    python benchmarks/importtime.py [--runs 31] [--ref /path/to/other/src] [--pure] [--top 15]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
STARLETTE = (
    "import starlette.applications, starlette.responses, starlette.routing, "
    "starlette.authentication"
)
#: ``import keystile``, and what an app runs to add the middleware.
STATEMENTS = ("import keystile", "from keystile import APIKeyMiddleware")
LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


@dataclass
class Run:
    cpu_ms: float
    #: What keystile's imports cost, µs (0 in the baseline).
    keystile_us: int = 0
    #: Each module imported by keystile's imports: its own µs.
    inside: dict[str, int] = field(default_factory=dict)


def parse(stderr: str) -> tuple[int, dict[str, int]]:
    """What keystile's imports cost: the cumulative µs of the top-level entries from the
    first ``keystile…`` one on (the package, then any module a lazily imported name
    loads), and the self µs of every module under them.

    ``-X importtime`` prints a module after the modules it imported, one level deeper
    each; so the lines before a top-level line, back to the previous top-level line, are
    what it imported."""
    total = 0
    pending: dict[str, int] = {}
    inside: dict[str, int] = {}
    started = False
    for line in stderr.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        own, cumulative, indent, name = match.groups()
        pending[name] = int(own)
        if len(indent) == 1:
            started = started or name.split(".")[0] == "keystile"
            if started:
                total += int(cumulative)
                inside.update(pending)
            pending = {}
    return total, inside


#: Compiled bytecode for every arm, kept out of the source trees: an installed package
#: has its ``.pyc`` files, and without them every run would compile keystile anew.
PYCACHE = tempfile.mkdtemp(prefix="keystile-importtime-")


def run_once(code: str, pythonpath: str | None, pure: bool) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    if pure:
        env["KEYSTILE_PURE_PYTHON"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ms = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    keystile_us, inside = parse(done.stderr)
    return Run(cpu_ms, keystile_us, inside)


def package(module: str) -> str:
    """Where a module's time is counted: keystile's own modules each, others by package."""
    parts = module.split(".")
    if parts[0] == "keystile":
        return ".".join(parts[:2])
    return parts[0].lstrip("_") if parts[0] not in sys.stdlib_module_names else "(stdlib)"


def ms(us: float) -> str:
    return f"{us / 1000:,.1f}"


def report(runs: dict[str, list[Run]], top_n: int) -> None:
    base_cpu = statistics.median(r.cpu_ms for r in runs["starlette"])
    print("| arm | keystile's imports ms | p25 | p75 | added CPU ms | runs |")
    print("|---|---|---|---|---|---|")
    for arm, arm_runs in runs.items():
        if arm == "starlette":
            continue
        cost = sorted(r.keystile_us for r in arm_runs)
        quartiles = statistics.quantiles(cost, n=4)
        cpu = statistics.median(r.cpu_ms for r in arm_runs) - base_cpu
        print(
            f"| {arm} | {ms(statistics.median(cost))} | {ms(quartiles[0])} | "
            f"{ms(quartiles[2])} | {cpu:,.1f} | {len(arm_runs)} |"
        )
    for arm, arm_runs in runs.items():
        if arm == "starlette":
            continue
        modules: dict[str, list[int]] = defaultdict(list)
        packages: dict[str, list[int]] = defaultdict(list)
        for run in arm_runs:
            per_package: dict[str, int] = defaultdict(int)
            for module, own in run.inside.items():
                modules[module].append(own)
                per_package[package(module)] += own
            for name, own in per_package.items():
                packages[name].append(own)
        count = len(arm_runs)

        def med(values: list[int], count: int = count) -> float:
            return statistics.median(values + [0] * (count - len(values)))

        print(f"\n### {arm}: packages and modules by own time (median ms)\n")
        print("| package | ms | | module | ms |")
        print("|---|---|---|---|---|")
        by_package = sorted(packages, key=lambda n: -med(packages[n]))[:top_n]
        by_module = sorted(modules, key=lambda n: -med(modules[n]))[:top_n]
        for i in range(max(len(by_package), len(by_module))):
            left = (
                f"{by_package[i]} | {ms(med(packages[by_package[i]]))}"
                if i < len(by_package)
                else " | "
            )
            right = (
                f"{by_module[i]} | {ms(med(modules[by_module[i]]))}"
                if i < len(by_module)
                else " | "
            )
            print(f"| {left} | | {right} |")
        outside = sorted(
            {package(m) for m in modules if not m.startswith("keystile")} - {"(stdlib)"}
        )
        print(f"\nthird-party packages loaded by import keystile: {', '.join(outside) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--ref", type=pathlib.Path, help="another keystile src tree to compare")
    parser.add_argument("--pure", action="store_true", help="KEYSTILE_PURE_PYTHON=1")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    trees = {"": SRC} if args.ref is None else {"": SRC, "ref: ": args.ref.resolve()}
    arms: dict[str, tuple[str, str | None]] = {"starlette": (STARLETTE, str(SRC))}
    for label, tree in trees.items():
        for statement in STATEMENTS:
            arms[f"{label}{statement}"] = (f"{STARLETTE}; {statement}", str(tree))
    for arm, (code, path) in arms.items():
        run_once(code, path, args.pure)  # warm the file cache and the bytecode
        if arm != "starlette":
            where = subprocess.run(
                [sys.executable, "-c", "import keystile; print(keystile.__file__)"],
                env={**os.environ, "PYTHONPATH": str(path), "PYTHONPYCACHEPREFIX": PYCACHE},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if not where.startswith(str(path)):
                raise SystemExit(f"{arm}: keystile comes from {where.strip()}, not {path}")
    runs: dict[str, list[Run]] = {arm: [] for arm in arms}
    order = list(arms)
    rng = random.Random(0)
    for _ in range(args.runs):
        rng.shuffle(order)
        for arm in order:
            code, path = arms[arm]
            runs[arm].append(run_once(code, path, args.pure))
    load = os.getloadavg()[0]
    print(f"{args.runs} runs per arm, load average {load:.2f}, python {sys.version.split()[0]}")
    print(f"keystile: {SRC}" + (f"; ref: {args.ref}" if args.ref else ""))
    print(
        "path: " + ("pure Python (KEYSTILE_PURE_PYTHON=1)" if args.pure else "as installed") + "\n"
    )
    report(runs, args.top)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(PYCACHE, ignore_errors=True)
