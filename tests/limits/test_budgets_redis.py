"""Budgets through a real Redis: exact integer quotas, a script error that stays one
request's, a lost counter rebuilt from what the store holds, and a rotation chain that
shares one Redis budget."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from test_budgets import show
from test_limits import limited_app, mint, statuses

from apps import client
from keystile import APIKeyMiddleware, KeyManager
from keystile.limits import MAX_QUOTA
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio


async def redis_keys(url: str, pattern: str) -> list[bytes]:
    import redis.asyncio as aioredis

    from keystile.limits.redis import RedisRateLimiter

    prefix = RedisRateLimiter(url).prefix
    conn = aioredis.Redis.from_url(url.split("?", 1)[0])
    try:
        return [k async for k in conn.scan_iter(match=f"{prefix}:{pattern}")]
    finally:
        await conn.aclose()


async def redis_call(url: str, *args: object) -> object:
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(url.split("?", 1)[0])
    try:
        return await conn.execute_command(*args)
    finally:
        await conn.aclose()


def two_runtimes(url: str, redis_url: str) -> list[APIKeyMiddleware]:
    """Two middlewares, each with a runtime of its own, on one store and one Redis."""
    return [limited_app(store_from_url(url), rate_limit_storage=redis_url) for _ in range(2)]


async def test_largest_quota_stays_an_exact_integer_in_redis(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """quota=2**53-1 through Redis: every request passes and the counter is exact."""
    key, key_id = await mint(sqlite_database_url, quota=MAX_QUOTA)
    app = limited_app(store_from_url(sqlite_database_url), rate_limit_storage=redis_url)
    async with client(app) as http:
        assert await statuses(http, key, 3) == [200] * 3
    assert app.stats().rate_limit_errors == 0
    [counter] = await redis_keys(redis_url, f"*{key_id}:quota:*")
    assert await redis_call(redis_url, "GET", counter) == str(MAX_QUOTA - 3).encode()
    await app.aclose()
    assert (await show(sqlite_database_url, key_id)).quota_remaining == MAX_QUOTA - 3


async def test_a_script_error_is_that_requests_503_not_an_outage(
    redis_url: str,
    sqlite_database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One key's counter broken in Redis: that request gets 503, logged; another limited key
    is still decided by Redis at once (its counter moves), not by the fallback."""
    broken, broken_id = await mint(sqlite_database_url, quota=10)
    fine, fine_id = await mint(sqlite_database_url, quota=10)
    app = limited_app(store_from_url(sqlite_database_url), rate_limit_storage=redis_url)
    async with client(app) as http:
        assert await statuses(http, broken, 1) == [200]
        [counter] = await redis_keys(redis_url, f"*{broken_id}:quota:*")
        await redis_call(redis_url, "DEL", counter)
        await redis_call(redis_url, "HSET", counter, "x", "1")
        with caplog.at_level(logging.ERROR, logger="keystile.limits"):
            r = await http.get("/whoami", headers={"X-API-Key": broken})
        assert await statuses(http, fine, 2) == [200, 200]
    assert r.status_code == 503
    assert app.stats().rate_limit_errors == 1
    [fine_counter] = await redis_keys(redis_url, f"*{fine_id}:quota:*")
    assert await redis_call(redis_url, "GET", fine_counter) == b"8"
    assert [rec.levelname for rec in caplog.records if "script" in rec.getMessage()] == ["ERROR"]
    assert broken not in caplog.text
    await app.aclose()


