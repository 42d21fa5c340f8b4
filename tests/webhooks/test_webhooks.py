"""Webhooks on every store: added with a secret shown once, queued in the transaction of
their audit event (never for a change that rolled back), sent signed to a real receiver
under uvicorn that verifies them with ``standardwebhooks``, retried with backoff until
the receiver is up, dead-lettered after the last try, never sent inside the network
unless allowed."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, KeyStore
from keystile.errors import DuplicateKeyName, KeyManagementError
from keystile.webhooks import WebhookDelivery, next_attempt_at
from loopback import reserved_port, serving
from webhook_receiver import Receiver

pytestmark = pytest.mark.anyio

FAST = (timedelta(milliseconds=50),) * 3


def manager(store: KeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS, actor="tests")


def sender(**options: Any) -> WebhookDelivery:
    return WebhookDelivery(
        allow_private_networks=True, interval=0.02, **{"schedule": FAST, **options}
    )


async def hook(store: KeyStore, url: str, receiver: Receiver, **options: Any) -> str:
    created = await manager(store).add_webhook(url, allow_private_networks=True, **options)
    receiver.secret = created.secret
    return created.id


async def deliver_all(store: KeyStore, delivery: WebhookDelivery | None = None) -> None:
    delivery = delivery or sender()
    while await delivery.deliver_due(store):
        pass


async def test_a_key_change_reaches_the_receiver_signed(store: KeyStore) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        await hook(store, base + "/hook", receiver)
        created = await manager(store).create(owner="acme", name="ci")
        await manager(store).revoke(created.id, owner="acme")
        await deliver_all(store)
        received = {event["type"]: event for event in await receiver.wait_for(2)}
    assert receiver.refused == 0
    # One batch is sent concurrently: deliveries may arrive in any order.
    assert sorted(received) == ["key.created", "key.revoked"]
    made, revoked = received["key.created"], received["key.revoked"]
    assert made["data"]["key_id"] == created.id
    assert made["data"]["owner"] == "acme" and made["data"]["name"] == "ci"
    assert revoked["data"]["actor"] == "tests"
    text = json.dumps(receiver.received)
    assert created.key not in text and created.record.secret_hash not in text
    assert created.key.split("_")[2][:20] not in text
    assert {d.status for d in await store.list_deliveries()} == {"delivered"}
    assert [a.outcome for a in await store.list_attempts()] == ["delivered", "delivered"]


async def test_the_secret_is_shown_once_and_urls_are_checked(store: KeyStore) -> None:
    keys = manager(store)
    created = await keys.add_webhook("https://hooks.example.com/keystile")
    assert created.secret.startswith("whsec_")
    [listed] = await keys.list_webhooks()
    assert created.secret not in json.dumps(listed.to_public_dict())
    assert created.secret not in repr(listed) and created.secret not in repr(created)
    for url in (
        "ftp://hooks.example.com/x",
        "http://hooks.example.com/x",
        "https://10.0.0.8/x",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "http://127.0.0.1:9/x",
        "https://user:pw@hooks.example.com/x",
        "not a url",
    ):
        with pytest.raises(KeyManagementError):
            await keys.add_webhook(url)
    with pytest.raises(KeyManagementError):
        await keys.add_webhook("https://hooks.example.com/x", events=["key.exploded"])
    assert len(await keys.list_webhooks()) == 1


async def test_a_change_that_rolled_back_queues_nothing(store: KeyStore) -> None:
    keys = manager(store)
    await keys.add_webhook("https://hooks.example.com/x")
    await keys.create(owner="acme", name="ci")
    with pytest.raises(DuplicateKeyName):
        await keys.create(owner="acme", name="ci")
    assert [d.type for d in await store.list_deliveries()] == ["key.created"]


async def test_a_webhook_gets_only_the_events_it_asked_for(store: KeyStore) -> None:
    keys = manager(store)
    only = await keys.add_webhook("https://a.example.com/x", events=["key.revoked"])
    every = await keys.add_webhook("https://b.example.com/x")
    created = await keys.create(owner="acme", name="ci")
    await keys.disable(created.id, owner="acme")
    await keys.revoke(created.id, owner="acme")
    assert [d.type for d in await keys.deliveries(webhook_id=only.id)] == ["key.revoked"]
    assert [d.type for d in await keys.deliveries(webhook_id=every.id)] == [
        "key.created",
        "key.disabled",
        "key.revoked",
    ]


async def one_change(store: KeyStore, url: str, receiver: Receiver) -> WebhookDelivery:
    """A webhook to ``url``, one created key, and one failed pass at sending it."""
    await hook(store, url, receiver)
    await manager(store).create(owner="acme", name="ci")
    delivery = sender(schedule=(timedelta(milliseconds=200),) * 5)
    await delivery.deliver_due(store)
    return delivery


async def delivered(store: KeyStore, receiver: Receiver, delivery: WebhookDelivery) -> Any:
    """The first message, once the delivery duty has sent it and recorded it sent."""
    async with anyio_task(delivery.run, store):
        [message] = await receiver.wait_for(1)
        await statuses_become(store, ["delivered"])
    return message


async def test_a_receiver_down_at_first_gets_the_delivery_once_it_is_up(store: KeyStore) -> None:
    receiver = Receiver()
    receiver.status = 503
    async with serving(receiver.app()) as base:
        delivery = await one_change(store, base + "/hook", receiver)
        [waiting] = await store.list_deliveries()
        assert (waiting.status, waiting.attempts, waiting.last_error) == ("pending", 1, "HTTP 503")
        receiver.status = 204
        message = await delivered(store, receiver, delivery)
    assert message["type"] == "key.created"
    outcomes = [a.outcome for a in await store.list_attempts()]
    assert outcomes[0] == "retry" and outcomes[-1] == "delivered"


async def test_a_receiver_not_listening_at_first_gets_the_delivery_once_it_listens(
    store: KeyStore,
) -> None:
    sock = reserved_port()
    receiver = Receiver()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    delivery = await one_change(store, url, receiver)
    [attempt] = await store.list_attempts()
    assert attempt.status_code is None and "Connect" in (attempt.error or "")
    async with serving(receiver.app(), sock=sock):
        message = await delivered(store, receiver, delivery)
    assert message["type"] == "key.created"


async def test_after_the_last_try_a_delivery_is_dead_lettered(store: KeyStore) -> None:
    receiver = Receiver()
    receiver.status = 500
    async with serving(receiver.app()) as base:
        await hook(store, base + "/hook", receiver)
        await manager(store).create(owner="acme", name="ci")
        delivery = sender(schedule=(timedelta(0),) * 2)
        await deliver_all(store, delivery)
    [dead] = await store.list_deliveries()
    assert (dead.status, dead.attempts) == ("dead", 3)
    attempts = await store.list_attempts(delivery_id=dead.id)
    assert [(a.status_code, a.outcome) for a in attempts] == [
        (500, "retry"),
        (500, "retry"),
        (500, "dead"),
    ]
    assert receiver.requests == 3


def test_retries_back_off_with_jitter_over_about_a_day() -> None:
    from datetime import datetime, timezone

    from keystile.webhooks import RETRY_SCHEDULE

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    total = sum((s for s in RETRY_SCHEDULE), timedelta())
    assert timedelta(hours=20) <= total <= timedelta(hours=28)
    waits = [next_attempt_at(1, start) - start for _ in range(200)]  # type: ignore[operator]
    assert min(waits) >= timedelta(seconds=4) and max(waits) <= timedelta(seconds=6)
    assert len(set(waits)) > 100  # jittered, not one fixed wait
    assert next_attempt_at(len(RETRY_SCHEDULE) + 1, start) is None


async def test_no_delivery_goes_inside_the_network_unless_allowed(store: KeyStore) -> None:
    """A webhook added with the allow option, sent by a process without it: refused at
    send time (the host resolves to loopback), the receiver never hears of it."""
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        await hook(store, base + "/hook", receiver)
        await manager(store).create(owner="acme", name="ci")
        await WebhookDelivery(schedule=FAST).deliver_due(store)
    [attempt] = await store.list_attempts()
    assert attempt.status_code is None and "non-public" in (attempt.error or "")
    assert receiver.requests == 0


async def test_redirects_are_not_followed(store: KeyStore) -> None:
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    receiver = Receiver()

    async def moved(request: Any) -> RedirectResponse:
        return RedirectResponse(str(request.app.state.target), status_code=307)

    redirector = Starlette(routes=[Route("/hook", moved, methods=["POST"])])
    async with serving(receiver.app()) as target, serving(redirector) as base:
        redirector.state.target = target + "/hook"
        await hook(store, base + "/hook", receiver)
        await manager(store).create(owner="acme", name="ci")
        await sender().deliver_due(store)
    [attempt] = await store.list_attempts()
    assert (attempt.status_code, attempt.outcome) == (307, "retry")
    assert receiver.requests == 0


async def test_test_webhook_and_remove(store: KeyStore) -> None:
    keys = manager(store)
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        hook_id = await hook(store, base + "/hook", receiver)
        await keys.test_webhook(hook_id)
        await deliver_all(store)
        [message] = await receiver.wait_for(1)
        assert message == {
            "type": "webhook.test",
            "timestamp": message["timestamp"],
            "data": {"webhook_id": hook_id},
        }
        await keys.create(owner="acme", name="ci")
        assert await keys.remove_webhook(hook_id) is True
        assert await keys.remove_webhook(hook_id) is False
        await deliver_all(store)
    statuses = [d.status for d in await keys.deliveries()]
    assert statuses == ["delivered", "dead"]
    assert receiver.requests == 1
    with pytest.raises(KeyManagementError):
        await keys.test_webhook(hook_id)


async def test_the_middleware_delivers_in_its_background_work(store: KeyStore) -> None:
    """``webhooks=WebhookDelivery(...)``: a running app sends what the CLI changed."""
    from apps import protect

    receiver = Receiver()
    async with serving(receiver.app()) as base:
        await hook(store, base + "/hook", receiver)
        app: APIKeyMiddleware = protect(store, webhooks=sender())
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            await client.get("/whoami")  # starts the background work
            created = await manager(store).create(owner="acme", name="ci")
            [message] = await receiver.wait_for(1)
        await app.aclose()
    assert message["data"]["key_id"] == created.id


async def statuses_become(store: KeyStore, expected: list[str], timeout: float = 30.0) -> None:
    """Wait until the deliveries' statuses are ``expected`` (a delivery is recorded just
    after its receiver answered)."""
    import anyio

    with anyio.fail_after(timeout):
        while [d.status for d in await store.list_deliveries()] != expected:
            await anyio.sleep(0.02)


class anyio_task:
    """Run ``fn(*args)`` in the background for the ``async with`` block, then cancel it."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    async def __aenter__(self) -> None:
        import anyio

        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self.fn, *self.args)

    async def __aexit__(self, *exc: Any) -> None:
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(*exc)


