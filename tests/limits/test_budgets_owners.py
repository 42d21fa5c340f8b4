"""Limits per owner: shared by every key of the owner, on top of each key's own; set,
read and cleared through KeyManager; reaching running middlewares as a revoke does; and
usage summed per owner (memory, SQLite and Postgres stores, real ASGI requests)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_limits import limited_app, mint, statuses

from apps import client
from keystile import KeyManagementError, KeyManager
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio


async def set_limits(url: str, **limits: object) -> None:
    async with KeyManager(store_from_url(url)) as keys:
        await keys.set_owner_limits("acme", **limits)  # type: ignore[arg-type]


async def test_owner_quota_is_shared_by_every_key_of_the_owner(database_url: str) -> None:
    """quota=5 on the owner, two keys of their own without limits: 5 requests in all."""
    await set_limits(database_url, quota=5)
    first, _ = await mint(database_url)
    second, _ = await mint(database_url)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        codes = await statuses(http, first, 3) + await statuses(http, second, 3)
        refused = await http.get("/whoami", headers={"X-API-Key": first})
    assert codes == [200] * 5 + [429]
    assert refused.json()["error"] == "quota_exceeded"
    assert refused.json()["policy"] == "owner.quota"
    await app.aclose()
    async with KeyManager(store_from_url(database_url)) as keys:
        limits = await keys.owner_limits("acme")
    assert limits is not None and (limits.quota, limits.quota_remaining) == (5, 0)


async def test_owner_and_key_limits_all_need_room_and_none_is_spent_by_a_refusal(
    database_url: str,
) -> None:
    """The owner's burst 3/minute across two keys, each key with its own 2/minute: the
    refusals name the limit that refused, and a refused request spends no other limit."""
    await set_limits(database_url, rate_limits={"burst": "3/minute"})
    first, _ = await mint(database_url, rate_limit="2/minute")
    second, _ = await mint(database_url, rate_limit="2/minute")
    app = limited_app(store_from_url(database_url), rate_limit_headers=True)
    async with client(app) as http:
        ok = await http.get("/whoami", headers={"X-API-Key": first})
        assert await statuses(http, first, 1) == [200]
        own = await http.get("/whoami", headers={"X-API-Key": first})
        assert await statuses(http, second, 1) == [200]
        owners = await http.get("/whoami", headers={"X-API-Key": second})
    assert ok.headers["ratelimit-policy"] == '"default";q=2;w=60, "owner.burst";q=3;w=60'
    assert (own.status_code, own.json()["policy"]) == (429, "default")
    assert (owners.status_code, owners.json()["policy"]) == (429, "owner.burst")
    await app.aclose()


async def test_owner_limits_reach_a_running_middleware_and_new_keys(database_url: str) -> None:
    """Set after the keys were cached, changed, then cleared: the next request runs under
    what is set now; a key created later carries the owner's limits too."""
    key, _ = await mint(database_url)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http, KeyManager(store_from_url(database_url)) as keys:
        assert await statuses(http, key, 3) == [200] * 3
        await keys.set_owner_limits("acme", rate_limits={"default": "2/minute"})
        assert await statuses(http, key, 3) == [200, 200, 429]
        later = (await keys.create(owner="acme", name="later")).key
        assert await statuses(http, later, 1) == [429]  # the owner's budget is spent
        assert (await keys.get((await keys.list("acme"))[-1].id, owner="acme")).owner_limits
        await keys.set_owner_limits("acme", quota=1)
        assert await statuses(http, later, 2) == [200, 429]
        assert await keys.clear_owner_limits("acme") is True
        assert await keys.clear_owner_limits("acme") is False
        assert await statuses(http, later, 3) == [200] * 3
        assert await keys.owner_limits("acme") is None
        kinds = [e.action for e in await keys.events(owner="acme")]
    assert kinds.count("owner_limits") == 3
    await app.aclose()


async def test_malformed_owner_limits_are_one_clear_error(database_url: str) -> None:
    async with KeyManager(store_from_url(database_url)) as keys:
        for bad in (
            {"quota": 2**53},
            {"quota": -1},
            {"quota": "5"},
            {"rate_limits": {"Burst": "1/s"}},
            {"rate_limits": {"burst": "1/fortnight"}},
            {"quota_refill": "1d"},
            {},
        ):
            with pytest.raises(KeyManagementError):
                await keys.set_owner_limits("acme", **bad)  # type: ignore[arg-type]
        with pytest.raises(KeyManagementError):
            await keys.set_owner_limits(" acme", quota=1)
        assert await keys.owner_limits("acme") is None
        assert await keys.events(owner="acme") == []


async def test_usage_per_owner_sums_every_key(database_url: str) -> None:
    """usage(owner=...) without a key: the owner's requests over all its keys."""
    first, first_id = await mint(database_url)
    second, _ = await mint(database_url)
    app = limited_app(store_from_url(database_url))
    async with client(app) as http:
        await statuses(http, first, 2)
        await statuses(http, second, 3)
    await app.aclose()
    async with KeyManager(store_from_url(database_url)) as keys:
        total = await keys.usage(owner="acme", since=timedelta(hours=1), by="hour")
        one = await keys.usage(first_id, owner="acme", since=timedelta(hours=1), by="hour")
        other = await keys.usage(owner="globex", since=timedelta(hours=1), by="hour")
    assert sum(b.requests for b in total) == 5
    assert sum(b.requests for b in one) == 2
    assert other == []


async def test_a_successor_takes_its_owners_limits(database_url: str) -> None:
    """A key rotated after its owner got limits: the successor carries them too."""
    _, key_id = await mint(database_url)
    await set_limits(database_url, quota=7)
    async with KeyManager(store_from_url(database_url)) as keys:
        new = await keys.rotate(key_id, owner="acme", grace=timedelta(minutes=5))
        successor = await keys.get(new.id, owner="acme")
    assert successor.owner_limits is not None and successor.owner_limits.quota == 7
