"""keystile: API-key authentication middleware for Starlette and FastAPI.

from keystile import APIKeyMiddleware
app.add_middleware(APIKeyMiddleware, database_url="sqlite:///keystile.db")
"""

from __future__ import annotations

from .cache import VerifiedKeyCache
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
from .stores import KeyEvent, KeyRecord, KeyStore, MemoryKeyStore, SQLiteKeyStore, store_from_url
from .stores.records import UsageBucket, UsageTotal
from .tokens import generate_key, parse_key, redact
from .usage import UsageRecorder
from .verifier import Verifier

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
