"""The decision on a verified key's request: within its limits, or the refusal.

:class:`LimitEnforcer` puts the parts together (the policy on the key, the in-process
GCRA, Redis when configured, the quota book) and answers with ``None`` or the error to
respond with. If Redis cannot be reached the decision follows ``on_error``: ``"allow"``
(this process's own limiter decides, as with ``memory://``) or ``"deny"`` (503); one log
line per outage, a counter per decision.

The key is read through :class:`LimitedKey`, the three attributes used of
``principal.APIKeyUser``, so that this package never imports the principal (which
imports :mod:`keystile.limits.policy`).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol

from starlette.types import Message, Send

from ..errors import ConfigurationError, QuotaExceeded, RateLimited, ServiceUnavailable
from ..stats import Counters
from ..usage import UsageRecorder
from .gcra import MemoryRateLimiter
from .policy import (
    DEFAULT_RATE_LIMIT_STORAGE,
    POLICY_NAME,
    LimitPolicy,
    NamedRate,
    QuotaPolicy,
    Rate,
    parse_rate_limit,
    redis_tag,
)
from .quota import QuotaBook
from .redis import RedisRateLimiter, RedisScriptError

__all__ = [
    "REDIS_RETRY_INTERVAL",
    "LimitEnforcer",
    "LimitedKey",
    "OnError",
    "check_limit_options",
    "send_with_headers",
]

logger = logging.getLogger("keystile.limits")

#: Seconds Redis is left alone after a failure (decisions follow ``on_error`` meanwhile).
REDIS_RETRY_INTERVAL = 1.0

OnError = Literal["allow", "deny"]


class LimitedKey(Protocol):
    """What the enforcer reads of a verified key (``APIKeyUser`` has this shape)."""

    key_id: str
    owner: str
    limits: LimitPolicy | None


def _seconds(wait: float) -> int:
    """``Retry-After``: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


def check_limit_options(
    storage: str | None, default_rate_limit: str | None, on_error: str
) -> Rate | None:
    """The default rate of these options, or the ``ConfigurationError`` of a bad one: the
    one check of the middleware's config and of an enforcer built alone."""
    if on_error not in ("allow", "deny"):
        raise ConfigurationError(f"rate_limit_on_error must be 'allow' or 'deny', not {on_error!r}")
    try:
        rate = parse_rate_limit(default_rate_limit) if default_rate_limit is not None else None
    except ValueError as exc:
        raise ConfigurationError(f"default_rate_limit: {exc}") from None
    storage = storage or DEFAULT_RATE_LIMIT_STORAGE
    if storage.split(":", 1)[0].lower() not in ("memory", "redis", "rediss", "unix"):
        raise ConfigurationError(
            f"rate_limit_storage must be memory:// or redis://…, not {storage!r}"
        )
    return rate


