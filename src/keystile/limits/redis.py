"""Rate limits and quotas in Redis (``redis://host:port/db``), shared by every process.

One Lua script does the GCRA of :mod:`keystile.limits.gcra` atomically in Redis, on
Redis's clock, so every process and machine shares one limit; the quota is a Redis
counter per key and period, exact across processes. What happens while Redis cannot be
reached is the enforcer's decision (``on_error``), not this module's.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError
from .policy import Rate

__all__ = ["REDIS_TIMEOUT", "RedisRateLimiter", "RedisScriptError"]

#: Seconds to connect to Redis and to wait for an answer before it counts as down.
REDIS_TIMEOUT = 0.25

#: KEYS: rate key (or ""), quota key (or ""). ARGV: period, count, quota start value,
#: quota key lifetime (s). Returns {0, remaining, reset} (passed), {1, wait} (rate
#: limited), {2} (quota used up); numbers as strings (Lua numbers become integers).
#: The quota counter is only ever written as the decimal text it was given and changed
#: by DECR, never through a Lua number (which prints 10**17 as "1e+17"), so it stays an
#: exact integer.
_LUA = """
local rkey, qkey = KEYS[1], KEYS[2]
if qkey ~= '' then
    local left = redis.call('GET', qkey)
    if left == false then
        left = ARGV[3]
        redis.call('SET', qkey, left, 'EX', ARGV[4])
    end
    if tonumber(left) <= 0 then return {2} end
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


class RedisScriptError(Exception):
    """Redis answered the limit script with an error (a counter of the wrong type, a
    value that is not a number): this request's state is broken, not the connection."""


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
        from redis.exceptions import ResponseError

        self._script_error = ResponseError
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
        try:
            result = await script(keys=keys, args=args)
        except self._script_error as exc:
            raise RedisScriptError(str(exc).split("\n", 1)[0][:200]) from None
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
