"""What a store holds and hands back: a key (``KeyRecord``), an audit event (``KeyEvent``),
usage counts and quota states. Values only: they import nothing of keystile, so every
layer can read them.

The quota-refill arithmetic lives here, with the record whose ``quota_left`` and
``next_refill`` need it; ``rules.apply_uses`` builds the store's write on it, and the SQL
stores run the same rule in one statement (``sql.touch_statement``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "KeyEvent",
    "KeyRecord",
    "OwnerLimits",
    "QuotaState",
    "UsageBucket",
    "UsageCounts",
    "UsageTotal",
    "json_fields",
    "refills_due",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def refills_due(refill: timedelta | None, reset_at: datetime | None, at: datetime) -> int:
    """Whole refill periods from ``reset_at`` to ``at``: how many times the quota has
    been set back to full since it was last set (0 for a quota that never refills)."""
    if refill is None or reset_at is None or refill <= timedelta(0):
        return 0
    return max(0, (at - reset_at) // refill)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def json_fields(item: Any, *names: str) -> dict[str, Any]:
    """``item``'s attributes ``names``, in that order, JSON-ready: times as ISO 8601 text,
    tuples as lists, mappings as dicts."""
    return {name: _json_value(getattr(item, name)) for name in names}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _quota_left(q: KeyRecord | OwnerLimits, now: datetime | None) -> int | None:
    if q.quota is None:
        return None
    if refills_due(q.quota_refill, q.quota_reset_at, now or utcnow()):
        return q.quota
    return q.quota_remaining if q.quota_remaining is not None else q.quota


def _next_refill(q: KeyRecord | OwnerLimits, now: datetime | None) -> datetime | None:
    refill, reset_at = q.quota_refill, q.quota_reset_at
    if q.quota is None or refill is None or reset_at is None or refill <= timedelta(0):
        return None
    return reset_at + (refills_due(refill, reset_at, now or utcnow()) + 1) * refill


def _public_limits(q: KeyRecord | OwnerLimits, now: datetime | None) -> dict[str, Any]:
    refill = q.quota_refill
    return {
        "rate_limits": dict(q.rate_limits),
        "quota": q.quota,
        "quota_remaining": _quota_left(q, now),
        "quota_refill": refill.total_seconds() if refill is not None else None,
        "quota_next_refill": _iso(_next_refill(q, now)),
    }


@dataclass(frozen=True, slots=True)
class OwnerLimits:
    """An owner's own limits, shared by every key of the owner: named rate limits and a
    quota with its refill, spent from the budget ``owner:OWNER``."""

    owner: str
    #: name → normalised rate (``{"burst": "50/second"}``).
    rate_limits: Mapping[str, str] = field(default_factory=dict)
    quota: int | None = None
    quota_remaining: int | None = None
    quota_refill: timedelta | None = None
    quota_reset_at: datetime | None = None
    #: When they were last set: the start of a quota without ``quota_reset_at``.
    updated_at: datetime = field(default_factory=utcnow)

    @property
    def budget_id(self) -> str:
        return f"owner:{self.owner}"

    def quota_left(self, now: datetime | None = None) -> int | None:
        """Uses left now (the full quota when a refill fell due since the last write)."""
        return _quota_left(self, now)

    def next_refill(self, now: datetime | None = None) -> datetime | None:
        return _next_refill(self, now)

    def to_row(self) -> dict[str, Any]:
        """As copied onto the owner's keys (JSON, times as epoch seconds)."""
        refill, reset_at = self.quota_refill, self.quota_reset_at
        return {
            "owner": self.owner,
            "rate_limits": dict(self.rate_limits),
            "quota": self.quota,
            "quota_remaining": self.quota_remaining,
            "quota_refill": refill.total_seconds() if refill is not None else None,
            "quota_reset_at": reset_at.timestamp() if reset_at is not None else None,
            "updated_at": self.updated_at.timestamp(),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> OwnerLimits:
        refill, reset_at = row.get("quota_refill"), row.get("quota_reset_at")
        return cls(
            owner=row["owner"],
            rate_limits=dict(row.get("rate_limits") or {}),
            quota=row.get("quota"),
            quota_remaining=row.get("quota_remaining"),
            quota_refill=timedelta(seconds=refill) if refill is not None else None,
            quota_reset_at=(
                datetime.fromtimestamp(reset_at, timezone.utc) if reset_at is not None else None
            ),
            updated_at=datetime.fromtimestamp(row["updated_at"], timezone.utc),
        )

    def to_public_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON-ready (``keystile owner show --json``)."""
        return {
            "owner": self.owner,
            **_public_limits(self, now),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A key's quota as a batched usage write left it: what ``touch_many`` returns."""

    remaining: int
    reset_at: datetime | None


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """A key's use in one period starting at ``start`` (UTC): requests it authenticated,
    and attempts refused against its id (wrong secret, revoked, expired, disabled)."""

    start: datetime
    requests: int
    rejected: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``keystile usage --json``)."""
        return json_fields(self, "start", "requests", "rejected")


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """One key's use over a period: a row of ``KeyManager.top_keys``."""

    key_id: str
    name: str
    requests: int
    rejected: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: What a usage flush writes: ``(key_id, minute start) -> (requests, rejected)``, added to
