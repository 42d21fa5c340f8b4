"""Usage limits per key: a rate limit (GCRA) and a quota of uses, checked after the key
is verified.

A key's limits live with the key (``KeyRecord.rate_limit``, ``quota``,
``quota_remaining``, ``quota_refill``) and travel on its cached principal as an immutable
:class:`LimitPolicy`, built once when the key's state is read. A key without limits (and
no ``default_rate_limit``) costs the request path one attribute check.

Rate limits use GCRA (the generic cell rate algorithm): per key one number, the
theoretical arrival time (TAT) of the next request. A request at ``now`` passes when
``TAT - now <= period - period/count`` and moves the TAT ``period/count`` later; so
``count`` requests may arrive at once, and after that one every ``period/count`` seconds.
No window edges, no counters to reset, and a refusal knows exactly when to come back.

* ``memory://`` (the default): the TAT is a float in a per-key slot in this process; a
  check is a dict lookup and a few float operations. N processes allow N times the limit.
* ``redis://host:port/db``: one Lua script does the same GCRA atomically in Redis, on
  Redis's clock, so every process and machine shares one limit; the quota is a Redis
  counter per key and period, exact across processes. If Redis cannot be reached the
  decision follows ``on_error``: ``"allow"`` (this process's own limiter decides, as with
  ``memory://``) or ``"deny"`` (503); one log line per outage, a counter per decision.

Quotas: the remaining count lives in the key store. Uses are counted in memory and
taken from it by the usage recorder's batched flush (the same statement that writes
``last_used_at``), which returns what is left; each process enforces against the last
remaining count it learnt minus its own uses since. Other processes' uses are unseen until
they flush and this one flushes after them, so with ``memory://`` the quota may be
overshot by at most about ``workers * flush_interval * rate`` (docs/operations.md). With
Redis the counter is exact and the store follows it in the same batches.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.types import Message, Send

from .errors import ConfigurationError, QuotaExceeded, RateLimited, ServiceUnavailable
from .stats import Counters
from .stores.base import KeyRecord, QuotaState
from .usage import UsageRecorder

if TYPE_CHECKING:
    from .principal import APIKeyUser

__all__ = [
    "DEFAULT_RATE_LIMIT_STORAGE",
    "LimitEnforcer",
    "LimitPolicy",
    "MemoryRateLimiter",
    "QuotaPolicy",
    "Rate",
    "RateLimiter",
    "RedisRateLimiter",
    "normalize_rate_limit",
    "parse_rate_limit",
    "send_with_headers",
]

logger = logging.getLogger("keystile.limits")

DEFAULT_RATE_LIMIT_STORAGE = "memory://"
#: Seconds Redis is left alone after a failure (decisions follow ``on_error`` meanwhile).
REDIS_RETRY_INTERVAL = 1.0
#: Seconds to connect to Redis and to wait for an answer before it counts as down.
REDIS_TIMEOUT = 0.25
#: The name of the rate-limit policy in the ``RateLimit-Policy``/``RateLimit`` fields.
POLICY_NAME = "default"
#: Idle GCRA slots are dropped when the slot table grows past this.
_SLOT_PRUNE_AT = 10_000

OnError = Literal["allow", "deny"]

_UNITS: dict[str, tuple[str, int]] = {}
for _unit, _length, _aliases in (
    ("second", 1, ("s", "sec", "secs", "second", "seconds")),
    ("minute", 60, ("m", "min", "mins", "minute", "minutes")),
    ("hour", 3600, ("h", "hr", "hrs", "hour", "hours")),
    ("day", 86400, ("d", "day", "days")),
):
    for _alias in _aliases:
        _UNITS[_alias] = (_unit, _length)
_RATE_RE = re.compile(r"\s*(\d{1,12})\s*(?:/|per)\s*([a-z]+)\s*", re.ASCII | re.IGNORECASE)


# -- policies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Rate:
    """A parsed rate limit, e.g. ``10/second``. Interned: one object per limit, so a
    slot can tell by identity whether the limit it was built for still applies."""

    count: int
    period: float
    #: The normalised form, ``"10/second"``.
    text: str
    #: ``period / count``: how far one request moves the TAT.
    interval: float
    #: ``period - interval``: how far ahead of now the TAT may be for a request to pass.
    tau: float
    #: ``RateLimit-Policy`` field value.
    policy_field: str


_RATES: dict[str, Rate] = {}


def parse_rate_limit(text: str) -> Rate:
    """``"10/second"``, ``"100/minute"``, ``"1000/hour"``, ``"5/day"`` (also ``10/s``,
    ``10 per sec``, …) → :class:`Rate`; ``ValueError`` for anything else."""
    rate = _RATES.get(text)
    if rate is not None:
        return rate
    match = _RATE_RE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None or int(match.group(1)) < 1:
        raise ValueError(
            f"invalid rate limit {text!r}: use N/second, N/minute, N/hour or N/day with N >= 1"
        )
    count, (name, period) = int(match.group(1)), unit
    normal = f"{count}/{name}"
    rate = _RATES.get(normal)
    if rate is None:
        interval = period / count
        rate = Rate(
            count,
            float(period),
            normal,
            interval,
            period - interval,
            f'"{POLICY_NAME}";q={count};w={period}',
        )
        _RATES[normal] = rate
    if len(_RATES) < 10_000:
        _RATES[text] = rate
    return rate


def normalize_rate_limit(text: str | None) -> str | None:
    """The stored form of a rate limit (``"10/s"`` → ``"10/second"``); ``None`` stays."""
    return None if text is None else parse_rate_limit(text).text


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """A key's quota as its state was read: the snapshot a process starts from."""

    quota: int
    remaining: int
    #: Seconds between refills, or ``None``.
    refill: float | None
    #: Epoch seconds of the last reset to full (refills fall at this plus multiples).
    reset_at: float


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The limits of one key, precomputed for the request path (on ``APIKeyUser.limits``)."""

    rate: Rate | None
    quota: QuotaPolicy | None

    @classmethod
    def from_record(cls, record: KeyRecord) -> LimitPolicy | None:
        """The policy of ``record``, or ``None`` when it has no limit of its own."""
        if record.rate_limit is None and record.quota is None:
            return None
        rate = parse_rate_limit(record.rate_limit) if record.rate_limit is not None else None
        quota = None
        if record.quota is not None:
            reset = record.quota_reset_at or record.created_at
            quota = QuotaPolicy(
                quota=record.quota,
                remaining=(
                    record.quota_remaining if record.quota_remaining is not None else record.quota
                ),
                refill=record.quota_refill.total_seconds() if record.quota_refill else None,
                reset_at=reset.timestamp(),
            )
        return cls(rate, quota)


# -- the in-process limiter ---------------------------------------------------------------


class RateLimiter(Protocol):
    """Where rate-limit state lives: this process (``memory://``) or Redis."""

    async def acquire(self, key_id: str, rate: Rate) -> float:
        """Take one request of ``key_id`` under ``rate``: ``0.0`` if it passes, else the
        seconds until one would (nothing taken)."""

    def state(self, key_id: str, rate: Rate) -> tuple[int, float]:
        """What is left after the last decision: requests, and seconds until all are."""

    async def aclose(self) -> None: ...


class MemoryRateLimiter:
    """GCRA in this process: per key a slot ``[TAT, rate]``, all on the monotonic clock."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self._slots: dict[str, list[Any]] = {}

    def take(self, key_id: str, rate: Rate, now: float) -> float:
        """The synchronous decision: ``0.0`` and the request counted, or the wait."""
        slot = self._slots.get(key_id)
        if slot is None or slot[1] is not rate:
            # A new key, or its limit changed: a fresh budget under the new limit.
            if slot is None and len(self._slots) >= _SLOT_PRUNE_AT:
                self._prune(now)
            slot = self._slots[key_id] = [now, rate]
        tat: float = slot[0]
        if tat < now:
            tat = now
        if tat - now > rate.tau:
            return tat - now - rate.tau
        slot[0] = tat + rate.interval
        return 0.0

    async def acquire(self, key_id: str, rate: Rate) -> float:
        return self.take(key_id, rate, self.monotonic())

    def state(self, key_id: str, rate: Rate) -> tuple[int, float]:
        now = self.monotonic()
        slot = self._slots.get(key_id)
        tat = slot[0] if slot is not None and slot[1] is rate and slot[0] > now else now
        return _remaining(rate, tat - now), tat - now

    def _prune(self, now: float) -> None:
        """Drop slots whose TAT has passed: they hold nothing a fresh slot would not."""
        for key_id in [k for k, slot in self._slots.items() if slot[0] <= now]:
            del self._slots[key_id]

    async def aclose(self) -> None:
        return None


def _remaining(rate: Rate, ahead: float) -> int:
    """Requests that would still pass when the TAT is ``ahead`` seconds in the future."""
    return max(0, min(rate.count, int((rate.period - ahead) / rate.interval + 1e-9)))


class QuotaBook:
    """What this process knows of each key's remaining quota, shared by every enforcer on
    one usage recorder: the count learnt last (from the key's state, or from the flush
    that took this process's uses) and the uses counted since."""

    __slots__ = ("__weakref__", "_slots", "recorder")

    _books: weakref.WeakKeyDictionary[UsageRecorder, QuotaBook] = weakref.WeakKeyDictionary()

    def __init__(self, recorder: UsageRecorder) -> None:
        self.recorder = recorder
        #: key id → [quota, refill, period start, known remaining, used since, period end]
        self._slots: dict[str, list[Any]] = {}
        recorder.on_quota(self._synced)

    @classmethod
    def of(cls, recorder: UsageRecorder) -> QuotaBook:
        book = cls._books.get(recorder)
        if book is None:
            book = cls._books[recorder] = cls(recorder)
        return book

    def _slot(self, key_id: str, q: QuotaPolicy, now: float) -> list[Any]:
        slot = self._slots.get(key_id)
        if slot is None or slot[0] != q.quota or slot[1] != q.refill or q.reset_at > slot[2]:
            # First sight, or the quota was changed (an update starts a new period).
            used = self.recorder.unwritten_uses(key_id) if slot is not None else 0
            end = q.reset_at + q.refill if q.refill else math.inf
            slot = self._slots[key_id] = [q.quota, q.refill, q.reset_at, q.remaining, used, end]
        elif q.reset_at == slot[2] and q.remaining < slot[3]:
            # A newer read of the same period (remaining only falls within one).
            slot[3] = q.remaining
            slot[4] = self.recorder.unwritten_uses(key_id)
        if now >= slot[5]:
            refill = slot[1]
            periods = int((now - slot[5]) // refill) + 1
            slot[2] = slot[5] + (periods - 1) * refill
            slot[5] = slot[2] + refill
            slot[3], slot[4] = slot[0], 0
        return slot

    def wait(self, key_id: str, q: QuotaPolicy, now: float) -> float | None:
        """``None`` if a use is left, else the seconds until the refill (``inf``: never)."""
        slot = self._slot(key_id, q, now)
        if slot[3] - slot[4] > 0:
            return None
        return float(slot[5] - now)

    def use(self, key_id: str) -> None:
        """Count a use (after ``wait`` said one is left)."""
        self._slots[key_id][4] += 1
        self.recorder.count_use(key_id)

    def left(self, key_id: str) -> int | None:
        slot = self._slots.get(key_id)
        return None if slot is None else max(0, slot[3] - slot[4])

    def period(self, key_id: str, q: QuotaPolicy, now: float) -> tuple[float, int]:
        """The current period's start (epoch seconds) and the count it starts from: the
        key's snapshot if the period is the one it was read in, else the full quota."""
        slot = self._slot(key_id, q, now)
        start = slot[2]
        return start, (q.remaining if start == q.reset_at else q.quota)

    def _synced(self, states: Mapping[str, QuotaState]) -> None:
        for key_id, state in states.items():
            slot = self._slots.get(key_id)
            if slot is None:
                continue
            reset = state.reset_at.timestamp() if state.reset_at is not None else slot[2]
            if reset < slot[2]:
                continue  # written for a period this process has already left
            if reset > slot[2] and slot[1]:
                slot[2], slot[5] = reset, reset + slot[1]
            slot[3] = state.remaining
            slot[4] = self.recorder.unwritten_uses(key_id)


# -- Redis ----------------------------------------------------------------------------------

#: KEYS: rate key (or ""), quota key (or ""). ARGV: period, count, quota start value,
#: quota key lifetime (s). Returns {0, remaining, reset} (passed), {1, wait} (rate
#: limited), {2} (quota used up); numbers as strings (Lua numbers become integers).
_LUA = """
local rkey, qkey = KEYS[1], KEYS[2]
if qkey ~= '' then
    local left = redis.call('GET', qkey)
    if left == false then
        left = tonumber(ARGV[3])
        redis.call('SET', qkey, left, 'EX', ARGV[4])
    else
        left = tonumber(left)
    end
    if left <= 0 then return {2} end
end
local remaining, reset = '-1', '0'
if rkey ~= '' then
    local period, count = tonumber(ARGV[1]), tonumber(ARGV[2])
    local interval = period / count
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    local tat = tonumber(redis.call('GET', rkey) or now)
    if tat < now then tat = now end
    local ahead = tat - now
    if ahead > period - interval then
        return {1, string.format('%.6f', ahead - period + interval)}
    end
    tat = tat + interval
    redis.call('SET', rkey, string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
    remaining = string.format('%.6f', (period - (tat - now)) / interval)
    reset = string.format('%.6f', tat - now)
end
if qkey ~= '' then redis.call('DECR', qkey) end
return {0, remaining, reset}
"""


def _redis_url(url: str) -> tuple[str, str]:
    """``url`` without keystile's own ``key_prefix`` parameter, and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "key_prefix"), "keystile")
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisRateLimiter:
    """GCRA and quota counters in Redis, one atomic script per request.

    ``redis://host:port/db`` (``rediss://`` for TLS); ``?key_prefix=NAME`` puts the keys
    under another prefix (default ``keystile``). Keys carry the key id in a hash tag, so a
    Redis Cluster keeps both of a key's counters on one shard. Connections belong to the
    event loop that made them, so a client is made per loop.
    """

    def __init__(self, url: str, *, timeout: float = REDIS_TIMEOUT) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:  # pragma: no cover - depends on the installation
            raise ConfigurationError(
                "rate_limit_storage='redis://…' needs the redis client: "
                "python -m pip install 'keystile[redis]'"
            ) from None
        self.url, self.prefix = _redis_url(url)
        self.timeout = timeout
        self.display_url = _redact(self.url)
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: dict[str, tuple[int, float]] = {}

    def _get_script(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=self.timeout,
                socket_timeout=self.timeout,
                retry_on_timeout=False,
            )
            self._script = self._client.register_script(_LUA)
            self._loop = loop
        return self._script

    def rate_key(self, key_id: str, rate: Rate) -> str:
        return f"{self.prefix}:{{{key_id}}}:rate:{rate.count}/{int(rate.period)}"

    def quota_key(self, key_id: str, quota: int, period_start: float) -> str:
        return f"{self.prefix}:{{{key_id}}}:quota:{quota}:{int(period_start * 1000)}"

    async def decide(
        self,
        key_id: str,
        rate: Rate | None,
        quota: tuple[str, int, int] | None,
    ) -> tuple[int, float]:
        """One round trip: ``(0, 0.0)`` passed, ``(1, wait)`` rate limited, ``(2, 0.0)``
        quota used up. ``quota`` is ``(counter key, start value, lifetime)``."""
        script = self._get_script()
        keys = [
            self.rate_key(key_id, rate) if rate is not None else "",
            quota[0] if quota is not None else "",
        ]
        args = [
            rate.period if rate is not None else 0,
            rate.count if rate is not None else 0,
            quota[1] if quota is not None else 0,
            quota[2] if quota is not None else 0,
        ]
        result = await script(keys=keys, args=args)
        code = int(result[0])
        if code == 1:
            return 1, float(result[1])
        if code == 0 and rate is not None:
            self._last[key_id] = (int(float(result[1]) + 1e-6), float(result[2]))
        return code, 0.0

    async def acquire(self, key_id: str, rate: Rate) -> float:
        code, wait = await self.decide(key_id, rate, None)
        return wait if code == 1 else 0.0

    def state(self, key_id: str, rate: Rate) -> tuple[int, float]:
        """The last answer Redis gave this process for ``key_id`` (informational)."""
        return self._last.get(key_id, (rate.count, 0.0))

    async def quota_left(self, key: str) -> int | None:
        """The Redis counter behind a quota key (for tests and operators)."""
        self._get_script()
        value = await self._client.get(key)
        return None if value is None else int(value)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


# -- the enforcer -------------------------------------------------------------------------


def _seconds(wait: float) -> int:
    """``Retry-After``: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


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
        if on_error not in ("allow", "deny"):
            raise ConfigurationError(
                f"rate_limit_on_error must be 'allow' or 'deny', not {on_error!r}"
            )
        try:
            self.default_rate = (
                parse_rate_limit(default_rate_limit) if default_rate_limit is not None else None
            )
        except ValueError as exc:
            raise ConfigurationError(f"default_rate_limit: {exc}") from None
        storage = storage or DEFAULT_RATE_LIMIT_STORAGE
        scheme = storage.split(":", 1)[0].lower()
        if scheme not in ("memory", "redis", "rediss", "unix"):
            raise ConfigurationError(
                f"rate_limit_storage must be memory:// or redis://…, not {storage!r}"
            )
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
        self._redis_down_until = -math.inf
        self._redis_failing = False

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

    def check(self, user: APIKeyUser) -> RateLimited | QuotaExceeded | None:
        """The in-process decision for ``user`` (``memory://``, or Redis's fallback)."""
        policy = user.limits
        if policy is None:
            rate, quota = self.default_rate, None
            if rate is None:
                return None
        else:
            rate, quota = policy.rate or self.default_rate, policy.quota
        key_id = user.key_id
        if quota is not None:
            wait = self.quotas.wait(key_id, quota, self.clock())
            if wait is not None:
                return self._quota_refusal(quota, wait)
        if rate is not None:
            wait = self.local.take(key_id, rate, self.monotonic())
            if wait:
                return self._rate_refusal(rate, wait)
        if quota is not None:
            self.quotas.use(key_id)
        return None

    async def acheck(
        self, user: APIKeyUser
    ) -> RateLimited | QuotaExceeded | ServiceUnavailable | None:
        """The decision for ``user`` with any storage."""
        if self.redis is None:
            return self.check(user)
        policy = user.limits
        rate = self.default_rate if policy is None else (policy.rate or self.default_rate)
        quota = None if policy is None else policy.quota
        if rate is None and quota is None:
            return None
        if self.monotonic() < self._redis_down_until:
            return self._fallback(user)
        key_id = user.key_id
        now = self.clock()
        counter = None
        if quota is not None:
            start, initial = self.quotas.period(key_id, quota, now)
            lifetime = int(quota.refill + 60) if quota.refill else 86_400
            counter = (self.redis.quota_key(key_id, quota.quota, start), initial, lifetime)
        try:
            code, wait = await self.redis.decide(key_id, rate, counter)
        except Exception as exc:  # any client or socket failure: never a 500
            self._redis_failed(exc)
            return self._fallback(user)
        if self._redis_failing:
            self._redis_failing = False
            logger.warning("keystile: Redis at %s answers again", self.redis.display_url)
        if code == 1:
            assert rate is not None
            return self._rate_refusal(rate, wait)
        if code == 2:
            assert quota is not None
            wait_quota = self.quotas.wait(key_id, quota, now)
            return self._quota_refusal(quota, math.inf if wait_quota is None else wait_quota)
        if quota is not None:
            self.quotas.use(key_id)  # the store follows the Redis counter in the flush
        return None

    def success_headers(self, user: APIKeyUser) -> list[tuple[bytes, bytes]]:
        """``RateLimit-Policy`` and ``RateLimit`` for a request that passed (with
        ``headers=True``); empty for a key without a rate limit."""
        policy = user.limits
        rate = self.default_rate if policy is None else (policy.rate or self.default_rate)
        if rate is None:
            return []
        limiter: Any = self.redis if self.redis is not None else self.local
        remaining, reset = limiter.state(user.key_id, rate)
        return [
            (b"ratelimit-policy", rate.policy_field.encode()),
            (
                b"ratelimit",
                f'"{POLICY_NAME}";r={remaining};t={math.ceil(reset - 1e-9)}'.encode(),
            ),
        ]

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    # -- helpers --------------------------------------------------------------------

    def _rate_refusal(self, rate: Rate, wait: float) -> RateLimited:
        self.counters.rate_limited += 1
        seconds = _seconds(wait)
        return RateLimited(
            rate.text,
            retry_after=seconds,
            headers=(
                ("RateLimit-Policy", rate.policy_field),
                ("RateLimit", f'"{POLICY_NAME}";r=0;t={seconds}'),
            ),
        )

    def _quota_refusal(self, quota: QuotaPolicy, wait: float) -> QuotaExceeded:
        self.counters.quota_exceeded += 1
        return QuotaExceeded(quota.quota, retry_after=None if wait == math.inf else _seconds(wait))

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
        self, user: APIKeyUser
    ) -> RateLimited | QuotaExceeded | ServiceUnavailable | None:
        self.counters.rate_limit_errors += 1
        if self.on_error == "deny":
            return ServiceUnavailable(
                "rate_limiter_unavailable",
                "The key's usage limits could not be checked right now; retry shortly.",
            )
        return self.check(user)


def quota_changes(quota: int | None, refill: timedelta | None, now: datetime) -> dict[str, Any]:
    """The stored fields of a new quota: full, its period starting ``now``."""
    if quota is None:
        return {
            "quota": None,
            "quota_remaining": None,
            "quota_refill": None,
            "quota_reset_at": None,
        }
    return {
        "quota": quota,
        "quota_remaining": quota,
        "quota_refill": refill,
        "quota_reset_at": now,
    }


def send_with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """``send`` that adds ``headers`` to the response start (``RateLimit`` on success)."""
    if not headers:
        return send

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return wrapped
