"""keystile: API-key authentication middleware for Starlette and FastAPI.

    from keystile import APIKeyMiddleware
    app.add_middleware(APIKeyMiddleware, database_url="sqlite:///keystile.db")

Every public name is imported from its module on first use (PEP 562): ``import keystile``
loads nothing else, and ``from keystile import APIKeyMiddleware`` loads what the
middleware needs and no more (not the key manager, not the adapters).
"""

from __future__ import annotations

import typing as _typing

if _typing.TYPE_CHECKING:
    from .cache import VerifiedKeyCache
    from .charging import charge
    from .config import KeystileConfig
    from .errors import (
        AuthenticationError,
        ConfigurationError,
        DuplicateKeyName,
        InsufficientScope,
        InvalidKeyName,
        InvalidRequest,
        InvalidToken,
        IPNotAllowed,
        KeyAlreadyRotated,
        KeyManagementError,
        KeyNotFound,
        KeystileError,
        MissingCredentials,
        QuotaExceeded,
        RateLimited,
        ServiceUnavailable,
        StoreError,
        TooManyRequests,
    )
    from .hashing import CHEAPEST_PARAMETERS, DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
    from .limits import LimitEnforcer, LimitPolicy, RateLimiter
    from .logout import revoke_presented
    from .manager import UNCHANGED, CreatedKey, KeyManager
    from .middleware import APIKeyMiddleware
    from .principal import APIKeyUser, IPAllowlist
    from .stats import KeystileStats
    from .stores import (
        KeyEvent,
        KeyRecord,
        KeyStore,
        MemoryKeyStore,
        SQLiteKeyStore,
        store_from_url,
    )
    from .stores.records import OwnerLimits, UsageBucket, UsageTotal
    from .tokens import generate_key, parse_key, redact
    from .usage import UsageRecorder
    from .verifier import Verifier

if not _typing.TYPE_CHECKING:  # type checkers read the imports above, and no other name
    from . import _lazy

    # Each public name, and the module of the package it comes from.
    _lazy.attach(
        globals(),
        {
            "VerifiedKeyCache": "cache",
            "KeystileConfig": "config",
            "AuthenticationError": "errors",
            "ConfigurationError": "errors",
            "DuplicateKeyName": "errors",
            "IPNotAllowed": "errors",
            "InsufficientScope": "errors",
            "InvalidKeyName": "errors",
            "InvalidRequest": "errors",
            "InvalidToken": "errors",
            "KeyAlreadyRotated": "errors",
            "KeyManagementError": "errors",
            "KeyNotFound": "errors",
            "KeystileError": "errors",
            "MissingCredentials": "errors",
            "QuotaExceeded": "errors",
            "RateLimited": "errors",
            "ServiceUnavailable": "errors",
            "StoreError": "errors",
            "TooManyRequests": "errors",
            "charge": "charging",
            "Argon2Parameters": "hashing",
            "CHEAPEST_PARAMETERS": "hashing",
            "DEFAULT_PARAMETERS": "hashing",
            "SecretHasher": "hashing",
            "LimitEnforcer": "limits",
            "LimitPolicy": "limits",
            "RateLimiter": "limits",
            "revoke_presented": "logout",
            "CreatedKey": "manager",
            "KeyManager": "manager",
            "UNCHANGED": "manager",
            "APIKeyMiddleware": "middleware",
            "APIKeyUser": "principal",
            "IPAllowlist": "principal",
            "KeystileStats": "stats",
            "KeyEvent": "stores",
            "KeyRecord": "stores",
            "KeyStore": "stores",
            "MemoryKeyStore": "stores",
            "SQLiteKeyStore": "stores",
            "store_from_url": "stores",
            "OwnerLimits": "stores.records",
            "UsageBucket": "stores.records",
            "UsageTotal": "stores.records",
            "generate_key": "tokens",
            "parse_key": "tokens",
            "redact": "tokens",
            "UsageRecorder": "usage",
            "Verifier": "verifier",
        },
    )

__version__ = "0.1.0"

__all__ = [
    "CHEAPEST_PARAMETERS",
    "DEFAULT_PARAMETERS",
    "UNCHANGED",
    "APIKeyMiddleware",
    "APIKeyUser",
    "Argon2Parameters",
    "AuthenticationError",
    "ConfigurationError",
    "CreatedKey",
    "DuplicateKeyName",
    "IPAllowlist",
    "IPNotAllowed",
    "InsufficientScope",
    "InvalidKeyName",
    "InvalidRequest",
    "InvalidToken",
    "KeyAlreadyRotated",
    "KeyEvent",
    "KeyManagementError",
    "KeyManager",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "KeystileConfig",
    "KeystileError",
    "KeystileStats",
    "LimitEnforcer",
    "LimitPolicy",
    "MemoryKeyStore",
    "MissingCredentials",
    "OwnerLimits",
    "QuotaExceeded",
    "RateLimited",
    "RateLimiter",
    "SQLiteKeyStore",
    "SecretHasher",
    "ServiceUnavailable",
    "StoreError",
    "TooManyRequests",
    "UsageBucket",
    "UsageRecorder",
    "UsageTotal",
    "VerifiedKeyCache",
    "Verifier",
    "charge",
    "generate_key",
    "parse_key",
    "redact",
    "revoke_presented",
    "store_from_url",
]
