"""Budgets that hold: exempt paths never spend, a rotation chain spends one budget, quotas
are exact integers, and a replayed quota flush takes nothing twice (memory, SQLite and
Postgres stores, through real ASGI requests)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from test_limits import limited_app, mint, statuses

from apps import client
from keystile import KeyManagementError, KeyManager, KeyStore, StoreError
from keystile.limits import MAX_QUOTA, parse_rate_limit
from keystile.stores import store_from_url
from keystile.stores.records import QuotaState

pytestmark = pytest.mark.anyio


async def show(url: str, key_id: str) -> Any:
    async with KeyManager(store_from_url(url)) as keys:
        return await keys.get(key_id, owner="acme")


async def rotate(url: str, key_id: str) -> tuple[str, str]:
    async with KeyManager(store_from_url(url)) as keys:
        new = await keys.rotate(key_id, owner="acme", grace=timedelta(hours=1))
        return new.key, new.id


# -- exempt paths ---------------------------------------------------------------------------


async def test_exempt_path_never_spends_the_quota_or_the_rate(database_url: str) -> None:
    """A key sent to an exempt path is seen there, but spends neither quota nor rate."""
    key, key_id = await mint(database_url, quota=2, rate_limit="2/minute")
    app = limited_app(store_from_url(database_url), exempt_paths=["/public"])
    async with client(app) as http:
        for _ in range(5):
            r = await http.get("/public", headers={"X-API-Key": key})
            assert r.status_code == 200 and r.json()["key_id"] == key_id
        assert await statuses(http, key, 3) == [200, 200, 429]
    await app.aclose()
    assert (await show(database_url, key_id)).quota_remaining == 0


async def test_exempt_path_still_checks_the_ip_allowlist(sqlite_database_url: str) -> None:
    """Outside its allowlist a key is dropped on an exempt path: the route sees nobody."""
    key, _ = await mint(sqlite_database_url, quota=5, ip_allowlist=["10.0.0.0/8"])
    app = limited_app(store_from_url(sqlite_database_url), exempt_paths=["/public"])
    async with client(app) as http:
        r = await http.get("/public", headers={"X-API-Key": key})
    assert r.status_code == 200 and r.json()["authenticated"] is False
    await app.aclose()


# -- one budget through rotation --------------------------------------------------------------


async def test_rotation_chain_spends_one_quota(database_url: str) -> None:
    """quota=5 through four rotations, old keys in grace: 5 uses in all, not 25."""
    key, key_id = await mint(database_url, quota=5)
    keys = [key]
    for _ in range(4):
        key, key_id = await rotate(database_url, key_id)
        keys.append(key)
    app = limited_app(store_from_url(database_url))
    passed = 0
    async with client(app) as http:
        for k in keys:
            passed += (await statuses(http, k, 3)).count(200)
    await app.aclose()
    assert passed == 5
    assert (await show(database_url, key_id)).quota_remaining == 0


async def test_rotation_after_uses_keeps_what_is_left_for_both_keys(database_url: str) -> None:
    """quota=5, 3 used, then rotated: the old key in grace and the new share the last 2."""
    key, key_id = await mint(database_url, quota=5)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        assert await statuses(http, key, 3) == [200] * 3
        await app.recorder.flush()
        new_key, new_id = await rotate(database_url, key_id)
        codes = await statuses(http, key, 2) + await statuses(http, new_key, 2)
    await app.aclose()
    assert codes.count(200) == 2
    assert (await show(database_url, new_id)).quota_remaining == 0


async def test_rotation_chain_shares_one_rate_limit(database_url: str) -> None:
    """3/minute: the old key's three leave the successor nothing until the limit allows."""
    key, key_id = await mint(database_url, rate_limit="3/minute")
    new_key, _ = await rotate(database_url, key_id)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        assert await statuses(http, key, 3) == [200] * 3
        assert await statuses(http, new_key, 2) == [429, 429]
    await app.aclose()


# -- exact quotas -----------------------------------------------------------------------------


async def test_quota_up_to_2_53_minus_1_and_no_further(database_url: str) -> None:
    """The largest quota every store, Redis and JSON keep exactly; one more is refused."""
    assert MAX_QUOTA == 2**53 - 1
    key, key_id = await mint(database_url, quota=MAX_QUOTA)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        assert await statuses(http, key, 3) == [200] * 3
    await app.aclose()
    assert (await show(database_url, key_id)).quota_remaining == MAX_QUOTA - 3
    async with KeyManager(store_from_url(database_url)) as keys:
        for bad in (MAX_QUOTA + 1, 10**17, -1, 1.5, "10", True):
            with pytest.raises(KeyManagementError, match="quota"):
                await keys.create(owner="acme", name=f"big-{uuid.uuid4().hex[:6]}", quota=bad)
            with pytest.raises(KeyManagementError, match="quota"):
                await keys.update(key_id, owner="acme", quota=bad)
    assert (await show(database_url, key_id)).quota == MAX_QUOTA


# -- a replayed flush ------------------------------------------------------------------------


