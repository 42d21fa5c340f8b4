"""Usage limits in one process: GCRA rate limits and quotas, refused with 429 after the key
is verified, through real ASGI requests (memory, SQLite and Postgres stores)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest

from apps import client, inner_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, KeyStore
from keystile.limits import (
    LimitEnforcer,
    MemoryRateLimiter,
    QuotaBook,
    QuotaPolicy,
    normalize_rate_limit,
    parse_rate_limit,
)
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio


def limited_app(store: KeyStore, **options: Any) -> APIKeyMiddleware:
    """The test app behind APIKeyMiddleware, limit options passed as a user would."""
    return APIKeyMiddleware(inner_app(), store=store, argon2=CHEAPEST_PARAMETERS, **options)


def enforcer_of(app: APIKeyMiddleware) -> LimitEnforcer:
    """The limits the middleware enforces."""
    return app.limits


async def mint(url: str, **options: Any) -> tuple[str, str]:
    """A key (plaintext, id) created through KeyManager on the store at ``url``."""
    async with KeyManager(store_from_url(url), argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name=f"k-{uuid.uuid4().hex[:8]}", **options)
        return created.key, created.id


async def statuses(http: httpx.AsyncClient, key: str, n: int) -> list[int]:
    return [(await http.get("/whoami", headers={"X-API-Key": key})).status_code for _ in range(n)]


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(0.02)


# -- parsing ------------------------------------------------------------------------------


def test_rate_limit_forms_are_normalised() -> None:
    """Every accepted spelling becomes N/second|minute|hour|day; anything else is refused."""
    assert normalize_rate_limit("10/s") == "10/second"
    assert normalize_rate_limit(" 100 per Minute ") == "100/minute"
    assert normalize_rate_limit("1000/hr") == "1000/hour"
    assert normalize_rate_limit("5/days") == "5/day"
    assert parse_rate_limit("10/sec") is parse_rate_limit("10/second")
    for bad in ("0/second", "10", "10/fortnight", "-1/s", "ten/second", "1.5/s"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)


def test_gcra_allows_a_burst_of_count_then_one_per_interval() -> None:
    """5/minute: five at once, the sixth waits 12 s, and one more passes every 12 s."""
    limiter, rate = MemoryRateLimiter(), parse_rate_limit("5/minute")
    assert [limiter.take("k", rate, 100.0) for _ in range(5)] == [0.0] * 5
    assert limiter.take("k", rate, 100.0) == pytest.approx(12.0)
    assert limiter.take("k", rate, 111.9) == pytest.approx(0.1)
    assert limiter.take("k", rate, 112.0) == 0.0
    assert limiter.take("k", rate, 112.0) > 0
    assert limiter.take("other", rate, 112.0) == 0.0


def test_quota_book_refills_at_each_period() -> None:
    """A used-up quota with a refill is full again at the period's end, not before."""
    recorder_app = APIKeyMiddleware(inner_app(), store=store_from_url("memory://"))
    book = QuotaBook.of(recorder_app.recorder)
    q = QuotaPolicy(quota=2, remaining=2, refill=60.0, reset_at=1_000.0)
    for _ in range(2):
        assert book.wait("k", q, 1_010.0) is None
        book.use("k")
    assert book.wait("k", q, 1_010.0) == pytest.approx(50.0)
    assert book.wait("k", q, 1_059.0) == pytest.approx(1.0)
    assert book.wait("k", q, 1_060.0) is None
    assert recorder_app.recorder.unwritten_uses("k") == 2


# -- through the middleware ------------------------------------------------------------------


async def test_five_per_minute_sixth_gets_429_with_retry_after_and_ratelimit_fields(
    database_url: str,
) -> None:
    """rate_limit="5/minute": five pass, the sixth gets 429 rate_limited with the IETF fields."""
    key, _ = await mint(database_url, rate_limit="5/minute")
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        assert await statuses(http, key, 5) == [200] * 5
        r = await http.get("/whoami", headers={"X-API-Key": key})
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 12
    assert r.headers["ratelimit-policy"] == '"default";q=5;w=60'
    assert r.headers["ratelimit"] == f'"default";r=0;t={r.headers["retry-after"]}'
    assert "www-authenticate" not in r.headers
    body = r.json()
    assert body["error"] == "rate_limited" and body["limit"] == "5/minute"
    assert key not in r.text
    assert app.stats().rate_limited == 1
    await app.aclose()


async def test_unknown_key_cannot_spend_a_real_keys_budget(sqlite_database_url: str) -> None:
    """Wrong secrets for a limited key's id are refused 401 and use none of its limit."""
    key, key_id = await mint(sqlite_database_url, rate_limit="2/minute")
    forged = [f"ks_{key_id}_{'A' * 43}{n:06d}" for n in range(10)]
    app = limited_app(store_from_url(sqlite_database_url))
    async with client(app) as http:
        for bad in forged:
            assert (await http.get("/whoami", headers={"X-API-Key": bad})).status_code == 401
        assert await statuses(http, key, 3) == [200, 200, 429]
    await app.aclose()


