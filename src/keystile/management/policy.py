"""KeyPolicy: what a customer may give their own keys through the management API.

The app grants; the customer chooses within. Scopes come only from ``grantable_scopes``;
an owner holds at most ``max_keys`` live keys (unrevoked, unexpired; the store counts them
in the insert's own transaction, so concurrent creates cannot pass the cap); no key lives
longer than ``max_lifetime`` from its creation (a key without an expiry is then not
allowed); a key created without an expiry gets ``default_expires_in``. The plan a key is
given (``rate_limit``, ``quota``, ``quota_refill``) is the app's: the API has no field
that sets or raises it, and a rotation keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..durations import parse_duration
from ..errors import ConfigurationError, KeyManagementError, RequestRefused
from ..validation import validate_quota, validate_rate_limit, validate_refill, validate_scopes

__all__ = ["DEFAULT_MAX_GRACE", "KeyPolicy"]

#: The longest grace a customer may give a rotated key by default.
DEFAULT_MAX_GRACE = timedelta(days=7)


def _duration(value: timedelta | str | None, what: str) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        delta = value
    else:
        try:
            delta = parse_duration(value)
        except ValueError as exc:
            raise ConfigurationError(f"KeyPolicy {what}: {exc}") from None
    if delta is not None and delta <= timedelta(0):
        raise ConfigurationError(f"KeyPolicy {what} must be positive")
    return delta


@dataclass(frozen=True)
class KeyPolicy:
    """The caps of the management API (see the module docstring). Durations are
    ``timedelta`` or text (``"90d"``)."""

    grantable_scopes: frozenset[str] = field(default_factory=frozenset)
    max_keys: int | None = None
    max_lifetime: timedelta | None = None
    default_expires_in: timedelta | None = None
    max_grace: timedelta = DEFAULT_MAX_GRACE
    rate_limit: str | None = None
    quota: int | None = None
    quota_refill: timedelta | None = None

    def __init__(
        self,
        *,
        grantable_scopes: Iterable[str] = (),
        max_keys: int | None = None,
        max_lifetime: timedelta | str | None = None,
        default_expires_in: timedelta | str | None = None,
        max_grace: timedelta | str = DEFAULT_MAX_GRACE,
        rate_limit: str | None = None,
        quota: int | None = None,
        quota_refill: timedelta | str | None = None,
    ) -> None:
        if isinstance(grantable_scopes, str):
            raise ConfigurationError("KeyPolicy grantable_scopes is a list of scopes")
        if max_keys is not None and (isinstance(max_keys, bool) or max_keys < 1):
            raise ConfigurationError("KeyPolicy max_keys must be at least 1")
        lifetime = _duration(max_lifetime, "max_lifetime")
        default = _duration(default_expires_in, "default_expires_in")
        if lifetime is not None and default is not None and default > lifetime:
            raise ConfigurationError("KeyPolicy default_expires_in is longer than max_lifetime")
        try:
            scopes = frozenset(validate_scopes(grantable_scopes))
            plan = (validate_rate_limit(rate_limit), validate_quota(quota))
            refill = validate_refill(quota_refill)
        except KeyManagementError as exc:
            raise ConfigurationError(f"KeyPolicy: {exc}") from None
        values = {
            "grantable_scopes": scopes,
            "max_keys": max_keys,
            "max_lifetime": lifetime,
            "default_expires_in": default,
            "max_grace": _duration(max_grace, "max_grace"),
            "rate_limit": plan[0],
            "quota": plan[1],
            "quota_refill": refill,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def scopes(self, requested: Iterable[str]) -> tuple[str, ...]:
        """``requested``, if every scope is grantable; else a 403 naming those that are not."""
        try:
            scopes = validate_scopes(requested)
        except KeyManagementError as exc:
            raise RequestRefused(422, "invalid_field", str(exc)) from None
        refused = sorted(set(scopes) - self.grantable_scopes)
        if refused:
            raise RequestRefused(
                403, "scope_not_grantable", f"These scopes cannot be granted: {' '.join(refused)}."
            )
        return scopes

    def expiry(self, created_at: datetime, expires_at: datetime | None) -> datetime | None:
        """``expires_at`` for a key created at ``created_at``: the default when none was
        asked for, then :meth:`check_lifetime`."""
        if expires_at is None and self.default_expires_in is not None:
            expires_at = created_at + self.default_expires_in
        return self.check_lifetime(created_at, expires_at)

    def check_lifetime(self, created_at: datetime, expires_at: datetime | None) -> datetime | None:
        """``expires_at``, or a 403 when it is past ``max_lifetime`` from ``created_at`` (or
        missing, with a maximum): a change of expiry cannot lengthen a key's life either."""
        lifetime = self.max_lifetime
        if lifetime is not None and (expires_at is None or expires_at - created_at > lifetime):
            raise RequestRefused(
                403,
                "lifetime_exceeded",
                f"A key may live at most {int(lifetime.total_seconds())} seconds from its"
                " creation; choose an earlier expiry.",
            )
        return expires_at

    def grace(self, grace: timedelta) -> timedelta:
        if grace > self.max_grace:
            raise RequestRefused(
                403,
                "grace_exceeded",
                f"The old key may keep working at most {int(self.max_grace.total_seconds())}"
                " seconds after a rotation.",
            )
        return grace
