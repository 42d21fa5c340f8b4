"""Operator counters: what the cache, argon2 and the usage recorder are doing."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["ARGON2_BUCKETS", "Counters", "KeystileStats"]

#: Upper bounds (seconds) of the argon2 duration histogram: around the ~7 ms a
#: verification costs at the default parameters, and far past it (a starved thread pool,
#: heavier parameters).
ARGON2_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class Counters:
    """Mutable counters, bumped on the request path (plain integer adds)."""

    #: Requests the verified-key cache answered.
    cache_hits: int = 0
    #: Well-formed keys neither the cache nor the negative cache answered: each went on
    #: to admission and, unless refused there, a store read.
    cache_misses: int = 0
    #: Refusals repeated from the negative cache: neither hits nor misses.
    negative_hits: int = 0
    argon2_verifications: int = 0
    argon2_seconds: float = 0.0
    state_refreshes: int = 0
    stale_served: int = 0
    revocation_events: int = 0
    cache_resets: int = 0
    #: Requests refused by a key's rate limit or quota, and limiter decisions made
    #: without the shared limiter (Redis unreachable; see ``rate_limit_on_error``).
    rate_limited: int = 0
    quota_exceeded: int = 0
    rate_limit_errors: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    #: argon2 verifications by duration: ``[i]`` counts those in ``ARGON2_BUCKETS[i-1],
    #: ARGON2_BUCKETS[i]`` (the last, those above every bound). Bumped on the miss path.
    argon2_buckets: list[int] = field(default_factory=lambda: [0] * (len(ARGON2_BUCKETS) + 1))

    def count_argon2(self, seconds: float) -> None:
        """One argon2 verification that took ``seconds``."""
        self.argon2_verifications += 1
        self.argon2_seconds += seconds
        self.argon2_buckets[bisect_left(ARGON2_BUCKETS, seconds)] += 1


@dataclass(frozen=True, slots=True)
class KeystileStats:
    """A point-in-time snapshot of the middleware's counters.

    ``hit_ratio`` is hits / (hits + misses) of the verified-key cache: near 1.0 in steady
    state. A refusal repeated from the negative cache is counted in ``negative_hits``, not
    as a miss, and a malformed key in ``rejects`` alone, so replayed bad keys leave the
    ratio alone. A low ratio means the cache is too small or the idle bound too short, or
    clients present many distinct keys never seen before: fresh guesses or unknown ids
    (``rejects``: ``wrong_secret``, ``unknown``, ``too_many_failures``).
    """

    cache_hits: int
    cache_misses: int
    hit_ratio: float
    negative_hits: int
    argon2_verifications: int
    argon2_seconds: float
    argon2_in_flight: int
    cache_size: int
    cache_max_size: int
    state_refreshes: int
    stale_served: int
    revocation_events: int
    cache_resets: int
    rejects: dict[str, int]
    pending_touches: int
    flushes: int
    flush_failures: int
    touches_written: int
    rate_limited: int = 0
    quota_exceeded: int = 0
    rate_limit_errors: int = 0
    #: argon2 verifications per duration bucket (``ARGON2_BUCKETS``, then above them).
    argon2_buckets: tuple[int, ...] = ()
    #: Per-key, per-minute usage rows waiting for the next flush, written, and dropped
    #: because the store stayed unreachable past ``max_usage_rows``.
    usage_pending: int = 0
    usage_rows_written: int = 0
    usage_dropped: int = 0
    #: The verification memo: misses it answered (no argon2), misses with no matching
    #: entry, and misses it could not answer (Redis failed, or left alone after a failure).
    memo_hits: int = 0
    memo_misses: int = 0
    memo_errors: int = 0

    @classmethod
    def of(cls, counters: Counters, *, table_hits: int = 0, **others: Any) -> KeystileStats:
        """A snapshot of the request path's ``counters``, each under its own name, and of
        ``others``: what the cache and the usage recorder report. ``table_hits``: the hits
        the compiled cache table answered, counted there (with ``counters.cache_hits``,
        those Python answered, they are ``cache_hits``)."""
        values = {f.name: getattr(counters, f.name) for f in fields(counters)}
        values["rejects"] = dict(counters.rejects)
        values["argon2_buckets"] = tuple(counters.argon2_buckets)
        values["cache_hits"] = hits = counters.cache_hits + table_hits
        lookups = hits + counters.cache_misses
        hit_ratio = hits / lookups if lookups else 0.0
        return cls(**values, **others, hit_ratio=hit_ratio)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
