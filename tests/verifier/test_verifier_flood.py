"""A guessing flood over many public key ids, at the production argon2 cost, through the
ASGI app on SQLite and Postgres: other tenants' first requests are still verified; and
past an id's failure budget, an id with a key and one without get the same answers.

The flood's requests are plain ASGI calls into the app (every one passes through the
middleware and the app, as a server would hand it over); the tenants' go through httpx.
An httpx request costs the event loop about twenty times what the app spends refusing
it, and on one loop 300 httpx clients would measure httpx, not keystile.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from apps import client, protect
from keystile import (
    CHEAPEST_PARAMETERS,
    DEFAULT_PARAMETERS,
    APIKeyMiddleware,
    KeyManager,
    KeyStore,
    store_from_url,
)
from keystile.hashing import SecretHasher
from keystile.tokens import generate_key

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]

#: Key ids the attacker knows (a self-service owner mints 64; two owners here).
FLOOD_IDS = 80
#: Concurrent flood clients, each sending a fresh well-formed wrong secret one round trip
#: after its previous one was answered.
FLOOD_CLIENTS = 300
#: Seconds between an answer and the client's next request: the network a remote client
#: sits behind. In process, 300 clients with none would spin the one event loop on their
#: own work (generating keys, building requests) and measure that instead.
ROUND_TRIP = 0.1
#: Other tenants, each sending one first request while the flood runs.
TENANTS = 20
#: Flood answers before the first tenant asks (the first wave is in), and between tenants.
WARM_UP = FLOOD_CLIENTS
SPACING = 20


class SharedHash(SecretHasher):
    """Stores one production-cost hash (of a secret nobody holds) for every key it mints:
    each guess still costs a real verification, and minting 80 keys costs one hash."""

    __slots__ = ("_shared",)

    def __init__(self) -> None:
        super().__init__(DEFAULT_PARAMETERS)
        self._shared = super().hash(generate_key()[1].secret)

    def hash(self, secret: str) -> str:
        return self._shared


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def flood_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flood.db'}"
    url: str = request.getfixturevalue("postgres_database_url")
    return url


@pytest.fixture
async def minted(flood_url: str) -> tuple[list[str], list[str]]:
    """The attacker's known ids, and the tenants' keys, hashed at the production cost."""
    async with KeyManager.from_url(flood_url, argon2=DEFAULT_PARAMETERS) as manager:
        tenants = [
            (await manager.create(owner=f"tenant-{i}", name="api")).key for i in range(TENANTS)
        ]
        manager.hasher = SharedHash()
        known = [
            (await manager.create(owner=f"mallory-{i % 2}", name=f"k{i}")).id
            for i in range(FLOOD_IDS)
        ]
    return known, tenants


@pytest.fixture
async def app(flood_url: str) -> AsyncIterator[APIKeyMiddleware]:
    """Defaults throughout (argon2 cost, admission bounds, argon2 threads); ``/public`` is
    exempt, so a flood sent there is answered 200 and verified all the same."""
    app = protect(store_from_url(flood_url), argon2=DEFAULT_PARAMETERS, exempt_paths=["/public"])
    yield app
    await app.aclose()


async def asgi_get(app: APIKeyMiddleware, path: str, token: str) -> int:
    """One GET through the ASGI app, as a server hands it over; the response status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"x-api-key", token.encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    received = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


class Progress:
    """Counts flood answers; a tenant waits for a given count instead of for a time."""

    def __init__(self) -> None:
        self.answers = 0
        self._waiting: list[tuple[int, anyio.Event]] = []

    def tick(self) -> None:
        self.answers += 1
        while self._waiting and self._waiting[0][0] <= self.answers:
            self._waiting.pop(0)[1].set()

    async def reached(self, count: int) -> None:
        if self.answers < count:
            event = anyio.Event()
            self._waiting.append((count, event))
            self._waiting.sort(key=lambda item: item[0])
            await event.wait()


