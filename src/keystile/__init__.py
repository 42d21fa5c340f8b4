"""keystile: API-key authentication middleware for Starlette and FastAPI.

::

    from keystile import APIKeyMiddleware
    app.add_middleware(APIKeyMiddleware, database_url="sqlite:///keystile.db")

Every public name is imported from its module on first use (PEP 562): ``import keystile``
loads nothing else, and ``from keystile import APIKeyMiddleware`` loads what the
middleware needs and no more (not the key manager, not the adapters).
"""

from __future__ import annotations

import sys as _sys
import typing as _typing

if _typing.TYPE_CHECKING:
    from .cache import VerifiedKeyCache
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
    from .stores.records import UsageBucket, UsageTotal
    from .tokens import generate_key, parse_key, redact
    from .usage import UsageRecorder
    from .verifier import Verifier

#: Each public name, and the module of the package it comes from.
_MODULES = {
    "VerifiedKeyCache": "cache",
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
    "UsageBucket": "stores.records",
    "UsageTotal": "stores.records",
    "generate_key": "tokens",
    "parse_key": "tokens",
    "redact": "tokens",
    "UsageRecorder": "usage",
    "Verifier": "verifier",
}


if not _typing.TYPE_CHECKING:  # type checkers see the imports above, and no other name

    def __getattr__(name: str) -> _typing.Any:
        """Import a public name's module on first use, and keep the name (next time it
        is found without this call)."""
        module = _MODULES.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        qualified = f"{__name__}.{module}"
        __import__(qualified)  # as an import statement does (-X importtime sees it)
        value = getattr(_sys.modules[qualified], name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


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
    "KeystileError",
    "KeystileStats",
    "LimitEnforcer",
    "LimitPolicy",
    "MemoryKeyStore",
    "MissingCredentials",
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
    "generate_key",
    "parse_key",
    "redact",
    "revoke_presented",
    "store_from_url",
]