async def test_default_rate_limit_applies_to_keys_without_their_own(
    sqlite_database_url: str,
) -> None:
    """default_rate_limit limits a key without a limit; a key's own limit wins over it."""
    plain, _ = await mint(sqlite_database_url)
    own, _ = await mint(sqlite_database_url, rate_limit="4/minute")
    app = limited_app(store_from_url(sqlite_database_url), default_rate_limit="2/minute")
    async with client(app) as http:
        assert await statuses(http, plain, 3) == [200, 200, 429]
        assert await statuses(http, own, 5) == [200] * 4 + [429]
    await app.aclose()


async def test_unlimited_key_is_never_refused(sqlite_database_url: str) -> None:
    """Without a limit of its own or a default, a key is not limited."""
    key, _ = await mint(sqlite_database_url)
    app = limited_app(store_from_url(sqlite_database_url))
    async with client(app) as http:
        assert await statuses(http, key, 50) == [200] * 50
    assert app.stats().rate_limited == 0
    await app.aclose()


async def test_success_carries_ratelimit_when_asked(sqlite_database_url: str) -> None:
    """rate_limit_headers=True: a passing request says what is left of the limit."""
    key, _ = await mint(sqlite_database_url, rate_limit="3/minute")
    app = limited_app(store_from_url(sqlite_database_url), rate_limit_headers=True)
    async with client(app) as http:
        first = await http.get("/whoami", headers={"X-API-Key": key})
        second = await http.get("/whoami", headers={"X-API-Key": key})
    assert first.headers["ratelimit-policy"] == '"default";q=3;w=60'
    assert first.headers["ratelimit"] == '"default";r=2;t=20'
    assert second.headers["ratelimit"] == '"default";r=1;t=40'
    await app.aclose()


async def test_quota_of_three_then_quota_exceeded_also_after_a_restart(database_url: str) -> None:
    """quota=3: three pass, then 429 quota_exceeded, and still after a restart, with 0 stored."""
    key, key_id = await mint(database_url, quota=3)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        assert await statuses(http, key, 3) == [200] * 3
        r = await http.get("/whoami", headers={"X-API-Key": key})
    assert r.status_code == 429 and r.json()["error"] == "quota_exceeded"
    assert "retry-after" not in r.headers
    assert app.stats().quota_exceeded == 1
    await app.aclose()  # the shutdown flush writes the uses

    restarted = limited_app(store_from_url(database_url))
    async with client(restarted) as http:
        assert await statuses(http, key, 2) == [429, 429]
    await restarted.aclose()
    async with KeyManager(store_from_url(database_url)) as keys:
        stored = await keys.get(key_id, owner="acme")
    assert stored.quota == 3 and stored.quota_remaining == 0


async def test_quota_with_refill_answers_retry_after(sqlite_database_url: str) -> None:
    """A used-up quota that refills tells the client when (Retry-After up to the period)."""
    key, _ = await mint(sqlite_database_url, quota=1, quota_refill="1h")
    app = limited_app(store_from_url(sqlite_database_url))
    async with client(app) as http:
        assert await statuses(http, key, 1) == [200]
        r = await http.get("/whoami", headers={"X-API-Key": key})
    assert r.status_code == 429 and r.json()["error"] == "quota_exceeded"
    assert 3500 < int(r.headers["retry-after"]) <= 3600
    await app.aclose()


async def test_limit_change_reaches_a_running_middleware_at_once(database_url: str) -> None:
    """KeyManager.update in the same process: the next request runs under the new limit."""
    key, key_id = await mint(database_url, rate_limit="2/minute")
    app = limited_app(store_from_url(database_url))
    async with client(app) as http, KeyManager(store_from_url(database_url)) as keys:
        assert await statuses(http, key, 3) == [200, 200, 429]
        await keys.update(key_id, owner="acme", rate_limit="5/minute")
        assert await statuses(http, key, 6) == [200] * 5 + [429]
        await keys.update(key_id, owner="acme", rate_limit=None, quota=1)
        assert await statuses(http, key, 2) == [200, 429]
        await keys.update(key_id, owner="acme", quota=None)
        assert await statuses(http, key, 10) == [200] * 10
    await app.aclose()


async def test_quota_overshoot_with_two_workers_stays_within_the_bound(
    database_url: str,
) -> None:
    """Two processes, each flushing after k uses: at most quota + 2*k pass, and all of quota."""
    quota, per_flush = 10, 3
    key, key_id = await mint(database_url, quota=quota)
    workers = [limited_app(store_from_url(database_url), flush_interval=3600) for _ in range(2)]
    clients = [client(w) for w in workers]
    passed = 0
    for _ in range(quota):  # rounds: each worker serves per_flush requests, then flushes
        for worker, http in zip(workers, clients, strict=True):
            passed += (await statuses(http, key, per_flush)).count(200)
            await worker.recorder.flush()
    assert quota <= passed <= quota + 2 * per_flush
    for http in clients:
        await http.aclose()
    for worker in workers:
        await worker.aclose()
    async with KeyManager(store_from_url(database_url)) as keys:
        assert (await keys.get(key_id, owner="acme")).quota_remaining == 0
