"""Verifying a key outside a request: ``keystile.verify`` and ``KeystileRuntime.verify``,
and the two examples built on them (a WebSocket subprotocol token, a task-queue worker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import keystile
from apps import client, installed_middleware, load_example
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, CreatedKey, KeyManager
from keystile.errors import InvalidToken, IPNotAllowed, RateLimited
from keystile.verification import aclose

pytestmark = pytest.mark.anyio

OPTIONS: dict[str, Any] = {"argon2": CHEAPEST_PARAMETERS}


@pytest.fixture
async def manager(database_url: str) -> AsyncIterator[KeyManager]:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as manager:
        yield manager
    await aclose()


async def test_verify_returns_the_key(manager: KeyManager, database_url: str) -> None:
    """A valid key: its APIKeyUser, with owner, name and scopes."""
    created = await manager.create(owner="acme", name="job", scopes=["reports:write"])
    user = await keystile.verify(created.key, database_url=database_url, **OPTIONS)
    assert (user.key_id, user.owner, user.name) == (created.id, "acme", "job")
    assert user.scopes == ("reports:write",)


async def test_verify_refuses_as_the_middleware(manager: KeyManager, database_url: str) -> None:
    """A wrong secret, garbage and a revoked key raise InvalidToken with the reason."""
    created = await manager.create(owner="acme", name="job")
    wrong = created.key[:-8] + ("A" if created.key[-8] != "A" else "B") + created.key[-7:]
    for token, reasons in (
        (wrong, {"bad_checksum", "wrong_secret"}),
        ("not a key", {"malformed"}),
        ("ks_é", {"malformed"}),
    ):
        with pytest.raises(InvalidToken) as refused:
            await keystile.verify(token, database_url=database_url, **OPTIONS)
        assert refused.value.reason in reasons
    await keystile.verify(created.key, database_url=database_url, **OPTIONS)
    await manager.revoke(created.id, owner="acme")
    with pytest.raises(InvalidToken) as refused:
        await keystile.verify(created.key, database_url=database_url, **OPTIONS)
    assert refused.value.reason == "revoked"


async def test_verify_runs_argon2_once(manager: KeyManager, database_url: str) -> None:
    """Three verifications of one key: one argon2 verification, two cache hits."""
    created = await manager.create(owner="acme", name="job")
    config = keystile.KeystileConfig.from_options(database_url=database_url, **OPTIONS)
    for _ in range(3):
        await keystile.verify(created.key, config=config)
    stats = keystile.verification.runtime_for(config).stats()
    assert stats.argon2_verifications == 1
    assert stats.cache_hits == 2


async def test_verify_spends_the_limits(manager: KeyManager, database_url: str) -> None:
    """A key with a rate limit of one a minute: the second verification is 429."""
    created = await manager.create(owner="acme", name="job", rate_limit="1/minute")
    await keystile.verify(created.key, database_url=database_url, **OPTIONS)
    with pytest.raises(RateLimited):
        await keystile.verify(created.key, database_url=database_url, **OPTIONS)


async def test_a_refusal_from_verify_reaches_the_refusal_listener(
    manager: KeyManager, database_url: str
) -> None:
    """The enforcer's refusal listener (what sends ``rate_limit.exceeded`` webhooks) hears
    of a 429 from ``verify`` as it does of the middleware's."""
    created = await manager.create(owner="acme", name="job", rate_limit="1/minute")
    config = keystile.KeystileConfig.from_options(database_url=database_url, **OPTIONS)
    runtime = keystile.verification.runtime_for(config)
    heard: list[tuple[str, str]] = []
    runtime.limits_for(config).on_refusal = lambda user, exc: heard.append(
        (user.key_id, type(exc).__name__)
    )
    await keystile.verify(created.key, config=config)
    with pytest.raises(RateLimited):
        await keystile.verify(created.key, config=config)
    assert heard == [(created.id, "RateLimited")]