async def test_a_lost_counter_is_rebuilt_from_the_store_minus_uses_since(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """quota=10: 4 used and flushed, 2 more unflushed, then the counter lost: 4 more pass."""
    key, key_id = await mint(sqlite_database_url, quota=10)
    app = limited_app(store_from_url(sqlite_database_url), rate_limit_storage=redis_url)
    async with client(app) as http:
        assert await statuses(http, key, 4) == [200] * 4
        await app.recorder.flush()
        assert await statuses(http, key, 2) == [200] * 2
        for counter in await redis_keys(redis_url, f"*{key_id}:quota:*"):
            await redis_call(redis_url, "DEL", counter)
        codes = await statuses(http, key, 8)
    assert codes == [200] * 4 + [429] * 4
    await app.aclose()
    assert (await show(sqlite_database_url, key_id)).quota_remaining == 0


async def test_rotation_chain_shares_one_redis_budget(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """Two runtimes on one Redis, old key and successor: one quota of 5 and one 3/minute."""
    key, key_id = await mint(sqlite_database_url, quota=5, rate_limit="3/minute")
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        new = await keys.rotate(key_id, owner="acme", grace=timedelta(hours=1))
    apps = two_runtimes(sqlite_database_url, redis_url)
    async with client(apps[0]) as first, client(apps[1]) as second:
        codes = await statuses(first, key, 2) + await statuses(second, new.key, 2)
    assert codes == [200, 200, 200, 429]
    for app in apps:
        await app.aclose()


async def test_named_limits_through_redis_all_or_nothing(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """Two runtimes, one Redis: burst 2/minute refuses the third, named; the refused
    request spends nothing of the default 3/minute."""
    key, key_id = await mint(
        sqlite_database_url, rate_limit="3/minute", rate_limits={"burst": "2/minute"}
    )
    apps = two_runtimes(sqlite_database_url, redis_url)
    async with client(apps[0]) as first, client(apps[1]) as second:
        assert await statuses(first, key, 1) + await statuses(second, key, 1) == [200, 200]
        refused = await first.get("/whoami", headers={"X-API-Key": key})
    assert refused.status_code == 429 and refused.json()["policy"] == "burst"
    assert refused.headers["ratelimit-policy"] == '"default";q=3;w=60, "burst";q=2;w=60'
    [default_key] = await redis_keys(redis_url, f"*{key_id}:rate:3/60")
    tat = float(await redis_call(redis_url, "GET", default_key))  # type: ignore[arg-type]
    [burst_key] = await redis_keys(redis_url, f"*{key_id}#burst:rate:2/60")
    burst_tat = float(await redis_call(redis_url, "GET", burst_key))  # type: ignore[arg-type]
    assert burst_tat - tat == pytest.approx(60 - 40, abs=1.0)  # 2x30 s vs 2x20 s, no more
    for app in apps:
        await app.aclose()


async def test_two_runtimes_on_one_redis_share_one_owner_budget_exactly(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """The owner's quota of 4 and burst of 3/minute, two keys, two runtimes: exactly 3 pass
    the burst, then the quota holds what is left exactly, and the store follows."""
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        await keys.set_owner_limits("acme", quota=4, rate_limits={"burst": "3/minute"})
    first, _ = await mint(sqlite_database_url)
    second, _ = await mint(sqlite_database_url)
    apps = two_runtimes(sqlite_database_url, redis_url)
    codes: list[int] = []
    policies: list[str] = []
    async with client(apps[0]) as a, client(apps[1]) as b:
        for i in range(8):
            r = await (a if i % 2 else b).get(
                "/whoami", headers={"X-API-Key": first if i < 4 else second}
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                policies.append(r.json()["policy"])
    assert codes.count(200) == 3 and codes[:3] == [200] * 3
    assert set(policies) == {"owner.burst"}
    for app in apps:
        await app.aclose()
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        limits = await keys.owner_limits("acme")
    assert limits is not None and limits.quota_remaining == 1


async def test_owner_quota_through_redis_is_exact_across_runtimes(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """The owner's quota of 5 over two keys and two runtimes on one Redis: exactly 5."""
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        await keys.set_owner_limits("acme", quota=5)
    first, _ = await mint(sqlite_database_url)
    second, _ = await mint(sqlite_database_url)
    apps = two_runtimes(sqlite_database_url, redis_url)
    codes: list[int] = []
    async with client(apps[0]) as a, client(apps[1]) as b:
        for i in range(12):
            codes += await statuses(a if i % 2 else b, first if i % 3 else second, 1)
    assert codes.count(200) == 5 and codes[:5] == [200] * 5
    for app in apps:
        await app.aclose()
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        limits = await keys.owner_limits("acme")
    assert limits is not None and limits.quota_remaining == 0
