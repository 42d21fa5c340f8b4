"""The KeyStore protocol, one suite run against every store (memory, SQLite, Postgres)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import anyio
import pytest

from keystile import DuplicateKeyName, KeyManagementError, KeyRecord, KeyStore
from keystile.stores.records import utcnow
from keystile.tokens import new_key_id

pytestmark = pytest.mark.anyio


def record(owner: str = "acme", name: str = "laptop", **fields: object) -> KeyRecord:
    base = KeyRecord(
        id=new_key_id(),
        owner=owner,
        name=name,
        prefix="ks",
        secret_hash="$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        scopes=("read", "write"),
        metadata={"device": "laptop", "n": 1},
        created_at=utcnow().replace(microsecond=0),
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


async def test_insert_and_get_round_trip(store: KeyStore) -> None:
    """Every field survives a round trip, timestamps as aware UTC datetimes."""
    expires = utcnow().replace(microsecond=0) + timedelta(days=1)
    r = record(expires_at=expires)
    assert await store.insert(r) == []
    got = await store.get(r.id)
    assert got == r
    assert got is not None and got.created_at.tzinfo is not None


async def test_get_unknown_is_none(store: KeyStore) -> None:
    """An unknown id reads as None."""
    assert await store.get("nosuchkey000") is None


async def test_get_many(store: KeyStore) -> None:
    """get_many returns the known ids only."""
    a, b = record(name="a"), record(name="b")
    await store.insert(a)
    await store.insert(b)
    got = await store.get_many([a.id, b.id, "missing00000"])
    assert set(got) == {a.id, b.id}


async def test_duplicate_active_name_refused(store: KeyStore) -> None:
    """A second active key with the same (owner, name) is refused."""
    await store.insert(record())
    with pytest.raises(DuplicateKeyName):
        await store.insert(record())


async def test_same_name_other_owner_allowed(store: KeyStore) -> None:
    """Names are unique per owner only."""
    await store.insert(record(owner="acme"))
    await store.insert(record(owner="globex"))


async def test_replace_revokes_old_and_links(store: KeyStore) -> None:
    """replace=True revokes the old key, links both ways, and returns the old id."""
    old = record()
    await store.insert(old)
    new = record()
    assert await store.insert(new, replace=True) == [old.id]
    old_now, new_now = await store.get(old.id), await store.get(new.id)
    assert old_now is not None and old_now.revoked_at is not None
    assert old_now.replaced_by == new.id
    assert new_now is not None and new_now.replaces == old.id


async def test_name_free_again_after_revoke_or_expiry(store: KeyStore) -> None:
    """A revoked or expired key no longer blocks its name."""
    first = record()
    await store.insert(first)
    await store.revoke(first.id, "acme", at=utcnow())
    await store.insert(record(expires_at=utcnow() - timedelta(seconds=1), name="x"))
    await store.insert(record())
    await store.insert(record(name="x"))


async def test_concurrent_replaces_leave_one_active(store: KeyStore) -> None:
    """Many concurrent replaces of one name leave exactly one active key."""
    await store.insert(record())

    async def replace() -> None:
        await store.insert(record(), replace=True)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(replace)
    active = [r for r in await store.list_keys("acme") if r.is_active()]
    assert len(active) == 1


async def test_revoke_is_owner_scoped_and_idempotent(store: KeyStore) -> None:
    """Revoke touches only the owner's key and says whether it revoked anything."""
    r = record()
    await store.insert(r)
    assert await store.revoke(r.id, "globex", at=utcnow()) is False
    assert (await store.get(r.id)).revoked_at is None  # type: ignore[union-attr]
    assert await store.revoke(r.id, "acme", at=utcnow()) is True
    assert await store.revoke(r.id, "acme", at=utcnow()) is False
    assert await store.revoke("nosuchkey000", "acme", at=utcnow()) is False


