"""KeyManager.rotate on every store: one successor per key, and the key's policy kept."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest

from apps import client, protect
from keystile import (
    CHEAPEST_PARAMETERS,
    CreatedKey,
    KeyManagementError,
    KeyManager,
    KeyNotFound,
    store_from_url,
)
from keystile.cli import main
from keystile.errors import KeyAlreadyRotated

pytestmark = pytest.mark.anyio


@pytest.fixture
async def manager(database_url: str) -> AsyncIterator[KeyManager]:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as manager:
        yield manager


def lasting(created: CreatedKey) -> timedelta:
    """How long from now the key has left."""
    assert created.record.expires_at is not None
    return created.record.expires_at - datetime.now(timezone.utc)


# -- one successor ----------------------------------------------------------------------


async def test_second_rotation_is_refused(manager: KeyManager) -> None:
    """Rotating a key that already has a successor raises KeyAlreadyRotated naming it."""
    old = await manager.create(owner="acme", name="svc")
    new = await manager.rotate(old.id, owner="acme")
    with pytest.raises(
        KeyAlreadyRotated, match=f"key '{old.id}' was already rotated to '{new.id}'"
    ):
        await manager.rotate(old.id, owner="acme")
    assert {r.id for r in await manager.list("acme")} == {old.id, new.id}


async def test_already_rotated_is_not_not_active(manager: KeyManager) -> None:
    """The two refusals are told apart: already rotated is not KeyNotFound, revoked is."""
    old = await manager.create(owner="acme", name="svc")
    await manager.rotate(old.id, owner="acme")
    with pytest.raises(KeyManagementError) as refused:
        await manager.rotate(old.id, owner="acme")
    assert not isinstance(refused.value, KeyNotFound)
    revoked = await manager.create(owner="acme", name="gone")
    await manager.revoke(revoked.id, owner="acme")
    with pytest.raises(KeyNotFound, match="not active"):
        await manager.rotate(revoked.id, owner="acme")


async def test_successor_can_be_rotated(manager: KeyManager) -> None:
    """The chain goes on through the successor: rotating it is allowed."""
    first = await manager.create(owner="acme", name="svc")
    second = await manager.rotate(first.id, owner="acme")
    third = await manager.rotate(second.id, owner="acme")
    assert third.record.replaces == second.id


async def test_concurrent_rotations_leave_one_live_key(manager: KeyManager) -> None:
    """Two rotations of one key at once: one succeeds, the other is refused, and the name
    has exactly one active key outside its grace period."""
    old = await manager.create(owner="acme", name="svc")
    rotated: list[CreatedKey] = []
    refused: list[KeyAlreadyRotated] = []

    async def rotate() -> None:
        try:
            rotated.append(await manager.rotate(old.id, owner="acme"))
        except KeyAlreadyRotated as exc:
            refused.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(rotate)
        tg.start_soon(rotate)
    assert len(rotated) == 1 and len(refused) == 1
    assert refused[0].successor == rotated[0].id
    records = await manager.list("acme")
    live = [r for r in records if r.is_active() and r.replaced_by is None]
    assert [r.id for r in live] == [rotated[0].id]
    assert len(records) == 2


# -- the key's policy -------------------------------------------------------------------


async def test_successor_keeps_the_lifetime(manager: KeyManager) -> None:
    """A key created with expires_in=30d rotates to a key expiring 30 days from now."""
    old = await manager.create(owner="acme", name="svc", expires_in=timedelta(days=30))
    new = await manager.rotate(old.id, owner="acme")
    assert timedelta(days=30) - timedelta(minutes=1) < lasting(new) <= timedelta(days=30)


async def test_successor_lifetime_counts_from_rotation(manager: KeyManager) -> None:
    """The lifetime is the old key's whole span (created to expiry), restarted at rotation."""
    now = datetime.now(timezone.utc)
    old = await manager.create(owner="acme", name="svc", expires_at=now + timedelta(days=7))
    new = await manager.rotate(old.id, owner="acme")
    assert new.record.expires_at is not None and old.record.expires_at is not None
    span = old.record.expires_at - old.record.created_at
    assert new.record.expires_at - new.record.created_at == span


async def test_key_without_expiry_gets_the_manager_default(database_url: str) -> None:
    """A key without expiry rotates to the manager's default_expires_in, if any."""
    store = store_from_url(database_url)
    plain = KeyManager(store, argon2=CHEAPEST_PARAMETERS)
    expiring = KeyManager(store, argon2=CHEAPEST_PARAMETERS, default_expires_in=timedelta(days=10))
    await plain.open()
    first = await plain.create(owner="acme", name="a")
    second = await plain.create(owner="acme", name="b")
    never = await plain.rotate(first.id, owner="acme")
    defaulted = await expiring.rotate(second.id, owner="acme")
    await plain.close()
    assert never.record.expires_at is None
    assert timedelta(days=10) - timedelta(minutes=1) < lasting(defaulted) <= timedelta(days=10)


async def test_successor_keeps_the_prefix(database_url: str) -> None:
    """A key minted with prefix="acme" rotates to an acme_ key, whatever this manager's
    prefix, and the successor authenticates."""
    store = store_from_url(database_url)
    minting = KeyManager(store, prefix="acme", argon2=CHEAPEST_PARAMETERS)
    rotating = KeyManager(store, argon2=CHEAPEST_PARAMETERS)  # default prefix "ks"
    await minting.open()
    old = await minting.create(owner="acme", name="svc")
    new = await rotating.rotate(old.id, owner="acme")
    assert new.key.startswith(f"acme_{new.id}_")
    assert new.record.prefix == "acme"
    app = protect(store)
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": new.key})
    await app.aclose()
    await minting.close()
    assert r.status_code == 200


def test_cli_rotation_keeps_expires_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """keystile create --expires-in 30d, then rotate: the new key expires in 30 days, not never."""
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    base = ["--database-url", url]
    assert main([*base, "create", "--owner", "acme", "--name", "ci", "--expires-in", "30d"]) == 0
    _, err = capsys.readouterr()
    key_id = err.split("key ", 1)[1].split()[0]
    assert main([*base, "rotate", key_id, "--owner", "acme", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    remaining = datetime.fromisoformat(rotated["expires_at"]) - datetime.now(timezone.utc)
    assert timedelta(days=30) - timedelta(minutes=1) < remaining <= timedelta(days=30)
