"""Rate limits and quotas in Redis (``redis://host:port/db``), shared by every process.

One Lua script does the GCRA of :mod:`keystile.limits.gcra` atomically in Redis, on
Redis's clock, so every process and machine shares one limit; the quota is a Redis
counter per key and period, exact across processes. What happens while Redis cannot be
reached is the enforcer's decision (``on_error``), not this module's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError
from .policy import POLICY_NAME, NamedRate, Rate

__all__ = [
    "REDIS_TIMEOUT",
    "RedisRateLimiter",
    "RedisScriptError",
    "connect_redis",
    "redact_redis_url",
    "require_redis_client",
    "split_key_prefix",
]

#: Seconds to connect to Redis and to wait for an answer before it counts as down.
REDIS_TIMEOUT = 0.25

#: KEYS: the quota counters (``ARGV[1]`` of them), then the rate keys. ARGV: the number
#: of quota counters, the request's cost, each counter's start value, lifetime (s) and
#: uses charged since (``charge``: taken first, unless the counter starts afresh from a
#: start value that already counts them), each rate's period and count. Every limit is
#: checked before any is spent: returns {2, i} (quota i used up), {1, i, wait} (rate i
#: refuses; the longest wait), or {0, remaining_1, reset_1, …} (passed, all spent). The
#: quota counters are only ever written as the decimal text they were given and changed
#: by DECRBY, never through a Lua number (which prints 10**17 as "1e+17"), so they stay
#: exact integers.
_LUA = """
local nq, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 3
for i = 1, nq do
    local left = redis.call('GET', KEYS[i])
    if left == false then
        left = ARGV[a]
        redis.call('SET', KEYS[i], left, 'EX', ARGV[a + 1])
    elseif ARGV[a + 2] ~= '0' then
        left = redis.call('DECRBY', KEYS[i], ARGV[a + 2])
    end
    if tonumber(left) < cost then return {2, i} end
    a = a + 3
end
if #KEYS == nq then
    for i = 1, nq do redis.call('DECRBY', KEYS[i], cost) end
    return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tats = {}
local worst, worst_i = 0, 0
for i = nq + 1, #KEYS do
    local period, count = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local interval = period / count
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    local new = tat + cost * interval
    local over = new - now - period
    if over > 1e-9 and over > worst then worst, worst_i = over, i - nq end
    tats[i] = {new, period, interval}
    a = a + 2
end
if worst_i > 0 then return {1, worst_i, string.format('%.6f', worst)} end
local out = {0}
for i = nq + 1, #KEYS do
    local s = tats[i]
    local ms = math.ceil((s[1] - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.6f', s[1]), 'PX', ms)
    out[#out + 1] = string.format('%.6f', (s[2] - (s[1] - now)) / s[3])
    out[#out + 1] = string.format('%.6f', s[1] - now)
end
for i = 1, nq do redis.call('DECRBY', KEYS[i], cost) end
return out
"""

#: A quota counter for one request: its Redis key, the count to start from if it is
#: missing, its lifetime in seconds, and the uses charged to it since.
Counter = tuple[str, int, int, int]


class RedisScriptError(Exception):
    """Redis answered the limit script with an error (a counter of the wrong type, a
    value that is not a number): this request's state is broken, not the connection."""


def split_key_prefix(url: str) -> tuple[str, str]:
    """``url`` without keystile's own ``key_prefix`` parameter, and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "key_prefix"), "keystile")
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def require_redis_client(option: str) -> None:
    """The ``ConfigurationError`` of an ``option`` set to Redis without the redis client."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            f"{option}='redis://…' needs the redis client: python -m pip install 'keystile[redis]'"
        ) from None


def connect_redis(url: str, timeout: float) -> Any:
    """A client of ``url`` that gives up after ``timeout`` seconds, for one event loop
    (its connections belong to the loop that made them)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry_on_timeout=False
    )


class RedisRateLimiter:
    """GCRA and quota counters in Redis, one atomic script per request.

    ``redis://host:port/db`` (``rediss://`` for TLS); ``?key_prefix=NAME`` puts the keys
    under another prefix (default ``keystile``). Keys carry the owner in a hash tag, so a
    Redis Cluster keeps every counter of one request (the key's and its owner's) on one
    shard. Connections belong to the
    event loop that made them, so a client is made per loop.
    """

    def __init__(self, url: str, *, timeout: float = REDIS_TIMEOUT) -> None:
        require_redis_client("rate_limit_storage")
        from redis.exceptions import ResponseError

        self._script_error = ResponseError
        self.url, self.prefix = split_key_prefix(url)
        self.timeout = timeout
        self.display_url = redact_redis_url(self.url)
        self._client: Any = None
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: dict[str, tuple[int, float]] = {}

    def _get_script(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = connect_redis(self.url, self.timeout)
            self._script = self._client.register_script(_LUA)
            self._loop = loop
        return self._script

    def rate_key(self, tag: str, limit: NamedRate) -> str:
        rate = limit.rate
        return f"{self.prefix}:{{{tag}}}:{limit.slot}:rate:{rate.count}/{int(rate.period)}"

    def quota_key(self, tag: str, budget: str, quota: int, period_start: float) -> str:
        return f"{self.prefix}:{{{tag}}}:{budget}:quota:{quota}:{int(period_start * 1000)}"

    async def decide(
        self,
        tag: str,
        rates: Sequence[NamedRate],
        counters: Sequence[Counter],
        cost: int = 1,
    ) -> tuple[int, int, float]:
        """One round trip for every limit of a request: ``(0, 0, 0.0)`` passed (all
        spent), ``(1, i, wait)`` rate ``i`` refuses, ``(2, i, 0.0)`` quota ``i`` is used
        up (nothing spent). Every key carries ``tag`` (the owner) as its hash tag, so a
        Redis Cluster keeps one request's keys on one shard."""
        script = self._get_script()
        keys = [c[0] for c in counters] + [self.rate_key(tag, r) for r in rates]
        args: list[Any] = [len(counters), cost]
        for _, start, lifetime, charged in counters:
            args += [start, lifetime, charged]
        for limit in rates:
            args += [limit.rate.period, limit.rate.count]
        try:
            result = await script(keys=keys, args=args)
        except self._script_error as exc:
            raise RedisScriptError(str(exc).split("\n", 1)[0][:200]) from None
        code = int(result[0])
        if code == 1:
            return 1, int(result[1]) - 1, float(result[2])
        if code == 2:
            return 2, int(result[1]) - 1, 0.0
        for i, limit in enumerate(rates):
            remaining, reset = result[1 + 2 * i], result[2 + 2 * i]
            self._last[limit.slot] = (int(float(remaining) + 1e-6), float(reset))
        return 0, 0, 0.0

    async def acquire(self, key_id: str, rate: Rate) -> float:
        code, _, wait = await self.decide(key_id, [NamedRate.of(POLICY_NAME, rate, key_id)], [])
        return wait if code == 1 else 0.0

    def state(self, slot: str, rate: Rate) -> tuple[int, float]:
        """The last answer Redis gave this process for a limiter ``slot`` (informational)."""
        return self._last.get(slot, (rate.count, 0.0))

    async def quota_left(self, key: str) -> int | None:
        """The Redis counter behind a quota key (for tests and operators)."""
        self._get_script()
        value = await self._client.get(key)
        return None if value is None else int(value)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


def redact_redis_url(url: str) -> str:
    """``url`` with its password, if any, as ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