async def test_verify_checks_the_allowlist(manager: KeyManager, database_url: str) -> None:
    """A key with an IP allowlist: refused without a client or from outside, let in from it."""
    created = await manager.create(owner="acme", name="job", ip_allowlist=["10.0.0.0/8"])
    for client_address in (None, ("192.0.2.1", 1)):
        with pytest.raises(IPNotAllowed):
            await keystile.verify(
                created.key, client=client_address, database_url=database_url, **OPTIONS
            )
    user = await keystile.verify(
        created.key, client=("10.1.2.3", 4), database_url=database_url, **OPTIONS
    )
    assert user.key_id == created.id


async def test_verify_counts_the_use(manager: KeyManager, database_url: str) -> None:
    """The use reaches last_used_at and the usage counts once the runtime is closed."""
    created = await manager.create(owner="acme", name="job")
    await keystile.verify(created.key, database_url=database_url, **OPTIONS)
    await aclose()
    record = await manager.get(created.id, owner="acme")
    assert record.last_used_at is not None
    usage = await manager.usage(created.id, owner="acme", since=record.created_at)
    assert sum(bucket.requests for bucket in usage) == 1


async def test_middleware_and_verify_share_the_cache(
    manager: KeyManager, database_url: str
) -> None:
    """A key proven by a request is a cache hit for runtime.verify: argon2 ran once."""
    created = await manager.create(owner="acme", name="both")
    example = load_example("starlette_app")
    app = example.create_app(database_url, **OPTIONS)
    async with client(app) as c:
        assert (await c.get("/whoami", headers={"X-API-Key": created.key})).status_code == 200
        middleware: APIKeyMiddleware = installed_middleware(app)
        user = await middleware.runtime.verify(created.key)
        assert user.key_id == created.id
        assert middleware.stats().argon2_verifications == 1
        await middleware.aclose()


# -- the examples -----------------------------------------------------------------------


def _chat(database_url: str, created: CreatedKey) -> None:
    """The WebSocket scenario, under TestClient (its own event loop, in this thread)."""
    example = load_example("websocket_subprotocol")
    app = example.create_app(database_url, **OPTIONS)
    with TestClient(app) as tc:
        with tc.websocket_connect("/chat", subprotocols=["chat.v1", f"key.{created.key}"]) as ws:
            assert ws.accepted_subprotocol == "chat.v1"
            ws.send_text("hi")
            assert ws.receive_json() == {"from": "apikey:socket", "echo": "hi"}

            async def revoke() -> None:
                async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as m:
                    await m.revoke(created.id, owner="acme")

            assert tc.portal is not None
            tc.portal.call(revoke)
            installed_middleware(app).evict(created.id)
            ws.send_text("again")
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
        for protocols in (["chat.v1"], ["chat.v1", "key.ks_nonsense"]):
            with (
                pytest.raises(WebSocketDisconnect) as refused,
                tc.websocket_connect("/chat", subprotocols=protocols),
            ):
                pass
            assert refused.value.code == 1008


async def test_websocket_subprotocol_example(manager: KeyManager, database_url: str) -> None:
    """The key as a subprotocol: accepted with the app's protocol only, echoed messages;
    no key or a wrong one: closed with 1008; revoked meanwhile: closed at the next message."""
    created = await manager.create(owner="acme", name="socket")
    await anyio.to_thread.run_sync(_chat, database_url, created)


async def test_task_worker_example(manager: KeyManager, database_url: str) -> None:
    """The worker does a job with a key holding the scope; refuses a scopeless key or garbage."""
    good = await manager.create(owner="acme", name="writer", scopes=["reports:write"])
    reader = await manager.create(owner="acme", name="reader", scopes=["reports:read"])
    example = load_example("task_worker")
    done, scopeless, garbage = [
        await example.handle(example.Job(key, {"n": 1}), database_url, **OPTIONS)
        for key in (good.key, reader.key, "ks_garbage")
    ]
    assert done == {"done": True, "owner": "acme", "by": "apikey:writer", "n": 1}
    assert scopeless == {"done": False, "refused": "insufficient_scope"}
    assert garbage == {"done": False, "refused": "malformed"}