async def test_expiry_notices_are_sent_once_per_key(store: KeyStore) -> None:
    """``key.expiring`` within the lead, ``key.expired`` after: each once per key however
    often (and by however many processes) they are queued; a rotated key is not announced."""
    keys = manager(store)
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        await hook(store, base + "/hook", receiver, events=["key.expiring", "key.expired"])
        soon = await keys.create(owner="acme", name="soon", expires_in=timedelta(days=3))
        await keys.create(owner="acme", name="later", expires_in=timedelta(days=30))
        await keys.create(owner="acme", name="never")
        brief = await keys.create(owner="acme", name="brief", expires_in=timedelta(seconds=1))
        rotated = await keys.create(owner="acme", name="rotated", expires_in=timedelta(days=2))
        await keys.rotate(rotated.id, owner="acme", grace=timedelta(hours=1))
        delivery = sender()
        assert await delivery.queue_notices(store) == 3  # soon, brief, rotated's successor
        assert await sender().queue_notices(store) == 3  # another process: the same ids
        await deliver_all(store, delivery)
        first = await receiver.wait_for(3)
        assert sorted(m["data"]["name"] for m in first) == ["brief", "rotated", "soon"]
        assert {m["type"] for m in first} == {"key.expiring"}
        [soon_notice] = [m for m in first if m["data"]["key_id"] == soon.id]
        assert soon_notice["data"]["expires_at"] == soon.record.expires_at.isoformat()  # type: ignore[union-attr]
        import anyio

        with anyio.fail_after(10):
            while (await store.get(brief.id)).is_active():  # type: ignore[union-attr]
                await anyio.sleep(0.05)
        await delivery.queue_notices(store)
        await delivery.queue_notices(store)
        await deliver_all(store, delivery)
        [*_, expired] = await receiver.wait_for(4)
    assert (expired["type"], expired["data"]["key_id"]) == ("key.expired", brief.id)
    assert len(receiver.received) == 4 and set(receiver.ids.values()) == {1}


