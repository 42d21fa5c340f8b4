"""Does a cache lookup's time leak where, or how nearly, a presented digest matches?

``VerifiedKeyCache.lookup`` is timed directly, with crafted digests:

* **match position**: the digest of the first, middle or last cached entry, or of none,
  at 10 000 and 100 000 cached keys;
* **leading bytes**: a digest sharing its first 0, 4 or 7 bytes with a cached digest's
  8-byte tag (a miss either way), all 8 (the tag matches, the rest does not: the full
  ``hmac.compare_digest`` runs), against an unrelated one.

Conditions are interleaved in a fresh random order in every round, each round timing a
batch of lookups per condition, so drift (frequency scaling, other processes) falls on
all of them alike. Reported: median ns per lookup with the interquartile range, the
relative difference of medians against the reference condition, and a two-sided
Mann-Whitney U p-value (scipy, if installed). Each table has an A/A control (the
reference condition measured twice): its difference and p show what noise alone does on
this machine. A small p with a tiny difference is noise the test can resolve, not a leak
an attacker over a network could; read both.

    python benchmarks/timing.py                 # 300 rounds
    python benchmarks/timing.py --rounds 2000 --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.principal import APIKeyUser

try:
    from scipy.stats import mannwhitneyu
except ImportError:  # pragma: no cover - optional
    mannwhitneyu = None


def build(size: int) -> tuple[VerifiedKeyCache, list[bytes]]:
    cache = VerifiedKeyCache(max_size=size)
    digests = []
    for i in range(size):
        digest = os.urandom(32)
        entry = CachedKey(APIKeyUser(key_id=f"k{i:011d}", owner="o", name="n"), None, 0.0)
        assert cache.insert(digest, entry, now=0.0, epoch=cache.epoch)
        digests.append(digest)
    return cache, digests


def sharing(stored: bytes, n: int) -> bytes:
    """A digest whose first ``n`` bytes equal ``stored``'s and whose next byte differs."""
    rest = bytearray(os.urandom(32 - n))
    if n < 32:
        rest[0] = stored[n] ^ 0xFF
    return stored[:n] + bytes(rest)


def measure(
    cache: VerifiedKeyCache, probes: dict[str, bytes], rounds: int, batch: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in probes}
    names = list(probes)
    lookup = cache.lookup
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            digest = probes[name]
            started = time.perf_counter_ns()
            for _ in range(batch):
                lookup(digest, 1.0)
            samples[name].append((time.perf_counter_ns() - started) / batch)
    return samples


def report(title: str, samples: dict[str, list[float]], reference: str) -> None:
    print(f"\n{title}")
    header = f"{'condition':<34}{'median ns':>10}{'IQR ns':>14}{'vs ref':>9}{'MWU p':>9}"
    print(header)
    print("-" * len(header))
    ref = statistics.median(samples[reference])
    for name, values in samples.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        delta = (median - ref) / ref * 100
        if mannwhitneyu is not None and name != reference:
            p = f"{mannwhitneyu(values, samples[reference], alternative='two-sided').pvalue:.3f}"
        else:
            p = "-"
        mark = " (ref)" if name == reference else ""
        print(f"{name + mark:<34}{median:>10.0f}{f'{q1:.0f}-{q3:.0f}':>14}{delta:>+8.1f}%{p:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    print(
        f"cache lookup timing: {args.rounds} interleaved rounds x {args.batch} lookups "
        f"per condition; Mann-Whitney U {'via scipy' if mannwhitneyu else 'unavailable'}"
    )
    for size in args.sizes:
        cache, digests = build(size)
        position = {
            "first entry": digests[0],
            "middle entry": digests[size // 2],
            "last entry": digests[-1],
            "no entry (random digest)": os.urandom(32),
            "middle entry again (A/A control)": digests[size // 2],
        }
        for name, digest in position.items():
            found = cache.lookup(digest, 1.0)
            assert (found is None) == name.startswith("no entry")
        report(
            f"match position, {size} cached keys",
            measure(cache, position, args.rounds, args.batch),
            reference="middle entry",
        )
        stored = digests[size // 2]
        prefix = {f"{n} leading bytes match": sharing(stored, n) for n in (0, 4, 7, 8)}
        prefix["8 bytes match (tag), rest differs"] = prefix.pop("8 leading bytes match")
        prefix["0 bytes again (A/A control)"] = sharing(stored, 0)
        for digest in prefix.values():
            assert cache.lookup(digest, 1.0) is None
        report(
            f"leading bytes of a stored digest matched (all misses), {size} cached keys",
            measure(cache, prefix, args.rounds, args.batch),
            reference="0 leading bytes match",
        )


if __name__ == "__main__":
    main()
