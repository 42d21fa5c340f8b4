"""Every exception keystile raises, with the HTTP status it maps to.

::

    KeystileError
    ├── AuthenticationError         a request is refused (turned into a response in responses.py)
    │   ├── MissingCredentials      401, bare ``WWW-Authenticate`` challenge
    │   ├── InvalidRequest          400 ``invalid_request``: conflicting or empty credentials
    │   ├── InvalidToken            401 ``invalid_token``: any key that is not valid
    │   ├── InsufficientScope       403 ``insufficient_scope``
    │   ├── IPNotAllowed            403 ``ip_not_allowed``: client outside the key's allowlist
    │   ├── ServiceUnavailable      503 with ``Retry-After``: store down or argon2 guard saturated
    │   └── TooManyRequests         429: a verified key is over its usage limits
    │       ├── RateLimited         ``rate_limited``, with ``Retry-After`` and ``RateLimit`` fields
    │       └── QuotaExceeded       ``quota_exceeded``, ``Retry-After`` only when a refill is due
    ├── StoreError                  the key store could not be reached or failed
    ├── RequestRefused              a management API or admin page request refused (4xx)
    ├── ImportSourceError           keys to import cannot be read (``reason``: why)
    ├── ReportRefused               a secret-scanning report not acted on (``reason``, status)
    ├── KeyManagementError          a refused key-management operation (CLI exit code 1)
    │   ├── InvalidKeyName
    │   ├── DuplicateKeyName
    │   ├── KeyNotFound
    │   ├── KeyAlreadyRotated       the key already has a successor
    │   ├── KeyLimitReached         the owner holds as many live keys as it may
    │   └── LifetimeExceeded        no expiry, or one past the manager's ``max_lifetime``
    └── ConfigurationError          bad options, bad database URL, missing extra

``AuthenticationError.reason`` is a stable machine code used for counters and logs;
``description`` is the only text that reaches a client. For ``InvalidToken`` every
reason except ``expired``, ``revoked`` and ``disabled`` shares one description, so a
caller who does not hold the secret cannot tell an unknown key from a wrong secret;
those three are only raised after the secret has been proven.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "DuplicateKeyName",
    "IPNotAllowed",
    "ImportSourceError",
    "InsufficientScope",
    "InvalidKeyName",
    "InvalidRequest",
    "InvalidToken",
    "KeyAlreadyRotated",
    "KeyLimitReached",
    "KeyManagementError",
    "KeyNotFound",
    "KeystileError",
    "LifetimeExceeded",
    "MissingCredentials",
    "QuotaExceeded",
    "RateLimited",
    "ReportRefused",
    "RequestRefused",
    "ServiceUnavailable",
    "StoreError",
    "TooManyRequests",
]


class KeystileError(Exception):
    """Root of every keystile exception."""


class AuthenticationError(KeystileError):
    """A request that cannot be let through; carries everything the response needs."""

    status_code: ClassVar[int] = 401
    error: ClassVar[str | None] = None
    default_description: ClassVar[str] = "Authentication failed."

    def __init__(self, reason: str, description: str | None = None, *, source: str | None = None):
        self.reason = reason
        self.description = description or self.default_description
        self.source = source
        super().__init__(f"{reason}: {self.description}")


class MissingCredentials(AuthenticationError):
    status_code = 401
    error = None
    default_description = "An API key is required."

    def __init__(self, reason: str = "missing", description: str | None = None) -> None:
        super().__init__(reason, description)


class InvalidRequest(AuthenticationError):
    status_code = 400
    error = "invalid_request"
    default_description = "The request carries a malformed or conflicting credential."


class InvalidToken(AuthenticationError):
    """A presented key that is not valid.

    Reasons: ``malformed``, ``bad_checksum``, ``unknown``, ``wrong_secret`` (all with the
    same public description), ``expired``, ``revoked`` and ``disabled`` (secret proven
    first).
    """

    status_code = 401
    error = "invalid_token"
    default_description = "The API key is not valid."

    #: Reasons whose description may differ, because the caller proved the secret.
    DISCLOSABLE: ClassVar[frozenset[str]] = frozenset({"expired", "revoked", "disabled"})

    def __init__(self, reason: str, *, source: str | None = None) -> None:
        description = {
            "expired": "The API key has expired.",
            "revoked": "The API key has been revoked.",
            "disabled": "The API key has been disabled.",
        }.get(reason)
        super().__init__(reason, description, source=source)


class InsufficientScope(AuthenticationError):
    status_code = 403
    error = "insufficient_scope"
    default_description = "The API key lacks a required scope."

    def __init__(self, required: tuple[str, ...], missing: tuple[str, ...]) -> None:
        self.required = required
        self.missing = missing
        super().__init__("insufficient_scope", f"Missing scope: {' '.join(missing)}.")


class IPNotAllowed(AuthenticationError):
    """A verified key used from a client address outside its IP allowlist (or from no
    known address). Only raised after the key was verified, so it tells nothing to a
    caller who does not hold the secret."""

    status_code = 403
    error = "ip_not_allowed"
    default_description = "The API key may not be used from this address."

    def __init__(self, *, source: str | None = None) -> None:
        super().__init__("ip_not_allowed", source=source)


class ServiceUnavailable(AuthenticationError):
    """The key could not be checked right now; the client should retry."""

    status_code = 503
    error = None
    default_description = "The API key could not be checked right now; retry shortly."

    def __init__(
        self,
        reason: str,
        description: str | None = None,
        *,
        retry_after: int = 1,
        source: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(reason, description, source=source)


class TooManyRequests(AuthenticationError):
    """A verified key is over one of its usage limits: 429.

    Only ever raised after the key was verified, so it tells nothing to a caller who
    does not hold the secret. ``retry_after`` is in whole seconds (at least 1), or
    ``None`` when waiting will not help (a quota without refill).
    """

    status_code = 429
    error: ClassVar[str | None] = "rate_limited"
    default_description = "Too many requests for this API key."

    def __init__(
        self,
        reason: str,
        description: str | None = None,
        *,
        retry_after: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        source: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        #: Extra response fields (``RateLimit-Policy``, ``RateLimit``), already formatted.
        self.headers = headers
        super().__init__(reason, description, source=source)


class RateLimited(TooManyRequests):
    """The key's rate limit (``limit``, e.g. ``10/second``) is used up for now."""

    error = "rate_limited"

    def __init__(
        self,
        limit: str,
        *,
        retry_after: int,
        headers: tuple[tuple[str, str], ...] = (),
        source: str | None = None,
        policy: str = "default",
    ) -> None:
        self.limit = limit
        #: The name of the limit that refused (``default``, ``burst``, ``owner.burst``).
        self.policy = policy
        super().__init__(
            "rate_limited",
            f"Rate limit of {limit} exceeded; retry after {retry_after} s.",
            retry_after=retry_after,
            headers=headers,
            source=source,
        )


