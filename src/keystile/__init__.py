"""keystile: API-key authentication middleware for Starlette and FastAPI.

    from keystile import APIKeyMiddleware
    app.add_middleware(APIKeyMiddleware, database_url="sqlite:///keystile.db")

Every public name is imported from its module on first use (PEP 562): ``import keystile``
loads nothing else, and ``from keystile import APIKeyMiddleware`` loads what the
middleware needs and no more (not the key manager, not the adapters).

``keystile.__all__`` is what an app imports. The parts the middleware is built from, and
the refusals an ``on_error`` handler may tell apart, are imported from their modules:
``from keystile.verifier import Verifier``, ``from keystile.errors import InvalidToken``.
"""

from __future__ import annotations

import typing as _typing

if _typing.TYPE_CHECKING:
    from .charging import charge
    from .config import KeystileConfig
    from .errors import (
        AuthenticationError,
        ConfigurationError,
        DuplicateKeyName,
        InvalidKeyName,
        KeyAlreadyRotated,
        KeyManagementError,
        KeyNotFound,
        KeystileError,
        StoreError,
    )
    from .hashing import CHEAPEST_PARAMETERS, DEFAULT_PARAMETERS, Argon2Parameters
    from .logout import revoke_presented
    from .manager import UNCHANGED, CreatedKey, KeyManager
    from .middleware import APIKeyMiddleware
    from .principal import APIKeyUser
    from .stores import KeyEvent, KeyRecord, KeyStore, MemoryKeyStore, store_from_url
    from .stores.records import UsageBucket, UsageTotal
    from .verification import verify

if not _typing.TYPE_CHECKING:  # type checkers read the imports above, and no other name
    from . import _lazy

    _lazy.attach(
        globals(),
        # Each public name, and the module of the package it comes from.
        {
            "charge": "charging",
            "KeystileConfig": "config",
            "AuthenticationError": "errors",
            "ConfigurationError": "errors",
            "DuplicateKeyName": "errors",
            "InvalidKeyName": "errors",
            "KeyAlreadyRotated": "errors",
            "KeyManagementError": "errors",
            "KeyNotFound": "errors",
            "KeystileError": "errors",
            "StoreError": "errors",
            "Argon2Parameters": "hashing",
            "CHEAPEST_PARAMETERS": "hashing",
            "DEFAULT_PARAMETERS": "hashing",
            "revoke_presented": "logout",
            "CreatedKey": "manager",
            "KeyManager": "manager",
            "UNCHANGED": "manager",
            "APIKeyMiddleware": "middleware",
            "APIKeyUser": "principal",
            "KeyEvent": "stores",
            "KeyRecord": "stores",
            "KeyStore": "stores",
            "MemoryKeyStore": "stores",
            "store_from_url": "stores",
            "UsageBucket": "stores.records",
            "UsageTotal": "stores.records",
            "verify": "verification",
        },
        # Formerly public names (internals, and the refusals an app rarely names), still
        # found here for one release with a DeprecationWarning naming their module.
        {
            "VerifiedKeyCache": "cache",
            "IPNotAllowed": "errors",
            "InsufficientScope": "errors",
            "InvalidRequest": "errors",
            "InvalidToken": "errors",
            "MissingCredentials": "errors",
            "QuotaExceeded": "errors",
            "RateLimited": "errors",
            "ServiceUnavailable": "errors",
            "TooManyRequests": "errors",
            "SecretHasher": "hashing",
            "LimitEnforcer": "limits",
            "LimitPolicy": "limits",
            "RateLimiter": "limits",
            "IPAllowlist": "principal",
            "KeystileStats": "stats",
            "SQLiteKeyStore": "stores",
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
    "InvalidKeyName",
    "KeyAlreadyRotated",
    "KeyEvent",
    "KeyManagementError",
    "KeyManager",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "KeystileConfig",
    "KeystileError",
    "MemoryKeyStore",
    "StoreError",
    "UsageBucket",
    "UsageTotal",
    "charge",
    "revoke_presented",
    "store_from_url",
    "verify",
]
