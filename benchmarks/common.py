"""Shared helpers of the benchmark driver: statistics, tables, targets, cache filling."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.principal import APIKeyUser
from keystile.tokens import generate_key

__all__ = [
    "Target",
    "fill_cache",
    "fmt_us",
    "load_average",
    "median",
    "p99",
    "print_table",
    "synthetic_entry",
    "wait_for_quiet",
]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p99(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def fmt_us(value: float, digits: int | None = None) -> str:
    if math.isnan(value):
        return "-"
    if digits is None:
        digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:,.{digits}f}"


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float = 1.5, max_wait: float = 30.0) -> float:
    """Wait (up to ``max_wait`` s) for the 1-minute load average to drop under ``threshold``;
    returns the load average measured last. The machine is shared: this only helps."""
    deadline = time.monotonic() + max_wait
    load = load_average()
    while load > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        load = load_average()
    return load


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
        if math.isnan(self.measured):
            d["measured"] = None
        return d


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
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


def synthetic_entry(key_id: str, *, now: float, owner: str = "bench") -> CachedKey:
    user = APIKeyUser(key_id=key_id, owner=owner, name=f"k-{key_id}", scopes=("read",))
    return CachedKey(user, None, now)


def fill_cache(cache: VerifiedKeyCache, n: int) -> list[bytes]:
    """Insert ``n`` freshly generated keys straight into ``cache`` (no store, no argon2).

    Returns the tokens in slot order: ``tokens[0]`` sits in the first slot of the scan,
    ``tokens[-1]`` in the last.
    """
    now = time.monotonic()
    tokens: list[bytes] = []
    for _ in range(n):
        plaintext, parsed = generate_key()
        token = plaintext.encode()
        ok = cache.insert(
            cache.digest(token), synthetic_entry(parsed.key_id, now=now), now=now, epoch=cache.epoch
        )
        if not ok:
            raise RuntimeError("cache refused an insert")
        tokens.append(token)
    if len(cache) != n:
        raise RuntimeError(f"cache holds {len(cache)} keys, expected {n} (max_size too small?)")
    return tokens
