"""A key's limits as values: a parsed rate (:class:`Rate`), a quota snapshot
(:class:`QuotaPolicy`) and both together (:class:`LimitPolicy`), with the parsing and the
stored form of a new quota.

This is the lowest layer of ``keystile.limits`` and imports nothing from keystile: the
principal holds a :class:`LimitPolicy` and imports this module alone, so nothing that
enforces limits (and needs the usage recorder, the stores and the principal's shape) sits
under the principal. Parsing refuses with ``ValueError``; the callers that speak to
users (the middleware's options, ``KeyManager``, the CLI) turn it into their own errors.

:meth:`LimitPolicy.from_record` reads a key's record through :class:`LimitFields`, a
structural protocol of the six fields it needs, rather than ``stores.records.KeyRecord``:
``KeyRecord`` has that shape (mypy checks it where the principal passes one), and the
policy stays free of the stores, which carry the schema, the protocol and the change bus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

__all__ = [
    "DEFAULT_RATE_LIMIT_STORAGE",
    "MAX_QUOTA",
    "POLICY_NAME",
    "LimitFields",
    "LimitPolicy",
    "QuotaPolicy",
    "Rate",
    "normalize_rate_limit",
    "parse_rate_limit",
    "quota_changes",
]

DEFAULT_RATE_LIMIT_STORAGE = "memory://"
#: The largest quota (and cost): 2**53 - 1, the largest integer every store, Redis's Lua
#: and JSON all hold exactly.
MAX_QUOTA = 2**53 - 1
#: The name of the rate-limit policy in the ``RateLimit-Policy``/``RateLimit`` fields.
POLICY_NAME = "default"

_UNITS: dict[str, tuple[str, int]] = {}
for _unit, _length, _aliases in (
    ("second", 1, ("s", "sec", "secs", "second", "seconds")),
    ("minute", 60, ("m", "min", "mins", "minute", "minutes")),
    ("hour", 3600, ("h", "hr", "hrs", "hour", "hours")),
    ("day", 86400, ("d", "day", "days")),
):
    for _alias in _aliases:
        _UNITS[_alias] = (_unit, _length)
_RATE_RE = re.compile(r"\s*(\d{1,12})\s*(?:/|per)\s*([a-z]+)\s*", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True, slots=True, eq=False)
class Rate:
    """A parsed rate limit, e.g. ``10/second``. Interned: one object per limit, so a
    slot can tell by identity whether the limit it was built for still applies."""

    count: int
    period: float
    #: The normalised form, ``"10/second"``.
    text: str
    #: ``period / count``: how far one request moves the TAT.
    interval: float
    #: ``period - interval``: how far ahead of now the TAT may be for a request to pass.
    tau: float
    #: ``RateLimit-Policy`` field value.
    policy_field: str


_RATES: dict[str, Rate] = {}


def parse_rate_limit(text: str) -> Rate:
    """``"10/second"``, ``"100/minute"``, ``"1000/hour"``, ``"5/day"`` (also ``10/s``,
    ``10 per sec``, …) → :class:`Rate`; ``ValueError`` for anything else."""
    rate = _RATES.get(text)
    if rate is not None:
        return rate
    match = _RATE_RE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None or int(match.group(1)) < 1:
        raise ValueError(
            f"invalid rate limit {text!r}: use N/second, N/minute, N/hour or N/day with N >= 1"
        )
    count, (name, period) = int(match.group(1)), unit
    normal = f"{count}/{name}"
    rate = _RATES.get(normal)
    if rate is None:
        interval = period / count
        rate = Rate(
            count,
            float(period),
            normal,
            interval,
            period - interval,
            f'"{POLICY_NAME}";q={count};w={period}',
        )
        _RATES[normal] = rate
    if len(_RATES) < 10_000:
        _RATES[text] = rate
    return rate


def normalize_rate_limit(text: str | None) -> str | None:
    """The stored form of a rate limit (``"10/s"`` → ``"10/second"``); ``None`` stays."""
    return None if text is None else parse_rate_limit(text).text


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """A key's quota as its state was read: the snapshot a process starts from."""

    quota: int
    remaining: int
    #: Seconds between refills, or ``None``.
    refill: float | None
    #: Epoch seconds of the last reset to full (refills fall at this plus multiples).
    reset_at: float


class LimitFields(Protocol):
    """The fields of a key's record that make its :class:`LimitPolicy`
    (``stores.records.KeyRecord`` has them)."""

    @property
    def id(self) -> str: ...
    @property
    def budget_id(self) -> str: ...

    @property
    def rate_limit(self) -> str | None: ...
    @property
    def quota(self) -> int | None: ...
    @property
    def quota_remaining(self) -> int | None: ...
    @property
    def quota_refill(self) -> timedelta | None: ...
    @property
    def quota_reset_at(self) -> datetime | None: ...
    @property
    def created_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The limits of one key, precomputed for the request path (on ``APIKeyUser.limits``)."""

    rate: Rate | None
    quota: QuotaPolicy | None
    #: What the limits are spent from: the key's id, or its rotation chain's budget, so
    #: an old key in grace and its successors share one rate limit and one quota.
    budget: str = ""

    @classmethod
    def from_record(cls, record: LimitFields) -> LimitPolicy | None:
        """The policy of ``record``, or ``None`` when it has no limit of its own and
        spends its own budget (a successor without limits still shares its chain's
        budget under the middleware's default rate)."""
        if record.rate_limit is None and record.quota is None and record.budget_id == record.id:
            return None
        rate = parse_rate_limit(record.rate_limit) if record.rate_limit is not None else None
        quota = None
        if record.quota is not None:
            reset = record.quota_reset_at or record.created_at
            quota = QuotaPolicy(
                quota=record.quota,
                remaining=(
                    record.quota_remaining if record.quota_remaining is not None else record.quota
                ),
                refill=record.quota_refill.total_seconds() if record.quota_refill else None,
                reset_at=reset.timestamp(),
            )
        return cls(rate, quota, record.budget_id or record.id)


def quota_changes(quota: int | None, refill: timedelta | None, now: datetime) -> dict[str, Any]:
    """The stored fields of a new quota: full, its period starting ``now``."""
    if quota is None:
        return {
            "quota": None,
            "quota_remaining": None,
            "quota_refill": None,
            "quota_reset_at": None,
        }
    return {
        "quota": quota,
        "quota_remaining": quota,
        "quota_refill": refill,
        "quota_reset_at": now,
    }
