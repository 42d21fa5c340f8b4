"""The one harness every benchmark section runs on: timing, interleaving, statistics, the
machine's load, tables, targets, JSON results and the command line they share.

A section module only says what it measures: it builds its arms, hands them to
:func:`interleave` (or :func:`interleave_async`), reads :func:`compare` and returns its
numbers and its :class:`Target` list. The machine is shared (2 cores, other sessions):
times drift with its load, so arms are timed in alternation, sample by sample, and ratios
are always taken against a baseline arm of the same run; every result records the load
average before and after it.

This module never imports keystile (``peers.py`` runs without it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

__all__ = [
    "RESULTS",
    "Outcome",
    "Target",
    "batch_arms",
    "cli",
    "compare",
    "fmt_us",
    "interleave",
    "interleave_async",
    "load_average",
    "machine",
    "median",
    "options",
    "p99",
    "print_table",
    "print_targets",
    "quartiles",
    "rounds_for",
    "run_section",
    "time_batch",
    "wait_for_quiet",
    "write_json",
    "write_result",
]

BENCH_DIR = pathlib.Path(__file__).resolve().parent
#: Where results go (git-ignored): ``<section>.json``, and ``latest.json`` for run.py.
RESULTS = BENCH_DIR / "results"
T = TypeVar("T")
#: What a section returns: its numbers (JSON-able) and its targets.
Outcome = tuple[dict[str, Any], list["Target"]]


# -- statistics -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p99(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def fmt_us(value: float, digits: int | None = None) -> str:
    if math.isnan(value):
        return "-"
    if digits is None:
        digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:,.{digits}f}"


# -- the machine ------------------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def busy_load() -> float:
    """The load average above which numbers are noisy: most cores taken by others."""
    return max(1.0, (os.cpu_count() or 1) * 0.75)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for the 1-minute load average to drop under ``threshold``;
    returns the load average measured last. The machine is shared: this only helps."""
    deadline = time.monotonic() + max_wait
    load = load_average()
    while load > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        load = load_average()
    return load


#: The distributions whose versions every result records.
DISTRIBUTIONS = "keystile starlette fastapi numpy uvicorn httptools uvloop argon2-cffi asyncpg"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(BENCH_DIR), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "../src")
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return commit + ("+dirty" if dirty else "")


def machine(mode: str) -> dict[str, Any]:
    """What a result was measured on: a number means little without it."""
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count() or 1,
        "versions": {dist: _version(dist) for dist in DISTRIBUTIONS.split()},
        "git": _git_commit(),
    }


# -- timing -----------------------------------------------------------------------------


def time_batch(fn: Callable[[Any], object], arg: Any, calls: int) -> float:
    """µs per call of ``fn(arg)`` over one batch of ``calls``, the GC off as ``timeit`` does."""
    perf = time.perf_counter_ns
    r = range(calls)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = perf()
        for _ in r:
            fn(arg)
        elapsed = perf() - t0
    finally:
        if gc_was:
            gc.enable()
    return elapsed / calls / 1_000


def batch_arms(
    fn: Callable[[Any], object], args: Mapping[str, Any], calls: int
) -> dict[str, Callable[[], float]]:
    """Per arm, a sample for :func:`interleave`: :func:`time_batch` of ``fn(arg)``."""
    return {name: functools.partial(time_batch, fn, arg, calls) for name, arg in args.items()}


def _orders(names: list[str], rounds: int, order: str) -> Iterable[list[str]]:
    """ABBA: the arms in order, then reversed, so a drift falls on every arm alike;
    shuffle: a fresh random order every round."""
    for r in range(rounds):
        if order == "shuffle":
            random.shuffle(names)
            yield names
        else:
            yield names if r % 2 == 0 else names[::-1]


def interleave(
    arms: Mapping[str, Callable[[], T]], rounds: int, *, order: str = "abba"
) -> dict[str, list[T]]:
    """One sample of every arm per round, in ``order`` (``abba`` or ``shuffle``)."""
    samples: dict[str, list[T]] = {name: [] for name in arms}
    for names in _orders(list(arms), rounds, order):
        for name in names:
            samples[name].append(arms[name]())
    return samples


async def interleave_async(
    arms: Mapping[str, Callable[[], Awaitable[T]]], rounds: int, *, order: str = "abba"
) -> dict[str, list[T]]:
    """:func:`interleave` for coroutines. After every sample the loop yields once, so
    background tasks (usage flush, cache upkeep) run outside the timed windows."""
    samples: dict[str, list[T]] = {name: [] for name in arms}
    for names in _orders(list(arms), rounds, order):
        for name in names:
            samples[name].append(await arms[name]())
            await asyncio.sleep(0)
    return samples


