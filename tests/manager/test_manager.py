"""KeyManager: the key lifecycle on every store (memory, SQLite, Postgres)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from apps import client, inner_app, protect
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    DuplicateKeyName,
    InvalidKeyName,
    KeyManagementError,
    KeyManager,
    KeyNotFound,
    revoke_presented,
    store_from_url,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def manager(database_url: str) -> AsyncIterator[KeyManager]:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as manager:
        yield manager


async def test_create_returns_plaintext_once(manager: KeyManager) -> None:
    """create returns the plaintext and a record that holds only its hash."""
    created = await manager.create(owner="acme", name="laptop", scopes=["a", "b"])
    assert created.key.startswith(f"ks_{created.id}_")
    assert created.key not in repr(created)
    assert created.key.split("_")[2] not in created.record.secret_hash
    assert created.record.scopes == ("a", "b")
    assert [r.id for r in await manager.list("acme")] == [created.id]


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "tab\there", "new\nline"])
async def test_bad_names_refused_with_the_rule(manager: KeyManager, name: str) -> None:
    """Names must be 1-64 printable characters after trimming; the error says so."""
    with pytest.raises(InvalidKeyName, match="1-64 printable"):
        await manager.create(owner="acme", name=name)


async def test_names_are_trimmed(manager: KeyManager) -> None:
    """Surrounding whitespace is trimmed, so ' laptop ' clashes with 'laptop'."""
    created = await manager.create(owner="acme", name="  laptop  ")
    assert created.record.name == "laptop"
    with pytest.raises(DuplicateKeyName):
        await manager.create(owner="acme", name="laptop")


async def test_no_silent_sprawl(manager: KeyManager) -> None:
    """A second active key of the same name fails; replace=True leaves one active key."""
    first = await manager.create(owner="acme", name="ci")
    with pytest.raises(DuplicateKeyName, match="replace"):
        await manager.create(owner="acme", name="ci")
    second = await manager.create(owner="acme", name="ci", replace=True)
    records = {r.id: r for r in await manager.list("acme")}
    assert records[first.id].status() == "revoked"
    assert records[first.id].replaced_by == second.id
    assert [r.id for r in records.values() if r.is_active()] == [second.id]


async def test_concurrent_replaces_leave_one_key(manager: KeyManager) -> None:
    """Two (and more) concurrent --replace logins for one device leave exactly one key."""
    await manager.create(owner="acme", name="device")

    async def login() -> None:
        await manager.create(owner="acme", name="device", replace=True)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(login)
    active = [r for r in await manager.list("acme") if r.is_active()]
    assert len(active) == 1


async def test_other_owners_key_is_unknown(manager: KeyManager) -> None:
    """get, revoke and rotate treat another owner's key id exactly like an unknown id."""
    created = await manager.create(owner="acme", name="k")
    for key_id in (created.id, "nosuchkey000"):
        with pytest.raises(KeyNotFound):
            await manager.get(key_id, owner="globex")
        assert await manager.revoke(key_id, owner="globex") is False
        with pytest.raises(KeyNotFound):
            await manager.rotate(key_id, owner="globex")
    assert await manager.list("globex") == []
    assert (await manager.get(created.id, owner="acme")).is_active()


async def test_revoke_is_idempotent(manager: KeyManager) -> None:
    """revoke says True once, then False."""
    created = await manager.create(owner="acme", name="k")
    assert await manager.revoke(created.id, owner="acme") is True
    assert await manager.revoke(created.id, owner="acme") is False


async def test_expiry_options(manager: KeyManager) -> None:
    """expires_in and expires_at set the expiry; both at once, naive or past deltas fail."""
    a = await manager.create(owner="acme", name="a", expires_in=timedelta(days=1))
    assert a.record.expires_at is not None
    assert (
        timedelta(hours=23) < a.record.expires_at - datetime.now(timezone.utc) <= timedelta(days=1)
    )
    when = datetime(2031, 1, 1, tzinfo=timezone.utc)
    b = await manager.create(owner="acme", name="b", expires_at=when)
    assert b.record.expires_at == when
    with pytest.raises(KeyManagementError):
        await manager.create(owner="acme", name="c", expires_at=when, expires_in=timedelta(1))
    with pytest.raises(KeyManagementError):
        await manager.create(owner="acme", name="c", expires_at=datetime(2031, 1, 1))
    with pytest.raises(KeyManagementError):
        await manager.create(owner="acme", name="c", expires_in=timedelta(seconds=-1))