class LostAcknowledgement:
    """A store whose quota write commits and then fails, as a lost acknowledgement would."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.lose_next = True

    async def touch_many(self, *args: Any, **named: Any) -> dict[str, QuotaState]:
        states = await self.inner.touch_many(*args, **named)
        uses = args[1] if len(args) > 1 else named.get("uses")
        if uses and self.lose_next:
            self.lose_next = False
            raise StoreError("connection lost before the commit was acknowledged")
        return states

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_replayed_quota_batch_is_taken_once(store: KeyStore) -> None:
    """The same batch id twice takes its uses once; another id takes them again."""
    async with KeyManager(store) as keys:
        created = await keys.create(owner="acme", name="q", quota=100)
    now = datetime.now().astimezone()
    first = await store.touch_many({created.id: now}, {created.id: 11}, batch="b-1")
    again = await store.touch_many({created.id: now}, {created.id: 11}, batch="b-1")
    assert first[created.id].remaining == again[created.id].remaining == 89
    other = await store.touch_many({created.id: now}, {created.id: 1}, batch="b-2")
    assert other[created.id].remaining == 88
    assert (await store.get(created.id)).quota_remaining == 88  # type: ignore[union-attr]


async def test_a_lost_flush_acknowledgement_never_takes_the_uses_twice(database_url: str) -> None:
    """11 uses of 100, the first flush's acknowledgement lost, then retried: 89 left."""
    key, key_id = await mint(database_url, quota=100)
    app = limited_app(store_from_url(database_url))
    lossy = LostAcknowledgement(app.recorder.store)
    app.recorder.store = lossy  # type: ignore[assignment]
    async with client(app) as http:
        assert await statuses(http, key, 11) == [200] * 11
        with pytest.raises(StoreError):
            await app.recorder.flush()
        assert app.recorder.unwritten_uses(key_id) == 11
        await app.recorder.flush()
        assert app.recorder.unwritten_uses(key_id) == 0
        assert await statuses(http, key, 1) == [200]
    await app.aclose()
    assert (await show(database_url, key_id)).quota_remaining == 88


# -- named limits ----------------------------------------------------------------------------


async def test_named_limits_all_need_room_and_the_429_names_the_refusing_one(
    database_url: str,
) -> None:
    """default 10/minute, burst 2/second, hour 3/hour: the third request is refused by
    burst, named in the body and the fields; the refused request spends no limit."""
    key, key_id = await mint(
        database_url, rate_limit="10/minute", rate_limits={"burst": "2/second", "hour": "3/hour"}
    )
    app = limited_app(store_from_url(database_url), rate_limit_headers=True)
    async with client(app) as http:
        first = await http.get("/whoami", headers={"X-API-Key": key})
        assert await statuses(http, key, 1) == [200]
        refused = await http.get("/whoami", headers={"X-API-Key": key})
    assert first.status_code == 200 and refused.status_code == 429
    policies = '"default";q=10;w=60, "burst";q=2;w=1, "hour";q=3;w=3600'
    assert first.headers["ratelimit-policy"] == policies
    assert first.headers["ratelimit"].startswith('"default";r=9;t=6, "burst";r=1;t=1, "hour";r=2;')
    body = refused.json()
    assert (body["error"], body["policy"], body["limit"]) == ("rate_limited", "burst", "2/second")
    assert refused.headers["ratelimit-policy"] == policies
    seconds = refused.headers["retry-after"]
    assert refused.headers["ratelimit"].split(", ")[1] == f'"burst";r=0;t={seconds}'
    hour_left, _ = app.limits.local.state(f"{key_id}#hour", parse_rate_limit("3/hour"))
    assert hour_left == 1  # spent by the two that passed, not by the refused one
    await app.aclose()


async def test_named_limits_are_stored_updated_and_reach_a_running_middleware(
    database_url: str,
) -> None:
    """``rate_limits`` replaces the named limits; a ``default`` among them is rate_limit."""
    key, key_id = await mint(database_url, rate_limits={"burst": "1/minute"})
    assert (await show(database_url, key_id)).rate_limits == {"burst": "1/minute"}
    app = limited_app(store_from_url(database_url))
    async with client(app) as http, KeyManager(store_from_url(database_url)) as keys:
        assert await statuses(http, key, 2) == [200, 429]
        updated = await keys.update(
            key_id, owner="acme", rate_limits={"default": "3/minute", "b": "5/hour"}
        )
        assert (updated.rate_limit, updated.rate_limits) == ("3/minute", {"b": "5/hour"})
        assert await statuses(http, key, 4) == [200, 200, 200, 429]
        await keys.update(key_id, owner="acme", rate_limit=None, rate_limits=None)
        assert await statuses(http, key, 5) == [200] * 5
    await app.aclose()


async def test_malformed_named_limits_are_one_clear_error(database_url: str) -> None:
    """Bad names, bad rates, a default given twice: KeyManagementError, nothing stored."""
    async with KeyManager(store_from_url(database_url)) as keys:
        for bad in (
            {"Burst": "1/s"},
            {"": "1/s"},
            {"burst": "0/s"},
            {"burst": 5},
            {f"n{i}": "1/s" for i in range(17)},
            ["burst"],
        ):
            with pytest.raises(KeyManagementError, match="rate_limits"):
                await keys.create(owner="acme", name="bad", rate_limits=bad)  # type: ignore[arg-type]
        with pytest.raises(KeyManagementError, match="default"):
            await keys.create(
                owner="acme", name="bad", rate_limit="1/s", rate_limits={"default": "2/s"}
            )
        assert await keys.list("acme") == []