#: what the store already holds for that minute (other processes count the same minutes).
UsageCounts = Mapping[tuple[str, datetime], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key as stored. ``secret_hash`` is the argon2id hash, never the secret."""

    id: str
    owner: str
    name: str
    prefix: str
    secret_hash: str = field(repr=False)
    scopes: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    #: The key this one replaced (``rotate`` or ``create(replace=True)``).
    replaces: str | None = None
    #: The key that replaced this one.
    replaced_by: str | None = None
    #: Requests per period, normalised (``10/second``, ``100/minute``, ``1000/hour``,
    #: ``5/day``), or ``None``: no limit of its own (the middleware's default applies).
    rate_limit: str | None = None
    #: Uses allowed in all (or per ``quota_refill`` period), or ``None``: unlimited.
    quota: int | None = None
    #: Uses left as of the last batched usage write (``None`` without a quota).
    quota_remaining: int | None = None
    #: How often ``quota_remaining`` is set back to ``quota``; ``None``: never.
    quota_refill: timedelta | None = None
    #: When ``quota_remaining`` was last set to ``quota`` (created, updated or refilled):
    #: refills fall at this time plus whole multiples of ``quota_refill``.
    quota_reset_at: datetime | None = None
    #: When the key was disabled (``disable``), or ``None``. Unlike a revocation this is
    #: reversible (``enable``); a disabled key keeps its name.
    disabled_at: datetime | None = None
    #: CIDRs (IPv4 and IPv6, normalised) the key may be used from; empty: anywhere.
    ip_allowlist: tuple[str, ...] = ()
    #: The budget the key spends its rate limits and quota from: its own id, or for a
    #: successor the budget of the key it rotated (a rotation chain spends one budget).
    #: ``None`` when built becomes the key's own id.
    budget_id: str = ""
    #: Named rate limits besides ``rate_limit`` (which is the one named ``default``):
    #: name → normalised rate. A request needs room in every one.
    rate_limits: Mapping[str, str] = field(default_factory=dict)
    #: The owner's limits, copied onto each of its keys in the transaction that sets
    #: them (and into a key created later), so a verified key carries its owner's
    #: limits and a change to them reaches every process as a change to each key does.
    #: ``None``: the owner has none. The quota's ``quota_remaining`` here is a starting
    #: point; the owner's own row holds the count every flush takes from.
    owner_limits: OwnerLimits | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.budget_id:
            object.__setattr__(self, "budget_id", self.id)

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``disabled``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        if self.disabled_at is not None:
            return "disabled"
        return "active"

    def is_active(self, now: datetime | None = None) -> bool:
        return self.status(now) == "active"

    def holds_name(self, now: datetime | None = None) -> bool:
        """Whether the key keeps its ``(owner, name)`` from other keys: neither revoked
        nor expired. A disabled key holds its name, so enabling it can never make two
        active keys of one name."""
        return self.revoked_at is None and (
            self.expires_at is None or self.expires_at > (now or utcnow())
        )

    def quota_left(self, now: datetime | None = None) -> int | None:
        """Uses left now: ``quota_remaining``, or the full ``quota`` when a refill fell
        due since the last usage write (the store applies it with the next one)."""
        return _quota_left(self, now)

    def next_refill(self, now: datetime | None = None) -> datetime | None:
        """When the quota is next set back to full, or ``None`` if it never is."""
        return _next_refill(self, now)

    def to_public_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """Every field but the hash, JSON-ready (timestamps as ISO 8601)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "prefix": self.prefix,
            "redacted": f"{self.prefix}_{self.id}…",
            "scopes": list(self.scopes),
            "metadata": dict(self.metadata),
            "status": self.status(now),
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "last_used_at": _iso(self.last_used_at),
            "revoked_at": _iso(self.revoked_at),
            "replaces": self.replaces,
            "replaced_by": self.replaced_by,
            "rate_limit": self.rate_limit,
            **_public_limits(self, now),
            "disabled_at": _iso(self.disabled_at),
            "ip_allowlist": list(self.ip_allowlist),
        }


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One audit-log entry: a change to a key, written in the change's own transaction.

    ``detail`` is JSON (for ``updated``: the fields set and their new values); it never
    holds a secret or a hash. A ``pruned`` event concerns the log itself, not a key:
    its ``key_id`` and ``owner`` are empty."""

    at: datetime
    key_id: str
    owner: str
    action: str
    actor: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: The store's sequence number: increasing in the order events were written.
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, one line per event for a SIEM (``keystile events --json``)."""
        return json_fields(self, "id", "at", "key_id", "owner", "action", "actor", "detail")