async def test_default_expires_in(database_url: str) -> None:
    """default_expires_in applies to keys created without an explicit expiry."""
    async with KeyManager.from_url(
        database_url, argon2=CHEAPEST_PARAMETERS, default_expires_in=timedelta(days=30)
    ) as manager:
        created = await manager.create(owner="acme", name="k")
    assert created.record.expires_at is not None


async def test_expired_keys_listed_as_expired(manager: KeyManager) -> None:
    """list shows an expired key as expired."""
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    created = await manager.create(owner="acme", name="old", expires_at=past)
    assert (await manager.get(created.id, owner="acme")).status() == "expired"


async def test_rotate_links_and_keeps_attributes(manager: KeyManager) -> None:
    """rotate mints a successor with the same name, scopes and metadata, linked both ways."""
    old = await manager.create(owner="acme", name="svc", scopes=["r"], metadata={"team": "x"})
    new = await manager.rotate(old.id, owner="acme", grace=timedelta(minutes=10))
    assert new.key != old.key
    assert (new.record.name, new.record.scopes, dict(new.record.metadata)) == (
        "svc",
        ("r",),
        {"team": "x"},
    )
    assert new.record.replaces == old.id
    old_now = await manager.get(old.id, owner="acme")
    assert old_now.replaced_by == new.id
    assert old_now.expires_at is not None
    remaining = old_now.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=9) < remaining <= timedelta(minutes=10)


async def test_rotation_grace_both_work_then_only_new(database_url: str) -> None:
    """During the grace both keys authenticate; after it only the successor, with requests
    driven throughout and none failing while the grace lasts."""
    store = store_from_url(database_url)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    await manager.open()
    old = await manager.create(owner="acme", name="svc")
    app = protect(store)
    now = [datetime.now(timezone.utc).timestamp()]
    app.verifier.clock = lambda: now[0]
    failures = 0
    async with client(app) as c:

        async def call(key: str) -> int:
            return (await c.get("/whoami", headers={"X-API-Key": key})).status_code

        for _ in range(5):
            failures += await call(old.key) != 200
        new = await manager.rotate(old.id, owner="acme", grace=timedelta(hours=1))
        for _ in range(20):
            failures += await call(old.key) != 200
            failures += await call(new.key) != 200
            now[0] += 60  # 20 minutes of requests in the grace period
        assert failures == 0
        now[0] += 3600
        assert await call(old.key) == 401
        assert await call(new.key) == 200
    await app.aclose()
    await manager.close()


async def test_reap(manager: KeyManager) -> None:
    """reap revokes keys unused for longer than the bound, and expired ones; dry run changes
    nothing."""
    used = await manager.create(owner="acme", name="used")
    expired = await manager.create(
        owner="acme", name="expired", expires_at=datetime.now(timezone.utc) - timedelta(1)
    )
    await manager.store.touch_many({used.id: datetime.now(timezone.utc)})
    dry = await manager.reap(unused_for=timedelta(days=90), dry_run=True)
    assert [r.id for r in dry] == [expired.id]
    assert (await manager.get(expired.id, owner="acme")).revoked_at is None
    assert [r.id for r in await manager.reap(unused_for=timedelta(days=90))] == [expired.id]
    never_used = await manager.create(owner="acme", name="idle")
    reaped = await manager.reap(unused_for=timedelta(0))
    assert {r.id for r in reaped} == {used.id, never_used.id}


async def test_revoke_presented_logs_out(database_url: str) -> None:
    """A logout route revokes the key that authenticated it; the next request is 401."""
    store = store_from_url(database_url)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    await manager.open()
    created = await manager.create(owner="acme", name="session")

    async def logout(request: Request) -> JSONResponse:
        return JSONResponse({"revoked": await revoke_presented(request)})

    inner = inner_app()
    inner.add_route("/logout", logout, methods=["POST"])
    app = APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS)
    async with client(app) as c:
        headers = {"Authorization": f"Bearer {created.key}"}
        assert (await c.get("/whoami", headers=headers)).status_code == 200
        assert (await c.post("/logout", headers=headers)).json() == {"revoked": True}
        after = await c.get("/whoami", headers=headers)
    await app.aclose()
    await manager.close()
    assert after.status_code == 401