async def test_get_owned_hides_other_owners(store: KeyStore) -> None:
    """A key of another owner reads as unknown."""
    r = record()
    await store.insert(r)
    assert await store.get_owned(r.id, "globex") is None
    assert (await store.get_owned(r.id, "acme")) == r


async def test_list_keys_is_owner_scoped_and_ordered(store: KeyStore) -> None:
    """list_keys returns only that owner's keys, oldest first."""
    t0 = utcnow().replace(microsecond=0)
    a = record(name="a", created_at=t0)
    b = record(name="b", created_at=t0 + timedelta(seconds=1))
    await store.insert(b)
    await store.insert(a)
    await store.insert(record(owner="globex"))
    assert [r.id for r in await store.list_keys("acme")] == [a.id, b.id]


async def test_rotate_sets_grace_and_links(store: KeyStore) -> None:
    """rotate inserts the successor and gives the old key the grace expiry."""
    old = record()
    await store.insert(old)
    grace = utcnow().replace(microsecond=0) + timedelta(hours=1)
    new = record()
    updated = await store.rotate(old.id, "acme", new, grace_until=grace)
    assert updated is not None
    assert updated.expires_at == grace
    assert updated.replaced_by == new.id
    stored_new = await store.get(new.id)
    assert stored_new is not None and stored_new.replaces == old.id


async def test_rotate_keeps_an_earlier_expiry(store: KeyStore) -> None:
    """A key already expiring before the grace end keeps its earlier expiry."""
    soon = utcnow().replace(microsecond=0) + timedelta(minutes=5)
    old = record(expires_at=soon)
    await store.insert(old)
    updated = await store.rotate(old.id, "acme", record(), grace_until=soon + timedelta(hours=1))
    assert updated is not None and updated.expires_at == soon


async def test_rotate_refuses_other_owner_and_revoked(store: KeyStore) -> None:
    """rotate of another owner's or a revoked key writes nothing."""
    old = record()
    await store.insert(old)
    grace = utcnow() + timedelta(hours=1)
    orphan = record(name="orphan")
    assert await store.rotate(old.id, "globex", orphan, grace_until=grace) is None
    assert await store.get(orphan.id) is None
    await store.revoke(old.id, "acme", at=utcnow())
    assert await store.rotate(old.id, "acme", orphan, grace_until=grace) is None
    assert await store.get(orphan.id) is None


async def test_rotate_refuses_a_key_already_rotated(store: KeyStore) -> None:
    """A key that already has a successor is not rotated again; nothing is written."""
    old = record()
    await store.insert(old)
    grace = utcnow().replace(microsecond=0) + timedelta(hours=1)
    first = record()
    assert await store.rotate(old.id, "acme", first, grace_until=grace) is not None
    second = record()
    assert await store.rotate(old.id, "acme", second, grace_until=grace) is None
    assert await store.get(second.id) is None
    old_now = await store.get(old.id)
    assert old_now is not None and old_now.replaced_by == first.id


async def test_concurrent_rotations_one_successor(store: KeyStore) -> None:
    """Of concurrent rotations of one key exactly one succeeds; the rest write nothing."""
    old = record()
    await store.insert(old)
    grace = utcnow() + timedelta(hours=1)
    successors = [record() for _ in range(4)]
    results: dict[str, KeyRecord | None] = {}

    async def rotate(successor: KeyRecord) -> None:
        results[successor.id] = await store.rotate(old.id, "acme", successor, grace_until=grace)

    async with anyio.create_task_group() as tg:
        for successor in successors:
            tg.start_soon(rotate, successor)
    winners = [key_id for key_id, updated in results.items() if updated is not None]
    assert len(winners) == 1
    stored = {r.id: r for r in await store.list_keys("acme")}
    assert set(stored) == {old.id, winners[0]}
    assert stored[old.id].replaced_by == winners[0]


