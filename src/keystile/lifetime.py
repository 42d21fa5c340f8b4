"""The lifetime policy: with ``KeyManager(max_lifetime="366d")`` every key expires, and
none lives longer than the maximum, counted from its creation.

A key is refused when a create, update or rotate would leave it without an expiry or
with one past ``created_at + max_lifetime``; an update cannot stretch a key past the
lifetime it was created under (rotate it instead: the successor starts a new lifetime).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from .durations import format_duration, parse_duration
from .errors import ConfigurationError, LifetimeExceeded

__all__ = ["check_lifetime", "lifetime_option"]


def lifetime_option(value: timedelta | str | None, name: str = "max_lifetime") -> timedelta | None:
    """``"366d"`` or a ``timedelta`` → a positive ``timedelta``; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        delta = parse_duration(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    if isinstance(delta, timedelta) and delta > timedelta(0):
        return delta
    raise ConfigurationError(f"{name} must be a positive duration such as '366d'")


def check_lifetime(
    max_lifetime: timedelta | None, created_at: datetime, expires_at: datetime | None
) -> None:
    """Raise :class:`LifetimeExceeded` unless a key created at ``created_at`` and expiring
    at ``expires_at`` keeps within ``max_lifetime`` (no policy: anything goes)."""
    if max_lifetime is None:
        return
    most = format_duration(max_lifetime)
    if expires_at is None:
        raise LifetimeExceeded(
            "no_expiry", f"keys must expire: give an expiry of at most {most} (max_lifetime)"
        )
    if expires_at - created_at > max_lifetime:
        raise LifetimeExceeded(
            "too_long",
            f"the expiry {expires_at.isoformat()} is past the maximum lifetime of {most}"
            f" from the key's creation ({created_at.isoformat()})",
        )