async def test_middleware_reaps_on_a_schedule(database_url: str) -> None:
    """reap_every runs the reaper in the background; off by default."""
    store = store_from_url(database_url)
    manager = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    await manager.open()
    created = await manager.create(owner="acme", name="idle")
    assert protect(store).reap_every is None
    app = protect(store, reap_every=0.05, reap_unused_for=timedelta(0), exempt_paths=["/public"])
    async with client(app) as c:
        await c.get("/public")  # starts the background work
        with anyio.fail_after(10):
            while (await manager.get(created.id, owner="acme")).revoked_at is None:
                await anyio.sleep(0.02)
    await app.aclose()
    events = await manager.events(owner="acme", key_id=created.id)
    await manager.close()
    assert [(e.action, e.actor) for e in events if e.action == "reaped"] == [
        ("reaped", "keystile:reaper")
    ]


# -- metadata every store can hold ------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"a": "x\x00y"}, "NUL"),
        ({"a\x00": "x"}, "NUL"),
        ({"a": {"b": ["ok", "x\x00"]}}, "NUL"),
        ({"a": {"b\x00": 1}}, "NUL"),
        ({"a": "\ud800"}, "lone surrogate"),
        ({"a": float("nan")}, "JSON"),
        ({"a": float("inf")}, "JSON"),
        ({1: "x"}, "keys must be strings"),
        ({"a": {2: "x"}}, "keys must be strings"),
        ({"a": {1, 2}}, "JSON"),
        ({"a": b"bytes"}, "JSON"),
        ({"a": object()}, "JSON"),
    ],
    ids=[
        "nul-value",
        "nul-key",
        "nul-nested-value",
        "nul-nested-key",
        "lone-surrogate",
        "nan",
        "infinity",
        "int-key",
        "nested-int-key",
        "set",
        "bytes",
        "object",
    ],
)
async def test_metadata_every_store_can_hold(
    manager: KeyManager, metadata: dict[Any, Any], message: str
) -> None:
    """Metadata Postgres would refuse is refused on every store, with nothing stored."""
    with pytest.raises(KeyManagementError, match=message):
        await manager.create(owner="acme", name="k", metadata=metadata)
    assert await manager.list("acme") == []


async def test_metadata_nul_refused(manager: KeyManager) -> None:
    """create(metadata={"a": "x\\x00y"}) raises KeyManagementError and stores nothing."""
    with pytest.raises(KeyManagementError, match=r"metadata\['a'\] contains a NUL"):
        await manager.create(owner="acme", name="k", metadata={"a": "x\x00y"})
    assert await manager.list("acme") == []


async def test_metadata_that_contains_itself_refused(manager: KeyManager) -> None:
    """A self-referencing mapping is refused with a clear error, not a RecursionError."""
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(KeyManagementError, match="nested too deeply"):
        await manager.create(owner="acme", name="k", metadata=looped)


async def test_metadata_round_trips_the_same_on_every_store(manager: KeyManager) -> None:
    """Valid metadata reads back as the same plain JSON on every store (tuples as lists)."""
    metadata = {"team": "é✓", "n": 1, "x": 1.5, "ok": True, "none": None, "t": ("a", ["b"])}
    created = await manager.create(owner="acme", name="k", metadata=metadata)
    expected = {**metadata, "t": ["a", ["b"]]}
    assert dict(created.record.metadata) == expected
    assert dict((await manager.get(created.id, owner="acme")).metadata) == expected


# -- key ids as shown -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["{id}", "ks_{id}", "ks_{id}…", "ks_{id}...", " ks_{id}… "])
async def test_get_revoke_rotate_take_the_display_form(manager: KeyManager, form: str) -> None:
    """get, rotate and revoke accept a key id or its display form (ks_<id>, ks_<id>…)."""
    created = await manager.create(owner="acme", name="k")
    shown = form.format(id=created.id)
    assert (await manager.get(shown, owner="acme")).id == created.id
    rotated = await manager.rotate(shown, owner="acme")
    assert rotated.record.replaces == created.id
    shown_new = form.format(id=rotated.id)
    assert await manager.revoke(shown_new, owner="acme") is True
    assert (await manager.get(rotated.id, owner="acme")).status() == "revoked"