class LimitEnforcer:
    """Decides whether a verified key may make this request; built from the middleware's
    options and shared by every middleware of one runtime with the same options.

    ``check`` is the synchronous decision (``memory://``); ``acheck`` works for every
    storage. Both return ``None`` (go on) or the refusal to answer with (an
    ``AuthenticationError``: 429 ``RateLimited``/``QuotaExceeded``, or a 503 when Redis is
    down and ``on_error="deny"``).
    """

    _shared: weakref.WeakKeyDictionary[UsageRecorder, dict[Any, LimitEnforcer]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(
        self,
        *,
        recorder: UsageRecorder,
        counters: Counters,
        storage: str | None = DEFAULT_RATE_LIMIT_STORAGE,
        default_rate_limit: str | None = None,
        on_error: OnError = "allow",
        headers: bool = False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_rate = check_limit_options(storage, default_rate_limit, on_error)
        storage = storage or DEFAULT_RATE_LIMIT_STORAGE
        scheme = storage.split(":", 1)[0].lower()
        self.recorder = recorder
        self.counters = counters
        self.on_error = on_error
        self.headers = headers
        self.clock = clock
        self.monotonic = monotonic
        self.local = MemoryRateLimiter(monotonic)
        self.quotas = QuotaBook.of(recorder)
        self.redis = RedisRateLimiter(storage) if scheme != "memory" else None
        #: Whether ``acheck`` must be awaited (Redis), or ``check`` decides alone.
        self.is_async = self.redis is not None
        #: Whether every key is limited (a default rate), not only keys with limits.
        self.limits_every_key = self.default_rate is not None
        #: The middleware's default rate as each unlimited key's one limit, built once.
        self._defaults: dict[str, tuple[NamedRate, ...]] = {}
        #: Uses charged after the fact and not yet taken from the Redis counters.
        self._charged: dict[str, int] = {}
        self._redis_down_until = -math.inf
        self._redis_failing = False
        #: Told of each refusal (webhooks' ``rate_limit.exceeded``); never of a success.
        self.on_refusal: Callable[[LimitedKey, Exception], None] | None = None

    def refused(self, user: LimitedKey, refusal: Exception) -> Exception:
        """``refusal``, after telling ``on_refusal`` of it (without I/O)."""
        listener = self.on_refusal
        if listener is not None:
            try:
                listener(user, refusal)
            except Exception:
                logger.exception("keystile: a refusal listener failed")
        return refusal

    @classmethod
    def shared(cls, recorder: UsageRecorder, counters: Counters, **options: Any) -> LimitEnforcer:
        """The enforcer of these options on this runtime (its usage recorder), built once:
        middlewares of one runtime then share the in-process limiter's slots."""
        table = cls._shared.setdefault(recorder, {})
        key = tuple(sorted(options.items()))
        enforcer = table.get(key)
        if enforcer is None:
            enforcer = table[key] = cls(recorder=recorder, counters=counters, **options)
        return enforcer

    # -- decisions ------------------------------------------------------------------

    def _rates(self, user: LimitedKey) -> tuple[NamedRate, ...]:
        """The rate limits of ``user``'s request: its policy's, with the middleware's
        default in front when the key has no ``default`` of its own."""
        policy, rate = user.limits, self.default_rate
        if policy is not None:
            return policy.rates if policy.has_default or rate is None else policy.with_default(rate)
        if rate is None:
            return ()
        named = self._defaults.get(user.key_id)
        if named is None:
            if len(self._defaults) >= 10_000:
                self._defaults.clear()
            named = self._defaults[user.key_id] = (NamedRate.of(POLICY_NAME, rate, user.key_id),)
        return named

    def check(self, user: LimitedKey, cost: int = 1) -> RateLimited | QuotaExceeded | None:
        """The in-process decision for ``user`` (``memory://``, or Redis's fallback): every
        limit (the key's and its owner's) must have room for ``cost``; else nothing is
        spent and the refusal names the limit."""
        policy = user.limits
        if policy is not None:
            quotas = policy.quotas
            if quotas:
                now = self.clock()
                for q in quotas:
                    wait = self.quotas.wait(q.budget, q, now, cost)
                    if wait is not None:
                        return self._quota_refusal(q, wait)
            rates = policy.rates if policy.has_default or self.default_rate is None else None
        else:
            quotas, rates = (), None
        if rates is None:
            rates = self._rates(user)
        if len(rates) == 1:
            limit = rates[0]
            wait = self.local.take(limit.slot, limit.rate, self.monotonic(), cost)
            if wait:
                return self._rate_refusal(rates, 0, wait)
        elif rates:
            refusing, wait = self.local.take_all(rates, self.monotonic(), cost)
            if refusing >= 0:
                return self._rate_refusal(rates, refusing, wait)
        for q in quotas:
            self.quotas.use(q.budget, cost)
        return None

    async def acheck(
        self, user: LimitedKey, cost: int = 1
    ) -> RateLimited | QuotaExceeded | ServiceUnavailable | None:
        """The decision for ``user`` with any storage: with Redis, one round trip covers
        every limit and quota."""
        if self.redis is None:
            return self.check(user, cost)
        policy = user.limits
        rates = self._rates(user)
        quotas = policy.quotas if policy is not None else ()
        if not rates and not quotas:
            return None
        if self.monotonic() < self._redis_down_until:
            return self._fallback(user, cost)
        tag = policy.tag if policy is not None else redis_tag(user.owner)
        now = self.clock()
        counters = []
        charged = self._charged
        for q in quotas:
            start, left = self.quotas.period(q.budget, q, now)
            lifetime = int(q.refill + 60) if q.refill else 86_400
            key = self.redis.quota_key(tag, q.budget, q.quota, start)
            counters.append((key, left, lifetime, charged.pop(q.budget, 0) if charged else 0))
        try:
            code, index, wait = await self.redis.decide(tag, rates, counters, cost)
        except Exception as exc:
            for q, counter in zip(quotas, counters, strict=True):
                if counter[3]:
                    charged[q.budget] = charged.get(q.budget, 0) + counter[3]
            if not isinstance(exc, RedisScriptError):  # any client or socket failure
                self._redis_failed(exc)
                return self._fallback(user, cost)
            # Redis answered, so it is up: this request's state is what is broken.
            self.counters.rate_limit_errors += 1
            logger.error("keystile: the Redis limit script failed for one request: %s", exc)
            return _unavailable()
        if self._redis_failing:
            self._redis_failing = False
            logger.warning("keystile: Redis at %s answers again", self.redis.display_url)
        if code == 1:
            return self._rate_refusal(rates, index, wait)
        if code == 2:
            q = quotas[index]
            wait_quota = self.quotas.wait(q.budget, q, now, cost)
            return self._quota_refusal(q, math.inf if wait_quota is None else wait_quota)
        for q in quotas:
            self.quotas.use(q.budget, cost)  # the store follows the Redis counter in the flush
        return None

    def charge(self, policy: LimitPolicy, n: int) -> None:
        """Spend ``n`` uses of every quota of ``policy`` after the fact (``keystile.charge``):
        counted at once (the next request sees them), written by the next flush, and with
        Redis taken from its counters by the next decision on them."""
        for q in policy.quotas:
            self.quotas.use(q.budget, n)
            if self.redis is not None:
                self._charged[q.budget] = self._charged.get(q.budget, 0) + n

    def success_headers(self, user: LimitedKey) -> list[tuple[bytes, bytes]]:
        """``RateLimit-Policy`` and ``RateLimit`` for a request that passed (with
        ``headers=True``), one item per rate limit; empty for a key without one."""
        rates = self._rates(user)
        if not rates:
            return []
        policies, states = self._fields(rates, -1, 0)
        return [(b"ratelimit-policy", policies.encode()), (b"ratelimit", states.encode())]

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    # -- helpers --------------------------------------------------------------------

    def _fields(self, rates: tuple[NamedRate, ...], refusing: int, seconds: int) -> tuple[str, str]:
        """``RateLimit-Policy`` and ``RateLimit``: every rate limit, the refusing one
        (index ``refusing``) at ``r=0`` for ``seconds``."""
        limiter: Any = self.redis if self.redis is not None else self.local
        states = []
        for i, limit in enumerate(rates):
            if i == refusing:
                states.append(f'"{limit.name}";r=0;t={seconds}')
            else:
                remaining, reset = limiter.state(limit.slot, limit.rate)
                states.append(f'"{limit.name}";r={remaining};t={math.ceil(reset - 1e-9)}')
        return ", ".join(limit.policy_field for limit in rates), ", ".join(states)

    def _rate_refusal(
        self, rates: tuple[NamedRate, ...], refusing: int, wait: float
    ) -> RateLimited:
        self.counters.rate_limited += 1
        seconds = _seconds(wait)
        policies, states = self._fields(rates, refusing, seconds)
        limit = rates[refusing]
        return RateLimited(
            limit.rate.text,
            retry_after=seconds,
            policy=limit.name,
            headers=(("RateLimit-Policy", policies), ("RateLimit", states)),
        )

    def _quota_refusal(self, quota: QuotaPolicy, wait: float) -> QuotaExceeded:
        self.counters.quota_exceeded += 1
        return QuotaExceeded(
            quota.quota,
            retry_after=None if wait == math.inf else _seconds(wait),
            policy=quota.name,
        )

    def _redis_failed(self, exc: Exception) -> None:
        assert self.redis is not None
        self._redis_down_until = self.monotonic() + REDIS_RETRY_INTERVAL
        if not self._redis_failing:
            self._redis_failing = True
            how = (
                "this process's own limits apply"
                if self.on_error == "allow"
                else "limited keys get 503"
            )
            logger.warning(
                "keystile: Redis at %s is unreachable (%s); until it answers, %s",
                self.redis.display_url,
                type(exc).__name__,
                how,
            )

    def _fallback(
        self, user: LimitedKey, cost: int
    ) -> RateLimited | QuotaExceeded | ServiceUnavailable | None:
        self.counters.rate_limit_errors += 1
        if self.on_error == "deny":
            return _unavailable()
        return self.check(user, cost)


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "rate_limiter_unavailable",
        "The key's usage limits could not be checked right now; retry shortly.",
    )


def send_with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """``send`` that adds ``headers`` to the response start (``RateLimit`` on success)."""
    if not headers:
        return send

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return wrapped
