"""KeystileConfig: every option of the middleware, validated once. Where the database URL
comes from is ``database_url.py`` (re-exported here), shared with the CLI.

Why one value: the options used to be read in several places (the middleware's
constructor, the verifier's, the limit enforcer's, each framework adapter again with its
own default), so a bad value surfaced wherever it was first used, sometimes at the first
request. A ``KeystileConfig`` is built once, refuses a bad value at construction, holds
the parsed forms the request path uses (the API-key header as lowercase bytes, exempt
paths as an exact set and a prefix tuple, the key-prefix matcher) and cannot change
afterwards. Middlewares whose configs have the same ``runtime_key`` share one runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from starlette.requests import HTTPConnection
from starlette.responses import Response

from .database_url import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, resolve_database_url
from .errors import AuthenticationError
from .hashing import DEFAULT_PARAMETERS, Argon2Parameters
from .legacy import LegacyFormats, LegacyOption
from .limits.cost import CostOption, RequestCost
from .limits.enforcer import OnError, check_limit_options
from .limits.policy import DEFAULT_RATE_LIMIT_STORAGE
from .memo import DEFAULT_MEMO_TTL, check_memo_options, memo_secret_from_env
from .stores.protocol import KeyStore
from .tokens import DEFAULT_PREFIX, key_matcher
from .usage import DEFAULT_FLUSH_INTERVAL, DEFAULT_FLUSH_MAX
from .verifier import (
    DEFAULT_ARGON2_CONCURRENCY,
    DEFAULT_CACHE_IDLE,
    DEFAULT_CACHE_MAX_SIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_PENDING_VERIFICATIONS,
    DEFAULT_NEGATIVE_MAX_SIZE,
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_PER_KEY_PENDING,
    DEFAULT_STALE_IF_ERROR,
)

if TYPE_CHECKING:
    from .metrics import PrometheusMetrics
    from .webhooks.delivery import WebhookDelivery

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_HEADER_NAME",
    "DEFAULT_REALM",
    "DEFAULT_REAP_UNUSED_FOR",
    "DEFAULT_USAGE_RETENTION",
    "ErrorHandler",
    "KeystileConfig",
    "KeystileOptions",
    "resolve_database_url",
]

DEFAULT_HEADER_NAME = "X-API-Key"
DEFAULT_REALM = "api"
#: With ``reap_every``: keys unused for longer than this are revoked.
DEFAULT_REAP_UNUSED_FOR = timedelta(days=90)
#: Per-key usage rows older than this are deleted in the background (``None``: kept).
DEFAULT_USAGE_RETENTION = timedelta(days=90)

ErrorHandler = Callable[[HTTPConnection, AuthenticationError], Response]

#: The options ``Verifier`` takes under the same names.
_VERIFIER_OPTIONS = (
    "cache_ttl",
    "cache_idle",
    "cache_max_size",
    "negative_ttl",
    "negative_max_size",
    "stale_if_error",
    "argon2_concurrency",
    "max_pending_verifications",
    "per_key_pending",
)
#: The options that make a runtime (store, cache, verification, background work): equal
#: values share one; the others (header, exempt paths, limits, errors) are per middleware.
_RUNTIME_OPTIONS = (
    "store",
    "database_url",
    *_VERIFIER_OPTIONS,
    "flush_interval",
    "flush_max",
    "argon2",
    "reap_every",
    "reap_unused_for",
    "usage_retention",
    "verification_memo",
    "memo_secret",
    "memo_ttl",
    "legacy",
)
_POSITIVE = ("cache_ttl", "cache_idle", "flush_interval")
_AT_LEAST_ONE = ("cache_max_size", "flush_max", "argon2_concurrency")
_NOT_NEGATIVE = (
    "negative_ttl",
    "negative_max_size",
    "stale_if_error",
    "max_pending_verifications",
    "per_key_pending",
    "reap_every",
)
_NOT_NEGATIVE_DURATIONS = ("reap_unused_for", "usage_retention")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeystileConfig:
    """The options of ``APIKeyMiddleware`` (documented in ``docs/operations.md``), checked.

    ``APIKeyMiddleware(app, **options)`` builds one with :meth:`from_options`;
    ``APIKeyMiddleware(app, config=KeystileConfig(...))`` takes one built beforehand.
    The store comes from ``store`` if given (``database_url`` is then ``None``), else from
    :func:`resolve_database_url`, read when the config is built. A bad value raises
    ``ValueError``, ``TypeError`` or ``ConfigurationError`` here, never on a request.
    """

    #: Not in the repr: a URL may carry a password.
    database_url: str | None = field(default=None, repr=False)
    store: KeyStore | None = None
    cache_ttl: float = DEFAULT_CACHE_TTL
    cache_idle: float = DEFAULT_CACHE_IDLE
    cache_max_size: int = DEFAULT_CACHE_MAX_SIZE
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    negative_max_size: int = DEFAULT_NEGATIVE_MAX_SIZE
    stale_if_error: float = DEFAULT_STALE_IF_ERROR
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    flush_max: int = DEFAULT_FLUSH_MAX
    argon2: Argon2Parameters = DEFAULT_PARAMETERS
    argon2_concurrency: int = DEFAULT_ARGON2_CONCURRENCY
    max_pending_verifications: int = DEFAULT_MAX_PENDING_VERIFICATIONS
    per_key_pending: int = DEFAULT_PER_KEY_PENDING
    #: Paths that need no key: exact, or a prefix ending in ``*``; kept as a tuple.
    exempt_paths: Iterable[str] = ()
    required: bool = True
    header_name: str = DEFAULT_HEADER_NAME
    realm: str = DEFAULT_REALM
    #: The prefixes of this deployment's keys; kept as a tuple.
    key_prefixes: Iterable[str] = (DEFAULT_PREFIX,)
    allow_preflight: bool = True
    strip_credentials: bool = True
    on_error: ErrorHandler | None = None
    reap_every: float | None = None
    reap_unused_for: timedelta = DEFAULT_REAP_UNUSED_FOR
    rate_limit_storage: str = DEFAULT_RATE_LIMIT_STORAGE
    default_rate_limit: str | None = None
    rate_limit_on_error: OnError = "allow"
    rate_limit_headers: bool = False
    #: What a request weighs against the limits (``limits.cost``); ``None``: 1 each.
    cost: CostOption = None
    usage_retention: timedelta | None = DEFAULT_USAGE_RETENTION
    metrics: bool | PrometheusMetrics = False
    #: Send webhooks from the outbox in the background (``WebhookDelivery`` for options).
    webhooks: bool | WebhookDelivery = False
    #: The fleet's verification memo (``redis://host:port/db``), or ``None``: no memo. Not
    #: in the repr: a URL may carry a password.
    verification_memo: str | None = field(default=None, repr=False)
    #: The memo's secret; ``None``: ``KEYSTILE_MEMO_SECRET``, read when the config is built
    #: with a ``verification_memo``. Not in the repr.
    memo_secret: str | None = field(default=None, repr=False)
    memo_ttl: float = DEFAULT_MEMO_TTL
    #: Key shapes of other libraries to take, imported keys verified once and rehashed
    #: (``keystile.legacy``): names, or names with options. Not in the repr: a pepper.
    legacy_formats: LegacyOption | None = field(default=None, repr=False)

    #: ``legacy_formats``, checked; ``None`` for none.
    legacy: LegacyFormats | None = field(init=False, repr=False, compare=False)
    #: ``header_name`` as ASGI servers give header names: lowercase bytes.
    header: bytes = field(init=False, repr=False, compare=False)
    exempt_exact: frozenset[str] = field(init=False, repr=False, compare=False)
    exempt_prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: Whether a token is meant as one of this deployment's keys (``tokens.key_matcher``).
    is_key: Callable[[bytes], bool] = field(init=False, repr=False, compare=False)
    #: With ``required=False``, the bearer tokens taken as credentials (``None``: all) and
    #: their ``<prefix>_`` starts for the compiled path; a foreign token is left alone.
    bearer_filter: Callable[[bytes], bool] | None = field(init=False, repr=False, compare=False)
    bearer_starts: tuple[bytes, ...] | None = field(init=False, repr=False, compare=False)
    #: ``cost`` parsed (falsy when every request costs 1).
    request_cost: RequestCost = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("exempt_paths", "key_prefixes"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)):
                raise TypeError(f"{name} takes a list of strings, not one string: {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in _AT_LEAST_ONE:
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        for name in _NOT_NEGATIVE:
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must not be negative, not {value!r}")
        for name in _NOT_NEGATIVE_DURATIONS:
            value = getattr(self, name)
            if value is not None and value < timedelta(0):
                raise ValueError(f"{name} must not be negative, not {value!r}")
        check_limit_options(
            self.rate_limit_storage, self.default_rate_limit, self.rate_limit_on_error
        )
        if self.verification_memo is not None and self.memo_secret is None:
            object.__setattr__(self, "memo_secret", memo_secret_from_env())
        check_memo_options(self.verification_memo, self.memo_secret, self.memo_ttl)
        legacy = LegacyFormats.from_option(self.legacy_formats)
        is_key = key_matcher(self.key_prefixes)
        if legacy is not None:
            is_key = _either(is_key, legacy.matches)
        url = None if self.store is not None else resolve_database_url(self.database_url)
        derived: dict[str, Any] = {
            "database_url": url,
            "legacy": legacy,
            "header": self.header_name.lower().encode("latin-1"),
            "exempt_exact": frozenset(p for p in self.exempt_paths if not p.endswith("*")),
            "exempt_prefixes": tuple(p[:-1] for p in self.exempt_paths if p.endswith("*")),
            "is_key": is_key,
            "bearer_filter": None if self.required else is_key,
            "request_cost": RequestCost(self.cost),
            "bearer_starts": (
                None if self.required else tuple(f"{p}_".encode() for p in self.key_prefixes)
            ),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_options(cls, **options: Any) -> KeystileConfig:
        """The config of ``APIKeyMiddleware``'s keyword options; an unknown name is a
        ``TypeError`` naming it (a misspelt option fails at once, not silently)."""
        _refuse_unknown(options)
        return cls(**options)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The names ``from_options`` takes (what ``APIKeyMiddleware`` takes besides ``app``
        and ``config``)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.init)

    def replace(self, **options: Any) -> KeystileConfig:
        """A copy with ``options`` changed, checked again (unknown names as in
        :meth:`from_options`)."""
        _refuse_unknown(options)
        return dataclasses.replace(self, **options)

    @property
    def runtime_key(self) -> Hashable:
        """Equal for configs that may share a runtime: the runtime options, hashable values
        by value and anything else (a store object) by identity."""
        return tuple((name, _by_value(getattr(self, name))) for name in _RUNTIME_OPTIONS)

    def verifier_options(self) -> dict[str, Any]:
        """The options ``Verifier`` takes as they are, by name (cache, negative cache,
        outage and argon2 admission)."""
        return {name: getattr(self, name) for name in _VERIFIER_OPTIONS}


def _either(
    first: Callable[[bytes], bool], second: Callable[[bytes], bool]
) -> Callable[[bytes], bool]:
    return lambda token: first(token) or second(token)


def _refuse_unknown(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - KeystileConfig.option_names())
    if unknown:
        raise TypeError(f"unknown APIKeyMiddleware options: {', '.join(unknown)}")


def _by_value(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return ("value", type(value).__qualname__, value)


class KeystileOptions(TypedDict, total=False):
    """``APIKeyMiddleware``'s keyword options, for type checkers: the fields of
    :class:`KeystileConfig` that its constructor takes."""

    database_url: str | None
    store: KeyStore | None
    cache_ttl: float
    cache_idle: float
    cache_max_size: int
    negative_ttl: float
    negative_max_size: int
    stale_if_error: float
    flush_interval: float
    flush_max: int
    argon2: Argon2Parameters
    argon2_concurrency: int
    max_pending_verifications: int
    per_key_pending: int
    exempt_paths: Iterable[str]
    required: bool
    header_name: str
    realm: str
    key_prefixes: Iterable[str]
    allow_preflight: bool
    strip_credentials: bool
    on_error: ErrorHandler | None
    reap_every: float | None
    reap_unused_for: timedelta
    rate_limit_storage: str
    default_rate_limit: str | None
    rate_limit_on_error: OnError
    rate_limit_headers: bool
    cost: CostOption
    usage_retention: timedelta | None
    metrics: bool | PrometheusMetrics
    webhooks: bool | WebhookDelivery
    verification_memo: str | None
    memo_secret: str | None
    memo_ttl: float
    legacy_formats: LegacyOption | None
