"""KeystileRuntime: one store, cache and set of background tasks per configuration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from apps import client, inner_app
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, MemoryKeyStore
from keystile.stores.bus import LocalChangeBus

pytestmark = pytest.mark.anyio


def build(url: str, **options: object) -> APIKeyMiddleware:
    return APIKeyMiddleware(inner_app(), database_url=url, argon2=CHEAPEST_PARAMETERS, **options)  # type: ignore[arg-type]


async def test_same_configuration_shares_one_runtime(tmp_path: Path) -> None:
    """Middlewares built per route from one configuration share the cache: argon2 runs once."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
        created = await manager.create(owner="acme", name="ci")
    routes = [build(url, exempt_paths=[f"/other-{i}"]) for i in range(5)]
    try:
        assert len({id(r.runtime) for r in routes}) == 1
        for route in routes:
            async with client(route) as c:
                r = await c.get("/whoami", headers={"X-API-Key": created.key})
            assert r.status_code == 200
        stats = routes[0].stats()
        assert stats.argon2_verifications == 1
        assert stats.cache_hits == 4
    finally:
        await routes[0].aclose()


async def test_different_configuration_gets_its_own_runtime(tmp_path: Path) -> None:
    """Another cache setting, database or store object means another runtime."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    first, ttl, other_db = build(url), build(url, cache_ttl=5), build(f"{url}.2")
    store = MemoryKeyStore()
    a = APIKeyMiddleware(inner_app(), store=store)
    b = APIKeyMiddleware(inner_app(), store=MemoryKeyStore())
    runtimes = {id(m.runtime) for m in (first, ttl, other_db, a, b)}
    assert len(runtimes) == 5
    assert APIKeyMiddleware(inner_app(), store=store).runtime is a.runtime


def test_revocation_reaches_a_listener_whose_loop_stopped() -> None:
    """A subscriber whose event loop no longer runs is told of a change at once, not through
    a queue that loop will never drain."""
    bus = LocalChangeBus()
    heard: list[str | None] = []

    async def subscribe() -> None:
        bus.subscribe(heard.append)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(subscribe())  # the loop stops here but is never closed

    async def publish() -> None:
        bus.publish("AbC123def456")

    asyncio.run(publish())
    loop.close()
    assert heard == ["AbC123def456"]
