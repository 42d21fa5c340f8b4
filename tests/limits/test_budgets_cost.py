"""A request's weight: ``cost=`` spent against every limit before the app runs,
``keystile.charge`` spending quota after it, and ``protect()`` saying what an operation
costs (memory, SQLite and Postgres stores; Redis where it applies)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_budgets import show
from test_limits import mint

from apps import client
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    ConfigurationError,
    KeyManager,
    charge,
)
from keystile.fastapi import protect
from keystile.limits import MAX_QUOTA
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio

CHARGED: list[Any] = []


async def charged(request: Request) -> JSONResponse:
    n = int(request.query_params.get("n", "5"))
    CHARGED.append(charge(request, n))
    return JSONResponse({"ok": True})


async def weighed(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def charging_app(url: str, **options: Any) -> APIKeyMiddleware:
    inner = Starlette(
        routes=[
            Route("/charge", charged),
            Route("/render", weighed, methods=["GET", "POST"]),
            Route("/export/{name}", weighed),
            Route("/plain", weighed),
        ]
    )
    return APIKeyMiddleware(inner, store=store_from_url(url), argon2=CHEAPEST_PARAMETERS, **options)


async def codes(http: Any, key: str, path: str, n: int, method: str = "GET") -> list[int]:
    headers = {"X-API-Key": key}
    return [(await http.request(method, path, headers=headers)).status_code for _ in range(n)]


async def test_cost_is_spent_against_quota_and_rate_before_the_app(database_url: str) -> None:
    """quota 30 and 50/minute: /render costs 10 (3 pass), POST /render 20, a prefix 3,
    anything else 1; a refused request spends nothing."""
    key, key_id = await mint(database_url, quota=30, rate_limit="50/minute")
    app = charging_app(database_url, cost={"/render": 10, "POST /render": 20, "/export/*": 3})
    async with client(app) as http:
        assert await codes(http, key, "/render", 1, "POST") == [200]  # 20: 10 left
        assert await codes(http, key, "/export/a", 2) == [200, 200]  # 6: 4 left
        assert await codes(http, key, "/render", 1) == [429]  # 10 > 4: nothing spent
        assert await codes(http, key, "/plain", 4) == [200] * 4
        assert await codes(http, key, "/plain", 1) == [429]
    await app.aclose()
    assert (await show(database_url, key_id)).quota_remaining == 0


async def test_cost_against_a_rate_limit(sqlite_database_url: str) -> None:
    """5/minute and a cost of 2: two requests pass, the third waits (12 s a use)."""
    key, _ = await mint(sqlite_database_url, rate_limit="5/minute")
    app = charging_app(sqlite_database_url, cost={"/render": 2})
    async with client(app) as http:
        assert await codes(http, key, "/render", 2) == [200, 200]
        refused = await http.get("/render", headers={"X-API-Key": key})
        assert await codes(http, key, "/plain", 1) == [200]
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 12
    await app.aclose()


async def test_cost_callable_and_its_failures(
    sqlite_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A callable weighs each request; one that fails or answers nonsense gives that
    request a 503 and spends nothing."""
    key, _ = await mint(sqlite_database_url, quota=10)

    def weigh(scope: dict[str, Any]) -> int:
        answer = dict(scope["headers"]).get(b"x-weight", b"1").decode()
        return int(answer) if answer.lstrip("-").isdigit() else answer  # type: ignore[return-value]

    app = charging_app(sqlite_database_url, cost=weigh)
    async with client(app) as http:
        ok = await http.get("/plain", headers={"X-API-Key": key, "X-Weight": "4"})
        with caplog.at_level(logging.ERROR, logger="keystile.limits"):
            bad = [
                (await http.get("/plain", headers={"X-API-Key": key, "X-Weight": w})).status_code
                for w in ("0", "-3", "abc", str(MAX_QUOTA + 1))
            ]
        assert await codes(http, key, "/plain", 7) == [200] * 6 + [429]
    assert ok.status_code == 200 and bad == [503] * 4
    assert key not in caplog.text and len(caplog.records) == 4
    await app.aclose()