async def run_flood(
    app: APIKeyMiddleware, http: httpx.AsyncClient, known: list[str], tenants: list[str]
) -> tuple[list[int], Counter[tuple[str, int]]]:
    """The flood, and one first request per tenant spread over it; the tenants' statuses
    and the flood's (path, status) counts."""
    progress = Progress()
    flood: Counter[tuple[str, int]] = Counter()
    answers: list[int] = []

    async def attacker(n: int) -> None:
        path = "/public" if n % 4 == 0 else "/whoami"
        sent = 0
        while True:
            token = generate_key(key_id=known[(n + 7 * sent) % len(known)])[0]
            sent += 1
            flood[path, await asgi_get(app, path, token)] += 1
            progress.tick()
            await anyio.sleep(ROUND_TRIP)

    async def tenant(i: int, key: str) -> None:
        await progress.reached(WARM_UP + i * SPACING)
        r = await http.get("/whoami", headers={"X-API-Key": key})
        answers.append(r.status_code)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as flooding:
            for n in range(FLOOD_CLIENTS):
                flooding.start_soon(attacker, n)
            async with anyio.create_task_group() as tenants_asking:
                for i, key in enumerate(tenants):
                    tenants_asking.start_soon(tenant, i, key)
            # Cut off the flood's requests in flight, as clients going away would.
            flooding.cancel_scope.cancel()
    return answers, flood


async def test_flood_over_many_ids_leaves_other_tenants_verified(
    app: APIKeyMiddleware, minted: tuple[list[str], list[str]]
) -> None:
    """300 clients guessing secrets for 80 known ids, at the default argon2 cost, on the
    protected and an exempt path: at least 19 of 20 other tenants' first requests get 200."""
    known, tenants = minted
    async with client(app) as http:
        # A service already up: its store connected before the flood starts.
        assert (
            await http.get("/whoami", headers={"X-API-Key": generate_key()[0]})
        ).status_code == 401
        answers, flood = await run_flood(app, http, known, tenants)
    stats = app.stats()
    assert Counter(answers)[200] >= TENANTS - 1, (answers, dict(flood), dict(stats.rejects))
    assert {status for path, status in flood if path == "/whoami"} <= {401, 503}
    assert {status for path, status in flood if path == "/public"} == {200}
    assert stats.rejects["wrong_secret"] > 0  # the flood did reach argon2
    assert sum(flood.values()) >= WARM_UP + (TENANTS - 1) * SPACING
    assert app.verifier.pending_verifications == 0  # cut-off requests gave their slots back


class HeldHasher(SecretHasher):
    """argon2 that holds the verification of one hash until the test opens the gate."""

    __slots__ = ("entered", "held", "open")

    def __init__(self, held: str) -> None:
        super().__init__(CHEAPEST_PARAMETERS)
        self.held = held
        self.entered = threading.Event()
        self.open = threading.Event()

    def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        if secret_hash == self.held:
            self.entered.set()
            assert self.open.wait(10)
        return super().verify(secret_hash, secret)


async def test_existing_and_unknown_ids_get_the_same_answers(
    database_url: str, store: KeyStore
) -> None:
    """While another tenant's miss waits, guess by guess an id with a key and one without
    get the same status, headers and body: 401 while the id's failure budget lasts, then
    503 with Retry-After, refused before the store is read."""
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    real = (await manager.create(owner="acme", name="ci")).id
    busy = await manager.create(owner="other", name="api")
    app = protect(store_from_url(database_url), argon2_concurrency=2)
    hasher = app.verifier.hasher = HeldHasher(busy.record.secret_hash)
    unknown = generate_key()[1].key_id
    answers: dict[str, list[tuple[int, dict[str, str], bytes]]] = {real: [], unknown: []}
    async with client(app) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.get("/whoami", headers={"X-API-Key": busy.key}))
        assert await anyio.to_thread.run_sync(hasher.entered.wait, 10)
        for _ in range(8):
            for key_id, seen in answers.items():
                token = generate_key(key_id=key_id)[0]
                r = await http.get("/whoami", headers={"X-API-Key": token})
                kept = ("www-authenticate", "retry-after")
                seen.append(
                    (r.status_code, {k: r.headers[k] for k in kept if k in r.headers}, r.content)
                )
        hasher.open.set()
    stats = app.stats()
    await app.aclose()
    assert answers[real] == answers[unknown]
    statuses = [status for status, _, _ in answers[real]]
    assert (statuses[0], statuses[-1]) == (401, 503)
    assert stats.rejects["too_many_failures"] > 0