class QuotaExceeded(TooManyRequests):
    """The key's quota (``quota`` uses, refilled every ``refill`` if set) is used up."""

    error = "quota_exceeded"

    def __init__(
        self,
        quota: int,
        *,
        retry_after: int | None = None,
        source: str | None = None,
        policy: str = "quota",
    ) -> None:
        self.quota = quota
        #: Whose quota: ``quota`` (the key's) or ``owner.quota``.
        self.policy = policy
        when = f"it refills in {retry_after} s" if retry_after is not None else "it does not refill"
        super().__init__(
            "quota_exceeded",
            f"Quota of {quota} requests used up; {when}.",
            retry_after=retry_after,
            source=source,
        )


class StoreError(KeystileError):
    """The key store failed or could not be reached."""


class RequestRefused(KeystileError):
    """A request to the key-management API or the admin page refused before (or instead
    of) any change: its HTTP status, a stable ``error`` code and a ``description`` for the
    client, sent in the middleware's body shape by ``responses.refusal_response``."""

    def __init__(self, status_code: int, error: str, description: str) -> None:
        self.status_code = status_code
        self.error = error
        self.description = description
        super().__init__(f"{error}: {description}")


class ImportSourceError(KeystileError):
    """The keys of another library cannot be read: ``reason`` is ``unreachable`` (the
    database or file cannot be opened), ``unknown_layout`` (not the tables or columns of a
    version the importer knows) or ``bad_file`` (a CSV or JSON Lines file it cannot take).
    The message is one line, without a password."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReportRefused(KeystileError):
    """A secret-scanning report the endpoint does not act on: ``reason`` is a stable code
    (``missing_signature``, ``bad_signature``, ``unknown_key_id``, ``too_large``,
    ``too_many_tokens``, ``malformed``, ``keys_unavailable``, ``method_not_allowed``) and
    ``status_code`` the HTTP status it is answered with. Nothing was changed."""

    def __init__(self, reason: str, status_code: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status_code = status_code


class KeyManagementError(KeystileError):
    """A key-management operation was refused; the message is meant for the operator."""


class InvalidKeyName(KeyManagementError, ValueError):
    pass


class DuplicateKeyName(KeyManagementError):
    pass


class KeyNotFound(KeyManagementError, LookupError):
    pass


class KeyAlreadyRotated(KeyManagementError):
    """The key already has a successor (``replaced_by``): rotating it again would leave
    two live keys with one name. Rotate the successor instead."""

    def __init__(self, key_id: str, successor: str) -> None:
        self.key_id = key_id
        self.successor = successor
        super().__init__(
            f"key {key_id!r} was already rotated to {successor!r}; rotate {successor!r} instead"
        )


class KeyLimitReached(KeyManagementError):
    """The owner already holds ``max_keys`` live keys (neither revoked nor expired)."""

    def __init__(self, owner: str, max_keys: int) -> None:
        self.max_keys = max_keys
        super().__init__(f"owner {owner!r} already holds {max_keys} live keys, the most it may")


class LifetimeExceeded(KeyManagementError):
    """A key would live without an expiry (``reason`` ``no_expiry``) or past the
    manager's ``max_lifetime`` (``reason`` ``too_long``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConfigurationError(KeystileError, ValueError):
    pass
