"""Hit path: one verification on a cache hit vs the number of cached keys.

Four ways to find a presented token among N cached keys, each timed from the request's
header list (so they differ only in the lookup):

* ``keystile``: the compiled hit path, one call (``keystile._speedups``: the header walk,
  the keyed BLAKE2b and the branch-free tag scan, both candidates compared), or, where it
  is not built, the pure one;
* ``keystile pure``: the pure-Python path: ``split_credential``, ``cache.digest(token)``
  and ``cache.lookup(digest, now)`` (the numpy tag scan over every entry, ``find`` +
  ``rfind``, two ``hmac.compare_digest``);
* ``hmac loop``: the split and the digest, then a plain Python loop of ``hmac.compare_digest`` over all
  N digests that records the match and keeps going (the constant-time baseline);
* ``dict``: the split and the digest, then ``dict.get`` (the non-constant-time floor).

Each sample times a batch of calls with ``time.perf_counter_ns`` (GC off during the
batch, as ``timeit`` does); the four positions (match in the first, middle and last slot,
and no match) are interleaved round by round, ABBA. Reported: the median and p99 of the
per-call time of the samples. ``Verifier.verify`` (async, end to end) is measured too,
for context.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from asgi import BENCH_HEADERS
from harness import (
    Target,
    batch_arms,
    fmt_us,
    interleave,
    median,
    p99,
    print_table,
    rounds_for,
    time_batch,
)

from apps import fill_cache
from keystile import MemoryKeyStore
from keystile._accel import compiled_kernel
from keystile.cache import VerifiedKeyCache
from keystile.credentials import split_credential
from keystile.hashing import CHEAPEST_PARAMETERS, SecretHasher
from keystile.tokens import generate_key
from keystile.verifier import Verifier

__all__ = ["HIT_TARGETS", "run_hitpath"]

POSITIONS = ("first", "middle", "last", "none")
MATCH_POSITIONS = ("first", "middle", "last")
METHODS = ("keystile", "keystile pure", "hmac loop", "dict")
#: Median µs of a cache hit from the header list (split + digest + scan), at N cached keys.
HIT_TARGETS = {10: 2.0, 1_000: 1.0, 10_000: 4.0, 100_000: 25.0}
#: First / middle / last position: (max - min) / median, on both paths.
POSITION_TARGET_PCT = 3.0
HEADER = b"x-api-key"
CALLS_PER_SAMPLE = 200


def _headers(token: bytes) -> list[tuple[bytes, bytes]]:
    return [*BENCH_HEADERS, (b"authorization", b"Bearer " + token)]


def _lookups(
    cache: VerifiedKeyCache, pure: VerifiedKeyCache, tokens: list[bytes]
) -> dict[str, Callable[[list[tuple[bytes, bytes]]], object]]:
    now = time.monotonic()
    # The same digests the cache holds, in slot order, for the two references.
    table_digests: list[bytes] = [pure.digest(token) for token in tokens]
    table = {d: e for d, e in zip(table_digests, pure, strict=True)}
    compare = hmac.compare_digest
    digest, lookup = pure.digest, pure.lookup

    def keystile_pure(headers: list[tuple[bytes, bytes]]) -> object:
        token, _, _ = split_credential(headers, HEADER)
        return None if token is None else lookup(digest(token), now)

    hit_request = cache.hit_request
    if hit_request is not None:

        def keystile(headers: list[tuple[bytes, bytes]]) -> object:
            return hit_request(headers, HEADER, None, False)

    else:
        keystile = keystile_pure

    def hmac_loop(headers: list[tuple[bytes, bytes]]) -> object:
        token, _, _ = split_credential(headers, HEADER)
        d = digest(token or b"")
        found = None
        for candidate in table_digests:
            if compare(candidate, d):
                found = candidate  # record the match, keep looping: no early exit
        return found

    def dict_get(headers: list[tuple[bytes, bytes]]) -> object:
        token, _, _ = split_credential(headers, HEADER)
        return table.get(digest(token or b""))

    return {
        "keystile": keystile,
        "keystile pure": keystile_pure,
        "hmac loop": hmac_loop,
        "dict": dict_get,
    }


def _measure_size(n: int, budget: float) -> dict[str, Any]:
    key = secrets.token_bytes(32)
    cache = VerifiedKeyCache(max_size=max(n, 1), key=key)
    pure = VerifiedKeyCache(max_size=max(n, 1), key=key, compiled=False)
    tokens = fill_cache(cache, n)
    for entry, token in zip(cache, tokens, strict=True):
        pure.insert(pure.digest(token), entry, now=entry.checked_at, epoch=pure.epoch)
    absent = generate_key()[0].encode()
    probe = {
        "first": _headers(tokens[0]),
        "middle": _headers(tokens[n // 2]),
        "last": _headers(tokens[-1]),
        "none": _headers(absent),
    }
    fns = _lookups(cache, pure, tokens)
    # Sanity: every method finds the present tokens and misses the absent one.
    for name, fn in fns.items():
        for pos, token in probe.items():
            if (fn(token) is None) != (pos == "none"):
                raise AssertionError(f"{name} got position {pos} wrong at N={n}")
    result: dict[str, Any] = {"n": n}
    for name, fn in fns.items():
        estimate = min(time_batch(fn, probe["middle"], 3) for _ in range(3))
        calls = CALLS_PER_SAMPLE
        if name == "hmac loop":
            calls = max(1, min(CALLS_PER_SAMPLE, int(2_000 / max(estimate, 1e-3))))
        rounds = rounds_for(budget, estimate * calls, len(POSITIONS), minimum=7, maximum=2_000)
        samples = interleave(batch_arms(fn, probe, calls), rounds)
        everything = [s for pos in POSITIONS for s in samples[pos]]
        per_position = {
            pos: {"median_us": median(samples[pos]), "p99_us": p99(samples[pos])}
            for pos in POSITIONS
        }
        medians = [per_position[p]["median_us"] for p in MATCH_POSITIONS]
        overall = median(everything)
        matched = median(medians)
        result[name] = {
            "calls_per_sample": calls,
            "samples_per_position": rounds,
            "median_us": overall,
            "p99_us": p99(everything),
            "worst_position_median_us": max(v["median_us"] for v in per_position.values()),
            # Where the match sits: first, middle, last slot.
            "position_spread_pct": (max(medians) - min(medians)) / matched * 100,
            # A match vs no match at all (which then takes the miss path anyway).
            "no_match_vs_match_pct": (per_position["none"]["median_us"] - matched) / matched * 100,
            "positions": per_position,
        }
    digest = cache.digest
    result["digest_only_us"] = median(
        [time_batch(digest, tokens[n // 2], CALLS_PER_SAMPLE) for _ in range(50)]
    )
    result["verifier_verify"] = asyncio.run(_measure_verify(cache, tokens[n // 2], budget / 4))
    return result


async def _measure_verify(cache: VerifiedKeyCache, token: bytes, budget: float) -> dict[str, float]:
    """``await Verifier.verify(token)`` on a hit, end to end (a coroutine per call)."""
    verifier = Verifier(MemoryKeyStore(), hasher=SecretHasher(CHEAPEST_PARAMETERS))
    verifier.cache = cache
    verify = verifier.verify
    await verify(token)
    perf = time.perf_counter_ns
    samples: list[float] = []
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline or len(samples) < 7:
        gc.disable()
        t0 = perf()
        for _ in range(CALLS_PER_SAMPLE):
            await verify(token)
        elapsed = perf() - t0
        gc.enable()
        samples.append(elapsed / CALLS_PER_SAMPLE / 1_000)
    return {"median_us": median(samples), "p99_us": p99(samples)}


def run_hitpath(sizes: list[int], budget: float) -> tuple[dict[str, Any], list[Target]]:
    """Measure every size; ``budget`` is the rough number of seconds per method and size."""
    # A fresh process runs the first ~second slower (the first size measured came out 50%
    # slower, the dict reference included): warm up on a throwaway run first.
    _measure_size(min(sizes), budget / 2)
    results = []
    for n in sizes:
        print(f"  hit path: {n:,} cached keys ...", flush=True)
        results.append(_measure_size(n, budget))
        gc.collect()

    rows = []
    for r in results:
        k, kp, h, d = r["keystile"], r["keystile pure"], r["hmac loop"], r["dict"]
        rows.append(
            (
                f"{r['n']:,}",
                fmt_us(k["median_us"]),
                fmt_us(k["p99_us"]),
                " / ".join(fmt_us(k["positions"][p]["median_us"]) for p in POSITIONS),
                f"{k['position_spread_pct']:.1f}%",
                f"{k['no_match_vs_match_pct']:+.1f}%",
                fmt_us(kp["median_us"]),
                " / ".join(fmt_us(kp["positions"][p]["median_us"]) for p in POSITIONS),
                f"{kp['position_spread_pct']:.1f}%",
                fmt_us(r["verifier_verify"]["median_us"]),
                fmt_us(h["median_us"]),
                f"{h['position_spread_pct']:.1f}%",
                fmt_us(d["median_us"]),
                fmt_us(r["digest_only_us"]),
            )
        )
    print_table(
        f"Hit path: µs per cache hit from the header list (split + digest + scan; "
        f"compiled: {compiled_kernel() or 'not built'})",
        (
            "cached keys",
            "keystile median",
            "p99",
            "first / middle / last / none",
            "match spread",
            "none vs match",
            "pure median",
            "first / middle / last / none",
            "spread",
            "Verifier.verify",
            "hmac loop median",
            "spread",
            "dict median",
            "digest alone",
        ),
        rows,
    )
    targets: list[Target] = []
    by_n = {r["n"]: r for r in results}
    for n, limit in HIT_TARGETS.items():
        if n in by_n:
            worst = by_n[n]["keystile"]["worst_position_median_us"]
            targets.append(
                Target(
                    "hit path",
                    f"cache hit (split + digest + scan) at {n:,} keys (slowest position)",
                    worst,
                    limit,
                    "µs",
                    note=f"pure path {by_n[n]['keystile pure']['worst_position_median_us']:.2f} µs",
                )
            )
    for method in ("keystile", "keystile pure"):
        worst_n = max(by_n, key=lambda n: by_n[n][method]["position_spread_pct"])
        targets.append(
            Target(
                "hit path",
                f"position spread, {method.replace('keystile', 'compiled') if method == 'keystile' else 'pure'} "
                f"path, worst of {min(by_n):,}-{max(by_n):,} keys (first/middle/last)",
                by_n[worst_n][method]["position_spread_pct"],
                POSITION_TARGET_PCT,
                "%",
                note=f"at {worst_n:,} keys",
            )
        )
    return {"sizes": results, "compiled_kernel": compiled_kernel()}, targets