async def test_reap_revokes_unused_and_expired(store: KeyStore) -> None:
    """reap takes keys unused since the bound (by last use, else creation) and expired ones."""
    now = utcnow().replace(microsecond=0)
    old_unused = record(name="old", created_at=now - timedelta(days=100))
    old_but_used = record(name="used", created_at=now - timedelta(days=100))
    fresh = record(name="fresh", created_at=now - timedelta(days=1))
    expired = record(name="expired", expires_at=now - timedelta(seconds=1))
    for r in (old_unused, old_but_used, fresh, expired):
        await store.insert(r)
    await store.touch_many({old_but_used.id: now - timedelta(days=2)})
    cutoff = now - timedelta(days=90)
    dry = await store.reap(unused_since=cutoff, at=now, dry_run=True)
    assert {r.id for r in dry} == {old_unused.id, expired.id}
    assert all(r.revoked_at is None for r in await store.list_keys("acme"))
    reaped = await store.reap(unused_since=cutoff, at=now, dry_run=False)
    assert {r.id for r in reaped} == {old_unused.id, expired.id}
    status = {r.id: r.status() for r in await store.list_keys("acme")}
    assert status[old_unused.id] == status[expired.id] == "revoked"
    assert status[fresh.id] == status[old_but_used.id] == "active"


async def test_touch_many_never_moves_backwards(store: KeyStore) -> None:
    """last_used_at takes the latest time and never goes back."""
    r = record()
    await store.insert(r)
    t1 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    await store.touch_many({r.id: t1})
    await store.touch_many({r.id: t1 - timedelta(hours=1), "unknown00000": t1})
    got = await store.get(r.id)
    assert got is not None and got.last_used_at == t1


async def test_update_hash(store: KeyStore) -> None:
    """update_hash replaces the stored hash."""
    r = record()
    await store.insert(r)
    await store.update_hash(r.id, "$argon2id$new")
    assert (await store.get(r.id)).secret_hash == "$argon2id$new"  # type: ignore[union-attr]


async def test_listeners_hear_state_changes(store: KeyStore) -> None:
    """Revoke, replace, rotate and reap each tell subscribers which key changed."""
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    a = record(name="a")
    await store.insert(a)
    await store.revoke(a.id, "acme", at=utcnow())
    b = record(name="b")
    await store.insert(b)
    await store.insert(record(name="b"), replace=True)
    c = record(name="c")
    await store.insert(c)
    await store.rotate(c.id, "acme", record(name="c"), grace_until=utcnow() + timedelta(hours=1))
    unsubscribe()
    await store.revoke(c.id, "acme", at=utcnow())
    assert [k for k in heard if k is not None][:3] == [a.id, b.id, c.id]
    assert c.id in heard and heard.count(c.id) == 1


async def test_secret_hash_not_in_repr(store: KeyStore) -> None:
    """A record's repr never shows its hash."""
    r = record()
    assert r.secret_hash not in repr(r)


# -- usage limits ---------------------------------------------------------------------


def limited(**fields: object) -> KeyRecord:
    """A record with a rate limit and a quota of 10 refilled hourly, its period from now."""
    base: dict[str, object] = {
        "rate_limit": "10/second",
        "quota": 10,
        "quota_remaining": 10,
        "quota_refill": timedelta(hours=1),
        "quota_reset_at": utcnow().replace(microsecond=0),
    }
    return record(**{**base, **fields})


async def test_limit_fields_round_trip(store: KeyStore) -> None:
    """rate_limit, quota, quota_remaining, quota_refill and quota_reset_at survive a round trip."""
    r = limited()
    await store.insert(r)
    assert await store.get(r.id) == r


