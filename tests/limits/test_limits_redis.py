"""Limits shared through a real Redis: one limit and one quota across processes, and what
happens when Redis cannot be reached.

The URL comes from ``KEYSTILE_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``); without
it the tests skip with the reason, unless ``KEYSTILE_REQUIRE_REDIS=1``, which makes the skip a
failure. Every test uses a key prefix of its own, deleted afterwards.
"""

from __future__ import annotations

import logging

import pytest
from test_limits import enforcer_of, limited_app, mint, statuses

from apps import client
from keystile import KeyManager
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio


async def test_two_middlewares_on_one_redis_share_one_limit_exactly(
    redis_url: str, sqlite_database_url: str
) -> None:
    """Two runtimes (two store objects) on one Redis: 5/minute lets exactly 5 through in all."""
    key, _ = await mint(sqlite_database_url, rate_limit="5/minute")
    apps = [
        limited_app(store_from_url(sqlite_database_url), rate_limit_storage=redis_url)
        for _ in range(2)
    ]
    assert apps[0].runtime is not apps[1].runtime
    codes: list[int] = []
    async with client(apps[0]) as first, client(apps[1]) as second:
        for i in range(12):
            codes += await statuses(first if i % 2 else second, key, 1)
        r = await first.get("/whoami", headers={"X-API-Key": key})
    assert codes.count(200) == 5 and codes[:5] == [200] * 5
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 12
    assert r.headers["ratelimit-policy"] == '"default";q=5;w=60'
    assert r.headers["ratelimit"].startswith('"default";r=0;t=')
    for app in apps:
        await app.aclose()


async def test_quota_through_redis_is_exact_across_middlewares_and_reaches_the_store(
    redis_url: str, sqlite_database_url: str
) -> None:
    """quota=3 on two runtimes: exactly 3 pass in all; the flushes leave 0 in the store."""
    key, key_id = await mint(sqlite_database_url, quota=3)
    apps = [
        limited_app(store_from_url(sqlite_database_url), rate_limit_storage=redis_url)
        for _ in range(2)
    ]
    codes: list[int] = []
    async with client(apps[0]) as first, client(apps[1]) as second:
        for i in range(8):
            codes += await statuses(first if i % 2 else second, key, 1)
        r = await first.get("/whoami", headers={"X-API-Key": key})
    assert codes.count(200) == 3
    assert r.status_code == 429 and r.json()["error"] == "quota_exceeded"
    for app in apps:
        await app.aclose()
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        assert (await keys.get(key_id, owner="acme")).quota_remaining == 0


async def test_limit_change_starts_a_fresh_redis_budget(
    redis_url: str, sqlite_database_url: str
) -> None:
    """A raised limit applies at the next request, with its own budget in Redis."""
    key, key_id = await mint(sqlite_database_url, rate_limit="1/minute")
    app = limited_app(store_from_url(sqlite_database_url), rate_limit_storage=redis_url)
    async with client(app) as http, KeyManager(store_from_url(sqlite_database_url)) as keys:
        assert await statuses(http, key, 2) == [200, 429]
        await keys.update(key_id, owner="acme", rate_limit="3/minute")
        assert await statuses(http, key, 4) == [200, 200, 200, 429]
    await app.aclose()


async def test_redis_down_with_allow_falls_back_to_this_process_and_logs_once(
    closed_port_url: str, sqlite_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis unreachable, on_error="allow": never a 500, the local limit holds, one log line."""
    key, _ = await mint(sqlite_database_url, rate_limit="3/minute")
    app = limited_app(store_from_url(sqlite_database_url), rate_limit_storage=closed_port_url)
    with caplog.at_level(logging.WARNING, logger="keystile.limits"):
        async with client(app) as http:
            codes = await statuses(http, key, 6)
    assert codes == [200, 200, 200, 429, 429, 429]
    assert app.stats().rate_limit_errors == 6
    outages = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outages) == 1 and key not in caplog.text
    await app.aclose()


async def test_redis_down_with_deny_answers_503(
    closed_port_url: str, sqlite_database_url: str
) -> None:
    """Redis unreachable, on_error="deny": limited keys get 503 with Retry-After, others pass."""
    limited_key, _ = await mint(sqlite_database_url, rate_limit="100/second")
    free_key, _ = await mint(sqlite_database_url)
    app = limited_app(
        store_from_url(sqlite_database_url),
        rate_limit_storage=closed_port_url,
        rate_limit_on_error="deny",
    )
    async with client(app) as http:
        r = await http.get("/whoami", headers={"X-API-Key": limited_key})
        assert await statuses(http, free_key, 2) == [200, 200]
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == "temporarily_unavailable"
    assert enforcer_of(app).counters.rate_limit_errors == 1
    await app.aclose()
