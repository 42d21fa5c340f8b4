"""Usage limits per key: a rate limit (GCRA) and a quota of uses, checked after the key
is verified.

A key's limits live with the key (``KeyRecord.rate_limit``, ``quota``,
``quota_remaining``, ``quota_refill``) and travel on its cached principal as an immutable
:class:`LimitPolicy`, built once when the key's state is read. A key without limits (and
no ``default_rate_limit``) costs the request path one attribute check.

One idea a module, each importing only those above it:

* :mod:`~keystile.limits.policy`: the values (rate, quota, policy) and their parsing;
  nothing from keystile, so the principal can hold a policy without importing the rest.
* :mod:`~keystile.limits.gcra`: GCRA in this process (``memory://``, the default).
* :mod:`~keystile.limits.redis`: the same GCRA and exact quota counters in Redis
  (``redis://host:port/db``), one limit across every process.
* :mod:`~keystile.limits.quota`: the remaining quota each process knows, kept in step
  with the key store by the usage recorder's batched flush.
* :mod:`~keystile.limits.enforcer`: the decision on a request, and the ``RateLimit``
  response fields.
"""

from __future__ import annotations

from .cost import CostOption, RequestCost
from .enforcer import REDIS_RETRY_INTERVAL, LimitEnforcer, OnError, send_with_headers
from .gcra import MemoryRateLimiter, RateLimiter
from .policy import (
    DEFAULT_RATE_LIMIT_STORAGE,
    MAX_QUOTA,
    POLICY_NAME,
    LimitPolicy,
    QuotaPolicy,
    Rate,
    normalize_rate_limit,
    parse_rate_limit,
    parse_rate_limits,
    quota_changes,
)
from .quota import QuotaBook
from .redis import REDIS_TIMEOUT, RedisRateLimiter

__all__ = [
    "DEFAULT_RATE_LIMIT_STORAGE",
    "MAX_QUOTA",
    "POLICY_NAME",
    "REDIS_RETRY_INTERVAL",
    "REDIS_TIMEOUT",
    "CostOption",
    "LimitEnforcer",
    "LimitPolicy",
    "MemoryRateLimiter",
    "OnError",
    "QuotaBook",
    "QuotaPolicy",
    "Rate",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestCost",
    "normalize_rate_limit",
    "parse_rate_limit",
    "parse_rate_limits",
    "quota_changes",
    "send_with_headers",
]
