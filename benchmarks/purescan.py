"""The pure-Python cache lookup: the SWAR tag scan against the numpy scan it replaced.

Three ways to find a digest among N cached ones, all doing the same work wherever the
match is, each timed on the same digests:

* ``swar``: ``PyTable.lookup`` as keystile ships it (``keystile.tagscan``: every tag
  compared over Python integers, first and last match, ``hmac.compare_digest``; at or
  below ``SMALL_SCAN_SIZE`` entries a ``compare_digest`` loop);
* ``numpy``: the lookup keystile had before (``numpy.equal`` over an int64 tag array into
  a byte mask, ``find`` + ``rfind``, ``hmac.compare_digest``; the same small-size loop),
  rebuilt here; skipped without numpy;
* ``hmac loop``: ``compare_digest`` against every digest, recording the match and going
  on (the constant-time baseline, and what the small sizes run).

Each sample times a batch of lookups (about 300 µs) with ``time.perf_counter_ns``, GC
off, after one warm-up call; methods and the four positions (match in the first, middle
and last slot, none) are interleaved sample by sample, in a new random order each round. Reported: the median per position, the spread of the first, middle and
last medians ((max - min) / median), and numpy / SWAR medians in the same run.
``--crossover`` also times the SWAR scan against the loop from 4 to 64 entries (where
``SMALL_SCAN_SIZE`` belongs).

    python benchmarks/purescan.py [--sizes 10 1000 10000 100000] [--budget 2] [--crossover]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import os
import random
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

from keystile.cache import SMALL_SCAN_SIZE, PyTable
from keystile.tagscan import PackedTags

POSITIONS = ("first", "middle", "last", "none")
CALLS_FLOOR = 1
#: Short batches: on a shared machine fewer of them are cut by another process.
BATCH_US = 300
_compare = hmac.compare_digest


class NumpyLookup:
    """The numpy scan of the pure table as it was: tags as int64, a byte mask, find + rfind."""

    def __init__(self, digests: list[bytes], np: Any) -> None:
        self.np = np
        self.digests = digests
        self.entries = list(range(len(digests)))
        self.tags = np.array([struct.unpack_from("<q", d)[0] for d in digests], dtype=np.int64)
        self.mask_bytes = bytearray(len(digests))
        self.mask = np.frombuffer(self.mask_bytes, dtype=np.bool_)
        self.probe = np.zeros((), dtype=np.int64)
        self.seen = np.zeros(len(digests), dtype=np.float64)

    def lookup(self, digest: bytes, now: float) -> Any:
        size = len(self.digests)
        if size <= SMALL_SCAN_SIZE:
            found = -1
            for slot, stored in enumerate(self.digests):
                if _compare(stored, digest):
                    found = slot
            if found < 0:
                return None
            self.seen[found] = now
            return self.entries[found]
        self.probe[()] = struct.unpack_from("<q", digest)[0]
        self.np.equal(self.tags, self.probe, out=self.mask)
        first = self.mask_bytes.find(1, 0, size)
        last = self.mask_bytes.rfind(1, 0, size)
        if first == last:
            matched = _compare(self.digests[first] if first >= 0 else bytes(32), digest)
            if not matched or first < 0:
                return None
            slot = first
        elif _compare(self.digests[first], digest):
            slot = first
        elif _compare(self.digests[last], digest):
            slot = last
        else:
            return None
        self.seen[slot] = now
        return self.entries[slot]


def hmac_loop(digests: list[bytes]) -> Callable[[bytes], Any]:
    def lookup(digest: bytes) -> Any:
        found = None
        for candidate in digests:
            if _compare(candidate, digest):
                found = candidate
        return found

    return lookup


def as_probe(table: Any) -> Callable[[bytes], Any]:
    """``table.lookup(digest, now)`` as one call of the digest, alike for every table."""
    table_lookup = table.lookup

    def lookup(digest: bytes) -> Any:
        return table_lookup(digest, 1.0)

    return lookup


def swar_table(digests: list[bytes]) -> PyTable:
    table = PyTable(os.urandom(32))
    for slot, digest in enumerate(digests):
        table.append(digest, slot, 0.0)
    return table


def swar_scan_only(digests: list[bytes]) -> Callable[[bytes], Any]:
    """The packed scan and the candidate compares, whatever the size (no small-size loop)."""
    tags = PackedTags()
    for digest in digests:
        tags.append(digest)

    def lookup(digest: bytes) -> Any:
        first, last = tags.first_and_last(digest)
        if first == last:
            found = _compare(digests[first] if first >= 0 else bytes(32), digest) and first >= 0
            return first if found else None
        if _compare(digests[first], digest):
            return first
        return last if _compare(digests[last], digest) else None

    return lookup


def batch(fn: Callable[[bytes], Any], digest: bytes, calls: int) -> float:
    """µs per call of ``fn(digest)`` over one batch, GC off."""
    perf = time.perf_counter_ns
    gc.disable()
    try:
        t0 = perf()
        for _ in range(calls):
            fn(digest)
        elapsed = perf() - t0
    finally:
        gc.enable()
    return elapsed / calls / 1_000


def measure(
    methods: dict[str, Callable[[bytes], Any]], probes: dict[str, bytes], budget: float
) -> dict[str, dict[str, float]]:
    """Median µs per method and position, methods and positions interleaved in a new
    random order every round."""
    rng = random.Random(0)
    calls = {}
    for name, fn in methods.items():
        for position, digest in probes.items():
            if (fn(digest) is None) != (position == "none"):
                raise AssertionError(f"{name} got the {position} position wrong")
        estimate = min(batch(fn, probes["middle"], 2) for _ in range(3))
        calls[name] = max(CALLS_FLOOR, int(BATCH_US / max(estimate, 0.05)))
    per_round = sum(
        statistics.median([batch(fn, probes["middle"], calls[name]) for _ in range(2)])
        * calls[name]
        for name, fn in methods.items()
    )
    rounds = max(9, min(400, int(budget * 1e6 / max(per_round * len(probes), 1.0))))
    samples: dict[str, dict[str, list[float]]] = {name: {p: [] for p in probes} for name in methods}
    order = [(name, position) for name in methods for position in probes]
    for _ in range(rounds):
        rng.shuffle(order)  # no method or position always follows the same one
        for name, position in order:
            fn, digest = methods[name], probes[position]
            fn(digest)  # warm
            samples[name][position].append(batch(fn, digest, calls[name]))
    return {
        name: {p: statistics.median(v) for p, v in by_position.items()}
        for name, by_position in samples.items()
    }


def digests_of(n: int) -> list[bytes]:
    key = os.urandom(32)
    return [hashlib.blake2b(b"k%d" % i, key=key, digest_size=32).digest() for i in range(n)]


def probes_of(digests: list[bytes]) -> dict[str, bytes]:
    n = len(digests)
    return {
        "first": digests[0],
        "middle": digests[n // 2],
        "last": digests[-1],
        "none": hashlib.sha256(b"absent").digest(),
    }


def spread(medians: dict[str, float]) -> float:
    matched = [medians[p] for p in ("first", "middle", "last")]
    return (max(matched) - min(matched)) / statistics.median(matched) * 100


def fmt(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def run_sizes(sizes: list[int], budget: float, np: Any) -> None:
    print("| N | method | first µs | middle µs | last µs | none µs | spread % |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        digests = digests_of(n)
        methods = {"swar": as_probe(swar_table(digests))}
        if np is not None:
            methods["numpy"] = as_probe(NumpyLookup(digests, np))
        if n <= 20_000:
            methods["hmac loop"] = hmac_loop(digests)
        medians = measure(methods, probes_of(digests), budget)
        for name, by_position in medians.items():
            cells = " | ".join(fmt(by_position[p]) for p in POSITIONS)
            print(f"| {n:,} | {name} | {cells} | {spread(by_position):.1f} |")
        if "numpy" in medians:
            swar = statistics.median(medians["swar"].values())
            old = statistics.median(medians["numpy"].values())
            print(f"| {n:,} | swar / numpy | {swar / old:.2f}x | | | | |", flush=True)


def run_crossover(budget: float) -> None:
    print("\n| N | SWAR scan µs | hmac loop µs | loop / SWAR |")
    print("|---|---|---|---|")
    for n in (4, 8, 12, 16, 24, 32, 48, 64):
        digests = digests_of(n)
        methods = {"swar": swar_scan_only(digests), "loop": hmac_loop(digests)}
        medians = measure(methods, probes_of(digests), budget / 4)
        swar = statistics.median(medians["swar"].values())
        loop = statistics.median(medians["loop"].values())
        print(f"| {n} | {fmt(swar)} | {fmt(loop)} | {loop / swar:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1_000, 10_000, 100_000])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per size")
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    try:
        import numpy as np
    except ImportError:
        np = None
        print("numpy is not installed: the numpy arm is skipped")
    print(f"load average {os.getloadavg()[0]:.2f}; SMALL_SCAN_SIZE = {SMALL_SCAN_SIZE}\n")
    run_sizes(args.sizes, args.budget, np)
    if args.crossover:
        run_crossover(args.budget)


if __name__ == "__main__":
    main()