async def test_update_changes_limits_owner_scoped_and_tells_listeners(store: KeyStore) -> None:
    """update writes the given fields of the owner's key only and publishes its id."""
    r = limited()
    await store.insert(r)
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    try:
        assert await store.update(r.id, "globex", {"rate_limit": "1/day"}, at=utcnow()) is None
        updated = await store.update(
            r.id, "acme", {"rate_limit": "100/minute", "quota": None}, at=utcnow()
        )
    finally:
        unsubscribe()
    assert updated is not None and updated.rate_limit == "100/minute" and updated.quota is None
    assert updated.secret_hash == r.secret_hash and updated.scopes == r.scopes
    assert await store.get(r.id) == updated
    assert heard == [r.id]


async def test_touch_many_takes_uses_from_the_quota(store: KeyStore) -> None:
    """A batch takes uses from each remaining quota, never below 0, and says what is left."""
    a, b, free = limited(name="a"), limited(name="b", quota_remaining=2), record(name="free")
    for r in (a, b, free):
        await store.insert(r)
    now = utcnow()
    states = await store.touch_many({a.id: now, b.id: now, free.id: now}, {a.id: 3, b.id: 5})
    assert {k: s.remaining for k, s in states.items()} == {a.id: 7, b.id: 0}
    assert (await store.get(a.id)).quota_remaining == 7  # type: ignore[union-attr]
    assert (await store.get(b.id)).quota_remaining == 0  # type: ignore[union-attr]
    assert (await store.get(free.id)).quota_remaining is None  # type: ignore[union-attr]
    await store.touch_many({a.id: now})
    assert (await store.get(a.id)).quota_remaining == 7  # type: ignore[union-attr]


async def test_touch_many_refills_a_due_quota_first(store: KeyStore) -> None:
    """Uses made after a refill fell due come out of a full quota; the period start advances."""
    start = utcnow().replace(microsecond=0) - timedelta(hours=2, minutes=30)
    r = limited(quota_remaining=0, quota_reset_at=start)
    await store.insert(r)
    states = await store.touch_many({r.id: utcnow()}, {r.id: 4})
    got = await store.get(r.id)
    assert got is not None and got.quota_remaining == 6 == states[r.id].remaining
    assert got.quota_reset_at == start + timedelta(hours=2) == states[r.id].reset_at


# -- key operations and the audit log --------------------------------------------------


async def test_update_changes_any_updatable_field_and_records_it(store: KeyStore) -> None:
    """scopes, name, metadata, expiry, allowlist and disabled_at round-trip, one event each."""
    r = record()
    await store.insert(r, actor="alice")
    at = utcnow()
    changes = {
        "scopes": ("x",),
        "name": "renamed",
        "metadata": {"k": "v"},
        "expires_at": at.replace(microsecond=0) + timedelta(days=1),
        "ip_allowlist": ("10.0.0.0/8",),
    }
    updated = await store.update(r.id, "acme", changes, at=at, actor="bob")
    assert updated is not None and await store.get(r.id) == updated
    assert (updated.scopes, updated.name, updated.ip_allowlist) == (
        ("x",),
        "renamed",
        ("10.0.0.0/8",),
    )
    disabled = await store.update(r.id, "acme", {"disabled_at": at}, at=at, actor="carol")
    assert disabled is not None and disabled.status() == "disabled"
    events = await store.list_events(key_id=r.id)
    assert [(e.action, e.actor) for e in events] == [
        ("created", "alice"),
        ("updated", "bob"),
        ("disabled", "carol"),
    ]
    assert events[1].detail["name"] == "renamed" and "secret_hash" not in events[1].detail


async def test_update_refuses_a_held_name_and_writes_nothing(store: KeyStore) -> None:
    """A rename onto another key's active name raises DuplicateKeyName; row and log unchanged."""
    a, b = record(name="a"), record(name="b")
    await store.insert(a)
    await store.insert(b)
    with pytest.raises(DuplicateKeyName):
        await store.update(b.id, "acme", {"name": "a"}, at=utcnow())
    assert (await store.get(b.id)) == b
    assert [e.action for e in await store.list_events(key_id=b.id)] == ["created"]