async def test_redacted_form_from_list_revokes(manager: KeyManager) -> None:
    """The redacted form printed for a record revokes that key."""
    created = await manager.create(owner="acme", name="k")
    shown = created.record.to_public_dict()["redacted"]
    assert await manager.revoke(shown, owner="acme") is True


# -- expiry out of range ----------------------------------------------------------------


async def test_expires_in_past_year_9999_refused(manager: KeyManager) -> None:
    """expires_in=3 000 000 days raises KeyManagementError, not OverflowError."""
    with pytest.raises(KeyManagementError, match="year 9999"):
        await manager.create(owner="acme", name="k", expires_in=timedelta(days=3_000_000))
    assert await manager.list("acme") == []


async def test_default_expires_in_past_year_9999_refused(database_url: str) -> None:
    """An out-of-range default_expires_in fails the same way, on create."""
    async with KeyManager.from_url(
        database_url, argon2=CHEAPEST_PARAMETERS, default_expires_in=timedelta(days=3_000_000)
    ) as manager:
        with pytest.raises(KeyManagementError, match="year 9999"):
            await manager.create(owner="acme", name="k")


async def test_rotation_grace_past_year_9999_refused(manager: KeyManager) -> None:
    """A grace reaching past year 9999 raises KeyManagementError and writes nothing."""
    created = await manager.create(owner="acme", name="k")
    with pytest.raises(KeyManagementError, match="year 9999"):
        await manager.rotate(created.id, owner="acme", grace=timedelta(days=3_000_000))
    assert [r.id for r in await manager.list("acme")] == [created.id]


async def test_expires_at_overflowing_utc_refused(manager: KeyManager) -> None:
    """An expires_at that only overflows when converted to UTC is refused clearly."""
    west = timezone(timedelta(hours=-5))
    with pytest.raises(KeyManagementError, match="year 9999"):
        await manager.create(
            owner="acme", name="k", expires_at=datetime(9999, 12, 31, 23, 0, tzinfo=west)
        )


# -- a revoked key is final -------------------------------------------------------------


async def test_a_revoked_key_cannot_be_updated_disabled_enabled_or_renamed(
    manager: KeyManager,
) -> None:
    """update, rename, disable and enable of a revoked key raise, and change nothing."""
    created = await manager.create(owner="acme", name="ci", scopes=["read"])
    assert await manager.revoke(created.id, owner="acme") is True
    before = await manager.get(created.id, owner="acme")
    key = created.id
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "scopes": lambda: manager.update(key, owner="acme", scopes=["read", "admin"]),
        "rename": lambda: manager.update(key, owner="acme", name="ci2"),
        "expiry": lambda: manager.update(key, owner="acme", expires_at=None),
        "quota": lambda: manager.update(key, owner="acme", quota=5),
        "nothing": lambda: manager.update(key, owner="acme"),
        "disable": lambda: manager.disable(key, owner="acme"),
        "enable": lambda: manager.enable(key, owner="acme"),
    }
    for label, call in calls.items():
        with pytest.raises(KeyManagementError, match="is revoked") as raised:
            await call()
        assert not isinstance(raised.value, KeyNotFound), label
    assert await manager.get(created.id, owner="acme") == before
    assert [e.action for e in await manager.events(key_id=created.id)] == ["created", "revoked"]


async def test_a_disabled_key_once_revoked_cannot_be_enabled(manager: KeyManager) -> None:
    """disable, then revoke: enable raises and the key stays revoked and disabled."""
    created = await manager.create(owner="acme", name="ci")
    await manager.disable(created.id, owner="acme")
    await manager.revoke(created.id, owner="acme")
    with pytest.raises(KeyManagementError, match="is revoked"):
        await manager.enable(created.id, owner="acme")
    record = await manager.get(created.id, owner="acme")
    assert record.status() == "revoked" and record.disabled_at is not None
