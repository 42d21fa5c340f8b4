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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

__all__ = [
    "DEFAULT_RATE_LIMIT_STORAGE",
    "MAX_QUOTA",
    "MAX_RATE_LIMITS",
    "POLICY_NAME",
    "LimitFields",
    "LimitPolicy",
    "NamedRate",
    "OwnerLimitFields",
    "QuotaFields",
    "QuotaPolicy",
    "Rate",
    "normalize_rate_limit",
    "parse_rate_limit",
    "parse_rate_limits",
    "quota_changes",
    "redis_tag",
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


#: A limit's name: what ``RateLimit-Policy`` and a 429 call it (an sf-string).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
#: The most named rate limits a key (or an owner) may have.
MAX_RATE_LIMITS = 16


def parse_rate_limits(limits: Mapping[str, str]) -> dict[str, Rate]:
    """Named rate limits (``{"burst": "50/second", "sustained": "10000/hour"}``) parsed;
    ``ValueError`` naming the first bad name or rate."""
    if not isinstance(limits, Mapping):
        raise ValueError("rate_limits must be a mapping of name to rate, e.g. {'burst': '5/s'}")
    if len(limits) > MAX_RATE_LIMITS:
        raise ValueError(f"at most {MAX_RATE_LIMITS} named rate limits")
    parsed: dict[str, Rate] = {}
    for name, text in limits.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"invalid rate limit name {name!r}: 1-32 of a-z, 0-9, '_' and '-',"
                " starting with a letter or digit"
            )
        parsed[name] = parse_rate_limit(text)
    return parsed


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """A quota as its state was read (a key's, or its owner's): the snapshot a process
    starts from."""

    quota: int
    remaining: int
    #: Seconds between refills, or ``None``.
    refill: float | None
    #: Epoch seconds of the last reset to full (refills fall at this plus multiples).
    reset_at: float
    #: What it is spent from: a key's budget, or ``owner:NAME``.
    budget: str = ""
    #: What a 429 calls it: ``quota`` (the key's) or ``owner.quota``.
    name: str = "quota"


@dataclass(frozen=True, slots=True)
class NamedRate:
    """One rate limit a request must fit, with where it is spent."""

    name: str
    rate: Rate
    #: The limiter slot: the budget alone for the key's ``default``, else budget#name.
    slot: str
    #: ``RateLimit-Policy`` field value, under ``name``.
    policy_field: str

    @classmethod
    def of(cls, name: str, rate: Rate, budget: str) -> NamedRate:
        slot = budget if name == POLICY_NAME else f"{budget}#{name}"
        field = rate.policy_field if name == POLICY_NAME else _field(name, rate)
        return cls(name, rate, slot, field)


def _field(name: str, rate: Rate) -> str:
    return f'"{name}";q={rate.count};w={int(rate.period)}'


class QuotaFields(Protocol):
    """The stored fields of a quota (a key's record, or an owner's limits)."""

    @property
    def quota(self) -> int | None: ...
    @property
    def quota_remaining(self) -> int | None: ...
    @property
    def quota_refill(self) -> timedelta | None: ...
    @property
    def quota_reset_at(self) -> datetime | None: ...


class OwnerLimitFields(QuotaFields, Protocol):
    """An owner's limits as stored (``stores.records.OwnerLimits`` has them)."""

    @property
    def owner(self) -> str: ...
    @property
    def rate_limits(self) -> Mapping[str, str]: ...
    @property
    def updated_at(self) -> datetime: ...


class LimitFields(QuotaFields, Protocol):
    """The fields of a key's record that make its :class:`LimitPolicy`
    (``stores.records.KeyRecord`` has them)."""

    @property
    def id(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def budget_id(self) -> str: ...
    @property
    def rate_limit(self) -> str | None: ...
    @property
    def rate_limits(self) -> Mapping[str, str]: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def owner_limits(self) -> OwnerLimitFields | None: ...


def redis_tag(owner: str) -> str:
    """The Redis Cluster hash tag of an owner's keys: the owner without braces."""
    return owner.replace("{", "").replace("}", "")


def _quota(fields: QuotaFields, start: datetime, budget: str, name: str) -> QuotaPolicy | None:
    if fields.quota is None:
        return None
    remaining = fields.quota_remaining
    return QuotaPolicy(
        quota=fields.quota,
        remaining=remaining if remaining is not None else fields.quota,
        refill=fields.quota_refill.total_seconds() if fields.quota_refill else None,
        reset_at=(fields.quota_reset_at or start).timestamp(),
        budget=budget,
        name=name,
    )


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The limits a key's request must fit, precomputed for the request path (on
    ``APIKeyUser.limits``): the key's and its owner's, every one with room or none spent."""

    #: The key's ``default`` rate and its quota.
    rate: Rate | None
    quota: QuotaPolicy | None
    #: What the key's limits are spent from: the key's id, or its rotation chain's budget,
    #: so an old key in grace and its successors share one rate limit and one quota.
    budget: str = ""
    #: Every rate limit that applies (the key's, then its owner's ``owner.NAME``).
    rates: tuple[NamedRate, ...] = ()
    #: Every quota that applies (the key's, then its owner's).
    quotas: tuple[QuotaPolicy, ...] = ()
    #: Whether the key has a ``default`` rate (else the middleware's default applies).
    has_default: bool = False
    #: What keeps one request's Redis keys on one Redis Cluster shard: the owner.
    tag: str = ""

    @classmethod
    def from_record(cls, record: LimitFields) -> LimitPolicy | None:
        """The policy of ``record``, or ``None`` when neither it nor its owner has a limit
        and it spends its own budget (a successor without limits still shares its chain's
        budget under the middleware's default rate)."""
        owner = record.owner_limits
        if (
            record.rate_limit is None
            and record.quota is None
            and not record.rate_limits
            and owner is None
            and record.budget_id == record.id
        ):
            return None
        budget = record.budget_id or record.id
        rate = parse_rate_limit(record.rate_limit) if record.rate_limit is not None else None
        rates = [NamedRate.of(POLICY_NAME, rate, budget)] if rate is not None else []
        rates += [
            NamedRate.of(n, parse_rate_limit(t), budget)
            for n, t in sorted(record.rate_limits.items())
        ]
        quota = _quota(record, record.created_at, budget, "quota")
        quotas = [quota] if quota is not None else []
        if owner is not None:
            shared = f"owner:{owner.owner}"
            rates += [
                NamedRate.of(f"owner.{n}", parse_rate_limit(t), shared)
                for n, t in sorted(owner.rate_limits.items())
            ]
            owner_quota = _quota(owner, owner.updated_at, shared, "owner.quota")
            if owner_quota is not None:
                quotas.append(owner_quota)
        tag = redis_tag(record.owner)
        return cls(rate, quota, budget, tuple(rates), tuple(quotas), rate is not None, tag)

    def with_default(self, rate: Rate) -> tuple[NamedRate, ...]:
        """``rates`` with the middleware's default in front when the key has none."""
        return (
            self.rates
            if self.has_default
            else (NamedRate.of(POLICY_NAME, rate, self.budget), *self.rates)
        )


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
