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

    python benchmarks/timing.py                 # 300 rounds (--quick: 50, 10 000 keys)
    python benchmarks/timing.py --rounds 2000 --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

from harness import Target, batch_arms, cli, interleave, median, print_table, quartiles

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
    title: str, cache: VerifiedKeyCache, probes: dict[str, bytes], reference: str, args: Any
) -> dict[str, Any]:
    """The conditions in a fresh random order every round; per condition: median ns per
    lookup, the quartiles, the difference against ``reference`` and a Mann-Whitney U p."""
    lookup = functools.partial(cache.lookup, now=1.0)
    samples = interleave(batch_arms(lookup, probes, args.batch), args.rounds, order="shuffle")
    ref = median(samples[reference])
    out: dict[str, Any] = {}
    for name, values in samples.items():
        ns = [v * 1_000 for v in values]
        q1, q3 = quartiles(ns)
        p = None
        if mannwhitneyu is not None and name != reference:
            p = float(mannwhitneyu(values, samples[reference], alternative="two-sided").pvalue)
        out[name] = {
            "median_ns": median(ns),
            "q1_ns": q1,
            "q3_ns": q3,
            "vs_reference_pct": (median(values) - ref) / ref * 100,
            "mann_whitney_p": p,
        }
    print_table(
        title,
        ("condition", "median ns", "IQR ns", "vs ref", "MWU p"),
        [
            (
                name + (" (ref)" if name == reference else ""),
                f"{r['median_ns']:.0f}",
                f"{r['q1_ns']:.0f}-{r['q3_ns']:.0f}",
                f"{r['vs_reference_pct']:+.1f}%",
                "-" if r["mann_whitney_p"] is None else f"{r['mann_whitney_p']:.3f}",
            )
            for name, r in out.items()
        ],
    )
    return out


def run_timing(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    print(
        f"cache lookup timing: {args.rounds} interleaved rounds x {args.batch} lookups "
        f"per condition; Mann-Whitney U {'via scipy' if mannwhitneyu else 'unavailable'}"
    )
    results: dict[str, Any] = {"rounds": args.rounds, "batch": args.batch, "sizes": {}}
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
        stored = digests[size // 2]
        prefix = {f"{n} leading bytes match": sharing(stored, n) for n in (0, 4, 7, 8)}
        prefix["8 bytes match (tag), rest differs"] = prefix.pop("8 leading bytes match")
        prefix["0 bytes again (A/A control)"] = sharing(stored, 0)
        for digest in prefix.values():
            assert cache.lookup(digest, 1.0) is None
        results["sizes"][str(size)] = {
            "position": measure(
                f"match position, {size} cached keys", cache, position, "middle entry", args
            ),
            "leading_bytes": measure(
                f"leading bytes of a stored digest matched (all misses), {size} cached keys",
                cache,
                prefix,
                "0 leading bytes match",
                args,
            ),
        }
    return results, []


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", help="cached keys (default 10000 100000)")
    parser.add_argument("--batch", type=int, default=20, help="lookups per sample (default 20)")


def _measure_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    args.sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000])
    args.rounds = args.rounds or (50 if args.quick else 300)
    return run_timing(args)


if __name__ == "__main__":
    raise SystemExit(cli("timing", __doc__, _measure_args, configure=_options))