async def test_reap_leaves_disabled_keys_unless_included(store: KeyStore) -> None:
    """reap skips a disabled key; include_disabled=True reaps it."""
    r = record()
    await store.insert(r)
    await store.update(r.id, "acme", {"disabled_at": utcnow()}, at=utcnow())
    later = utcnow() + timedelta(days=1)
    assert await store.reap(unused_since=later, at=later, dry_run=False) == []
    reaped = await store.reap(unused_since=later, at=later, dry_run=False, include_disabled=True)
    assert [k.id for k in reaped] == [r.id]


async def test_list_all_returns_every_owner(store: KeyStore) -> None:
    """list_all returns every owner's keys, by owner."""
    await store.insert(record(owner="globex"))
    await store.insert(record(owner="acme"))
    assert [k.owner for k in await store.list_all()] == ["acme", "globex"]


async def test_rotating_a_disabled_key_is_refused(store: KeyStore) -> None:
    """A disabled key cannot be rotated into an enabled successor."""
    r = record()
    await store.insert(r)
    await store.update(r.id, "acme", {"disabled_at": utcnow()}, at=utcnow())
    successor = record()
    assert await store.rotate(r.id, "acme", successor, grace_until=utcnow()) is None
    assert await store.get(successor.id) is None


# -- a revoked key is final -------------------------------------------------------------


async def test_update_of_a_revoked_key_is_refused_by_the_store(store: KeyStore) -> None:
    """store.update of a revoked key raises KeyManagementError; row and log unchanged."""
    r = record()
    await store.insert(r)
    assert await store.revoke(r.id, "acme", at=utcnow()) is True
    revoked = await store.get(r.id)
    for changes in (
        {"scopes": ("admin",)},
        {"name": "renamed"},
        {"disabled_at": utcnow()},
        {"disabled_at": None},
        {},
    ):
        with pytest.raises(KeyManagementError, match="is revoked"):
            await store.update(r.id, "acme", changes, at=utcnow(), actor="mallory")
    assert await store.get(r.id) == revoked
    assert [e.action for e in await store.list_events(key_id=r.id)] == ["created", "revoked"]
    assert await store.update(r.id, "globex", {"name": "x"}, at=utcnow()) is None


@pytest.mark.postgres
async def test_update_waiting_on_a_concurrent_revoke_is_refused_on_postgres(
    postgres_database_url: str,
) -> None:
    """An update blocked behind an uncommitted revoke of the key fails once the revoke
    commits, and the revoked row keeps its values."""
    import asyncpg

    from keystile.stores import store_from_url
    from pgtools import split_url

    dsn, schema = split_url(postgres_database_url)
    store = store_from_url(postgres_database_url)
    await store.open()
    raw = await asyncpg.connect(dsn)
    try:
        r = record()
        await store.insert(r)
        revoker = raw.transaction()
        await revoker.start()
        await raw.execute(
            f'UPDATE "{schema}".keystile_keys SET revoked_at = now() WHERE id = $1',  # noqa: S608
            r.id,
        )
        outcome: list[BaseException | KeyRecord | None] = []

        async def update() -> None:
            try:
                outcome.append(
                    await store.update(r.id, "acme", {"scopes": ("admin",)}, at=utcnow())
                )
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(update)
            watcher = await asyncpg.connect(dsn)
            try:
                with anyio.fail_after(10):
                    while not await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND strpos(query, $1) > 0",
                        f'"{schema}".keystile_keys',
                    ):
                        await anyio.sleep(0.01)
            finally:
                await watcher.close()
            await revoker.commit()
        assert len(outcome) == 1 and isinstance(outcome[0], KeyManagementError), outcome
        got = await store.get(r.id)
        assert got is not None and got.revoked_at is not None and got.scopes == r.scopes
        assert [e.action for e in await store.list_events(key_id=r.id)] == ["created"]
    finally:
        await raw.close()
        await store.close()
