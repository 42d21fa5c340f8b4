"""Start-up of the ``keystile`` command: ``keystile --help`` in a fresh interpreter, against
``python -c pass`` in the same run as the baseline.

Every run is a new process (no warm interpreter), with compiled bytecode on disk as an
installed package has it: ``PYTHONDONTWRITEBYTECODE`` is removed from the children's
environment, so the warm-up run writes the ``__pycache__`` files the measured runs read
(with it set, every run compiles every keystile module from source again, which costs
more than importing them). The arms are interleaved run by run, so a change in the
machine's load reaches both alike. Reported for each arm: the median wall time, the median
CPU time (user + system of the child, which a busy machine inflates less than the wall
time), the median overhead over the baseline, and the 1-minute load average before and
after. The target is a median wall time under 150 ms: an operator types ``keystile --help``
and waits for it.

Also measured: ``import argparse`` (Python with argparse alone), ``argparse --help``, a
parser with one subcommand printing its help (the floor for any argparse command),
``import keystile`` alone (what the package's ``__init__`` costs before the command's own
modules load) and ``import keystile.cli``.

With ``--instructions`` (valgrind installed): the instructions each arm executes, counted
once by callgrind with ``PYTHONHASHSEED=0``. A count does not depend on the machine's load,
so it compares two versions measured on a busy machine, or on two machines.

    python benchmarks/cli_startup.py [RUNS] [--instructions]

Self-contained: standard library only, no other benchmark module.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

RUNS = 30
TARGET_MS = 150.0
ARGPARSE_HELP = (
    "import argparse; p = argparse.ArgumentParser(prog='x');"
    " p.add_subparsers().add_parser('y'); p.print_help()"
)


def _arms() -> dict[str, list[str]]:
    script = shutil.which("keystile")
    help_command = (
        [script, "--help"] if script else [sys.executable, "-m", "keystile.cli", "--help"]
    )
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import argparse": [sys.executable, "-c", "import argparse"],
        "argparse --help": [sys.executable, "-c", ARGPARSE_HELP],
        "import keystile": [sys.executable, "-c", "import keystile"],
        "import keystile.cli": [sys.executable, "-c", "import keystile.cli"],
        "keystile --help": help_command,
    }


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


ENVIRONMENT = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _time_once(command: list[str]) -> tuple[float, float]:
    """Wall and CPU milliseconds from spawn to exit; a failure stops the benchmark."""
    cpu_before = _cpu_of_children()
    started = time.perf_counter()
    done = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENVIRONMENT
    )
    wall = (time.perf_counter() - started) * 1000
    cpu = (_cpu_of_children() - cpu_before) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return wall, cpu


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_cli_startup(runs: int = RUNS) -> dict[str, float]:
    """The median wall milliseconds of each arm over ``runs`` interleaved runs."""
    arms = _arms()
    for command in arms.values():  # once each: the import cache written, the disk warm
        _time_once(command)
    walls: dict[str, list[float]] = {name: [] for name in arms}
    cpus: dict[str, list[float]] = {name: [] for name in arms}
    load_before = _load()
    for _ in range(runs):
        for name, command in arms.items():
            wall, cpu = _time_once(command)
            walls[name].append(wall)
            cpus[name].append(cpu)
    load_after = _load()
    medians = {name: statistics.median(values) for name, values in walls.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpus.items()}
    baseline, cpu_baseline = medians["python -c pass"], cpu_medians["python -c pass"]
    print(
        f"{runs} interleaved runs each; load average (1 min) {load_before:.2f} -> {load_after:.2f}"
    )
    print(
        f"{'arm':22} {'wall median':>12} {'wall min':>9} {'over base':>10}"
        f" {'CPU median':>11} {'over base':>10}"
    )
    for name in arms:
        print(
            f"{name:22} {medians[name]:10.1f}ms {min(walls[name]):7.1f}ms"
            f" {medians[name] - baseline:+8.1f}ms {cpu_medians[name]:9.1f}ms"
            f" {cpu_medians[name] - cpu_baseline:+8.1f}ms"
        )
    help_ms = medians["keystile --help"]
    verdict = "PASS" if help_ms < TARGET_MS else "MISS"
    print(
        f"keystile --help: median {help_ms:.1f} ms wall ({help_ms / baseline:.1f}x python -c pass,"
        f" {help_ms - medians['import argparse']:+.1f} ms over import argparse),"
        f" {cpu_medians['keystile --help']:.1f} ms CPU"
        f" ({cpu_medians['keystile --help'] / cpu_baseline:.1f}x); target < {TARGET_MS:.0f} ms: {verdict}"
    )
    if load_before > 1.5:
        print(f"warning: load average {load_before:.2f} on {os.cpu_count()} cores; compare ratios")
    return medians


def count_instructions() -> dict[str, int]:
    """The instructions each arm executes, by callgrind; empty without valgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("instructions: valgrind is not installed, skipped")
        return {}
    environment = {**ENVIRONMENT, "PYTHONHASHSEED": "0"}
    counts: dict[str, int] = {}
    for name, command in _arms().items():
        subprocess.run(command, stdout=subprocess.DEVNULL, env=environment, check=True)
        done = subprocess.run(
            [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            check=True,
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(f"callgrind printed no count for {name}: {done.stderr[-500:]}")
        counts[name] = int(found.group(1))
    baseline = counts["python -c pass"]
    print(f"{'arm':22} {'instructions':>14} {'x baseline':>11}")
    for name, count in counts.items():
        print(f"{name:22} {count / 1e6:12.1f} M {count / baseline:10.2f}x")
    return counts


if __name__ == "__main__":
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_argument("runs", nargs="?", type=int, default=RUNS)
    options.add_argument("--instructions", action="store_true")
    given = options.parse_args()
    run_cli_startup(given.runs)
    if given.instructions:
        count_instructions()