def rounds_for(
    budget: float, sample_us: float, arms: int, *, minimum: int = 15, maximum: int = 10**9
) -> int:
    """How many rounds of ``arms`` samples of about ``sample_us`` fit in ``budget`` seconds
    (with a margin for what happens between samples)."""
    fit = int(budget * 1e6 / (max(sample_us, 1e-3) * arms * 1.3))
    return max(minimum, min(maximum, fit))


def compare(samples: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per arm: median and p99 of its samples, its median over the baseline's (``ratio``),
    the difference (``added``) and the median of the round-by-round ratios
    (``paired_ratio``: each sample over the baseline's sample of the same round, which a
    slow drift of the machine cancels out of)."""
    base = samples[baseline]
    base_median = median(base)
    return {
        name: {
            "median_us": median(values),
            "p99_us": p99(values),
            "ratio": median(values) / base_median,
            "paired_ratio": median([v / b for v, b in zip(values, base, strict=False)]),
            "added_us": median(values) - base_median,
            "samples": len(values),
        }
        for name, values in samples.items()
    }


# -- targets and tables -----------------------------------------------------------------


@dataclass
class Target:
    """One target next to its measured value."""

    section: str
    name: str
    measured: float
    target: float
    unit: str
    #: True when bigger is better (e.g. "x faster"), else the measured value must be <= target.
    at_least: bool = False
    note: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured >= self.target if self.at_least else self.measured <= self.target

    @property
    def verdict(self) -> str:
        if math.isnan(self.measured):
            return "SKIP"
        return "PASS" if self.passed else "MISS"

    def row(self) -> tuple[str, ...]:
        op = ">=" if self.at_least else "<="
        return (
            self.name,
            f"{op} {self.target:g} {self.unit}",
            f"{fmt_us(self.measured)} {self.unit}",
            self.verdict,
            self.note,
        )

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A Markdown table: the first column left-aligned, the numbers right-aligned."""
    rows = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"\n## {title}\n")
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(flush=True)


def print_targets(targets: Sequence[Target], title: str = "Targets") -> None:
    print_table(
        title, ("target", "goal", "measured", "verdict", "note"), [t.row() for t in targets]
    )
    missed = sum(t.verdict == "MISS" for t in targets)
    print(f"{len(targets) - missed} of {len(targets)} targets met.", flush=True)


# -- results ----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON without NaN (``null`` instead) and without tuples or other objects."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_json(data: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(data), indent=2) + "\n")
    return path


def write_result(
    section: str, outcome: Outcome, *, mode: str, path: pathlib.Path | None = None
) -> pathlib.Path:
    """One section's result, with the machine it ran on, in ``results/<section>.json``."""
    data, targets = outcome
    result = {
        "section": section,
        "meta": machine(mode),
        "results": data,
        "targets": [t.as_dict() for t in targets],
    }
    return write_json(result, path or RESULTS / f"{section}.json")


def run_section(name: str, measure: Callable[[], Outcome], *, wait_quiet: float = 0.0) -> Outcome:
    """Run one section, with the load average before and after in its result."""
    before = wait_for_quiet(busy_load(), wait_quiet) if wait_quiet else load_average()
    warn = "  (busy machine: numbers are noisy)" if before > busy_load() else ""
    print(f"\n[{name}] load average {before:.2f}{warn}", flush=True)
    data, targets = measure()
    data["load_average"] = {"before": before, "after": load_average()}
    return data, targets


# -- the command line -------------------------------------------------------------------


def options() -> argparse.ArgumentParser:
    """The options every section's command line has (an argparse parent)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--quick", action="store_true", help="the smallest run that still says something"
    )
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        metavar="PATH",
        help="where the result goes (default benchmarks/results/<section>.json)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the section's)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the load average to drop",
    )
    return parser


def cli(
    section: str,
    doc: str | None,
    measure: Callable[[argparse.Namespace], Outcome],
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """A section's command line: the shared options and its own (``configure``), then
    the section, its targets and ``benchmarks/results/<section>.json``."""
    head, _, tail = (doc or "").partition("\n\n")
    parser = argparse.ArgumentParser(
        description=head,
        epilog=tail,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[options()],
    )
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    data, targets = run_section(section, lambda: measure(args), wait_quiet=args.wait_quiet)
    if targets:
        print_targets(targets)
    mode = "quick" if args.quick else "full"
    print(f"results: {write_result(section, (data, targets), mode=mode, path=args.json)}")
    return 0