@pytest.mark.parametrize(
    "cost",
    [
        {"/x": 0},
        {"/x": -1},
        {"/x": 1.5},
        {"/x": True},
        {"/x": MAX_QUOTA + 1},
        {"x": 1},
        {"FETCH /x": 1},
        {3: 1},
        5,
        "/x",
    ],
)
def test_malformed_cost_is_refused_when_the_middleware_is_built(cost: Any) -> None:
    with pytest.raises(ConfigurationError, match="cost"):
        charging_app("memory://", cost=cost)


async def test_charge_spends_quota_after_the_fact(database_url: str) -> None:
    """quota 10, each request charged 5 more: 1+5, 1+5 (only 4 were left), then 429; the
    store follows with the flush."""
    key, key_id = await mint(database_url, quota=10, rate_limit="100/minute")
    app = charging_app(database_url)
    CHARGED.clear()
    async with client(app) as http:
        assert await codes(http, key, "/charge", 3) == [200, 200, 429]
    assert CHARGED == [True, True]
    await app.aclose()
    assert (await show(database_url, key_id)).quota_remaining == 0


async def test_a_malformed_charge_spends_nothing_and_is_no_500(
    sqlite_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key, key_id = await mint(sqlite_database_url, quota=10)
    free, _ = await mint(sqlite_database_url)
    app = charging_app(sqlite_database_url)
    CHARGED.clear()
    async with client(app) as http:
        with caplog.at_level(logging.ERROR, logger="keystile.limits"):
            for n in ("-1", str(MAX_QUOTA + 1)):
                assert await codes(http, key, f"/charge?n={n}", 1) == [200]
        assert await codes(http, key, "/charge?n=0", 1) == [200]
        assert await codes(http, free, "/charge?n=3", 1) == [200]
    assert CHARGED == [False, False, False, False]
    assert len(caplog.records) == 2
    await app.aclose()
    assert (await show(sqlite_database_url, key_id)).quota_remaining == 7  # 3 requests
    assert charge({"type": "http"}, 1) is False
    assert charge({"type": "http"}, True) is False  # type: ignore[arg-type]


async def test_charge_through_redis_reaches_the_other_runtime(
    redis_url: str,
    sqlite_database_url: str,
) -> None:
    """The owner's quota of 9 on one Redis: a charge of 5 in one runtime is taken from
    the shared counter with its next decision, and the other runtime sees what is left."""
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        await keys.set_owner_limits("acme", quota=9)
    key, _ = await mint(sqlite_database_url)
    first, second = (
        charging_app(sqlite_database_url, rate_limit_storage=redis_url) for _ in range(2)
    )
    assert first.runtime is not second.runtime
    async with client(first) as a, client(second) as b:
        assert await codes(a, key, "/charge?n=5", 1) == [200]  # 1 used, 5 charged
        assert await codes(a, key, "/plain", 1) == [200]  # the 5 taken first: 2 left
        assert await codes(b, key, "/plain", 3) == [200, 200, 429]
    await first.aclose()
    await second.aclose()
    async with KeyManager(store_from_url(sqlite_database_url)) as keys:
        limits = await keys.owner_limits("acme")
    assert limits is not None and limits.quota_remaining == 0


async def test_protect_documents_the_cost_of_each_operation() -> None:
    app = FastAPI()

    @app.post("/render", description="Render a page.")
    async def render() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    protect(app, store=store_from_url("memory://"), cost={"POST /render": 10})
    paths = app.openapi()["paths"]
    assert paths["/render"]["post"]["description"] == (
        "Render a page.\n\nEach request spends 10 uses of the key's limits and quota."
    )
    assert "spends" not in paths["/plain"]["get"].get("description", "")