LIMIT_EVENTS = ["quota.low", "quota.exhausted", "rate_limit.exceeded"]


async def test_quota_and_rate_limit_events_from_a_running_app(store: KeyStore) -> None:
    """A key at 10% of its quota: ``quota.low``; at none: ``quota.exhausted``, each once
    per period; a rate-limited key refused again and again: ``rate_limit.exceeded`` at
    most once a minute. Noted without I/O on the request path, sent by the duty."""
    from apps import protect

    receiver = Receiver()
    keys = manager(store)
    async with serving(receiver.app()) as base:
        await hook(store, base + "/hook", receiver, events=LIMIT_EVENTS)
        quota = await keys.create(owner="acme", name="metered", quota=10, quota_refill="30d")
        rated = await keys.create(owner="acme", name="rated", rate_limit="1/minute")
        app: APIKeyMiddleware = protect(store, webhooks=sender(), flush_interval=0.05)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:

            async def get(key: str) -> int:
                response = await client.get("/whoami", headers={"X-API-Key": key})
                return response.status_code

            assert [await get(quota.key) for _ in range(9)] == [200] * 9
            [low] = await receiver.wait_for(1)
            assert [await get(quota.key) for _ in range(3)] == [200, 429, 429]
            statuses = [await get(rated.key) for _ in range(6)]
            assert statuses[0] == 200 and statuses.count(429) == 5
            messages = await receiver.wait_for(3)
        await app.aclose()
    assert (low["type"], low["data"]["key_id"], low["data"]["remaining"]) == (
        "quota.low",
        quota.id,
        1,
    )
    types = sorted(m["type"] for m in messages)
    assert types == ["quota.exhausted", "quota.low", "rate_limit.exceeded"]
    # Once per minute: a second one only if the refusals straddled a minute's end.
    minutes = [m["data"]["minute"] for m in receiver.received if m["type"] == "rate_limit.exceeded"]
    assert len(minutes) == len(set(minutes)) <= 2
    [exceeded] = [m for m in messages if m["type"] == "rate_limit.exceeded"]
    assert (exceeded["data"]["key_id"], exceeded["data"]["name"]) == (rated.id, "rated")
    assert receiver.refused == 0
