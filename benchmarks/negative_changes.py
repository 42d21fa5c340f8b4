"""What change events cost while the negative cache is full: a reap during a guessing flood.

A ``Verifier`` with ``--entries`` remembered refusals (default 10 000: one revoked-key
refusal for each of the ``--events`` keys about to change, the rest wrong secrets and
unknown ids, as a flood leaves them) receives ``--events`` change events (default
1 000, one per key: what a reaper revoking that many keys sends), through
``Verifier.on_change``. Timed, in the same run and on the same entries:

* **indexed**: ``on_change`` as it is, the negative cache indexed by key id;
* **indexed again**: the same, measured twice (the A/A control: what noise alone does);
* **full scan**: the previous ``on_change``, reproduced here: evict the key, then walk
  every remembered refusal (a ``cachetools.TTLCache``) for that key's. It takes tens of
  milliseconds per event, so it runs ``--baseline-events`` of the events per run
  (default 20) and its total is that time scaled to ``--events``.

Each run times the arms in an order that alternates between runs, each on a cache filled
afresh (untimed) right before, with the garbage collector off. Reported: the median over
``--runs`` of the time for all events, per event, and the ratio full scan / indexed.
Target: all events in at most 50 ms with the index.

    python benchmarks/negative_changes.py
    python benchmarks/negative_changes.py --runs 21 --baseline-events 1000   # no scaling
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

from cachetools import TTLCache

from keystile import MemoryKeyStore
from keystile.tokens import new_key_id
from keystile.verifier import Verifier

TARGET_MS = 50.0
NEGATIVE_TTL = 30.0

Entries = list[tuple[bytes, str, str | None]]


def entries_for(changed: list[str], total: int) -> Entries:
    """One state-decided refusal per changed key; the rest guesses with no key id."""
    rows: Entries = [(os.urandom(32), "revoked", key_id) for key_id in changed]
    reasons = ("wrong_secret", "unknown")
    rows += [(os.urandom(32), reasons[i % 2], None) for i in range(total - len(rows))]
    return rows


def indexed(entries: Entries) -> Verifier:
    verifier = Verifier(MemoryKeyStore(), negative_max_size=len(entries))
    negative = verifier._negative
    assert negative is not None
    for digest, reason, key_id in entries:
        negative.remember(digest, reason, key_id)
    assert len(negative) == len(entries)
    return verifier


def full_scan(entries: Entries) -> tuple[Verifier, TTLCache[bytes, tuple[str, str | None]]]:
    verifier = Verifier(MemoryKeyStore(), negative_ttl=0)
    negative: TTLCache[bytes, tuple[str, str | None]] = TTLCache(
        maxsize=len(entries), ttl=NEGATIVE_TTL, timer=lambda: verifier.monotonic()
    )
    for digest, reason, key_id in entries:
        negative[digest] = (reason, key_id)
    return verifier, negative


def full_scan_on_change(
    verifier: Verifier, negative: TTLCache[bytes, tuple[str, str | None]], key_id: str
) -> None:
    """The previous ``Verifier.on_change(key_id)``, word for word but for the attribute."""
    verifier.counters.revocation_events += 1
    verifier.cache.evict(key_id)
    if negative:
        stale = [
            digest
            for digest, (_, owner_id) in list(negative.items())
            if owner_id is not None and (key_id is None or owner_id == key_id)
        ]
        for digest in stale:
            negative.pop(digest, None)


def timed(run: Callable[[], None]) -> float:
    """Seconds ``run`` takes, with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    finally:
        gc.enable()


def one_run(changed: list[str], total: int, baseline_events: int, flip: bool) -> dict[str, float]:
    """Seconds for all events per arm (the full scan scaled from its share). Each arm's
    cache is filled right before it is timed, so each starts as warm as the others."""
    entries = entries_for(changed, total)
    share = changed[:baseline_events]

    def indexed_arm() -> float:
        v = indexed(entries)

        def run() -> None:
            for key_id in changed:
                v.on_change(key_id)

        seconds = timed(run)
        assert v._negative is not None and len(v._negative) == total - len(changed)
        return seconds

    def full_scan_arm() -> float:
        v, negative = full_scan(entries)

        def run() -> None:
            for key_id in share:
                full_scan_on_change(v, negative, key_id)

        seconds = timed(run)
        assert len(negative) == total - len(share)
        return seconds * len(changed) / len(share)

    arms = {"indexed": indexed_arm, "indexed again": indexed_arm, "full scan": full_scan_arm}
    order = list(arms)
    return {name: arms[name]() for name in (reversed(order) if flip else order)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000)
    parser.add_argument("--baseline-events", type=int, default=20)
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    changed = [new_key_id() for _ in range(args.events)]
    baseline_events = min(args.baseline_events, args.events)
    samples: dict[str, list[float]] = {}
    for i in range(args.runs):
        for name, seconds in one_run(changed, args.entries, baseline_events, i % 2 == 1).items():
            samples.setdefault(name, []).append(seconds)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"{args.events} change events, {args.entries} remembered refusals "
        f"({args.events} of them state-decided); median of {args.runs} runs; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'arm':<16}{'all events ms':>15}{'per event µs':>14}")
    for name, seconds in medians.items():
        note = f"  (scaled from {baseline_events} events)" if name == "full scan" else ""
        print(f"{name:<16}{seconds * 1e3:>15.2f}{seconds / args.events * 1e6:>14.2f}{note}")
    ratio = medians["full scan"] / medians["indexed"]
    control = medians["indexed again"] / medians["indexed"]
    verdict = "PASS" if medians["indexed"] * 1e3 <= TARGET_MS else "MISS"
    print(
        f"full scan / indexed: {ratio:,.0f}x; A/A control (indexed again / indexed): {control:.2f}"
    )
    print(f"target: all events <= {TARGET_MS:g} ms with the index: {verdict}")


if __name__ == "__main__":
    main()
