"""The lifetime policy: with ``max_lifetime`` every key expires, and none outlives it, on
create, update and rotate alike; in the CLI through ``KEYSTILE_MAX_LIFETIME``; and
``keystile list --expiring-within``."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from keystile import CHEAPEST_PARAMETERS, KeyManager, KeyStore
from keystile.cli import main
from keystile.errors import ConfigurationError, LifetimeExceeded

pytestmark = pytest.mark.anyio


def manager(store: KeyStore, **options: object) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS, actor="tests", **options)  # type: ignore[arg-type]


async def test_create_without_expiry_or_past_the_maximum_is_refused(store: KeyStore) -> None:
    policy = manager(store, max_lifetime="366d")
    with pytest.raises(LifetimeExceeded) as no_expiry:
        await policy.create(owner="acme", name="forever")
    assert no_expiry.value.reason == "no_expiry"
    with pytest.raises(LifetimeExceeded) as too_long:
        await policy.create(owner="acme", name="long", expires_in=timedelta(days=367))
    assert too_long.value.reason == "too_long"
    assert await store.list_keys("acme") == []
    created = await policy.create(owner="acme", name="ok", expires_in=timedelta(days=366))
    assert created.record.expires_at is not None


async def test_default_expiry_applies_and_must_fit(store: KeyStore) -> None:
    policy = manager(store, max_lifetime="30d", default_expires_in=timedelta(days=30))
    created = await policy.create(owner="acme", name="defaulted")
    assert created.record.expires_at is not None
    with pytest.raises(ConfigurationError):
        manager(store, max_lifetime="30d", default_expires_in=timedelta(days=31))
    with pytest.raises(ConfigurationError):
        manager(store, max_lifetime="soon")


async def test_update_cannot_remove_the_expiry_or_stretch_past_the_lifetime(
    store: KeyStore,
) -> None:
    policy = manager(store, max_lifetime="10d")
    created = await policy.create(owner="acme", name="k", expires_in=timedelta(days=5))
    with pytest.raises(LifetimeExceeded) as removed:
        await policy.update(created.id, owner="acme", expires_at=None)
    assert removed.value.reason == "no_expiry"
    past = created.record.created_at + timedelta(days=10, minutes=1)
    with pytest.raises(LifetimeExceeded):
        await policy.update(created.id, owner="acme", expires_at=past)
    assert (await policy.get(created.id, owner="acme")).expires_at == created.record.expires_at
    updated = await policy.update(created.id, owner="acme", expires_in=timedelta(days=9))
    assert updated.expires_at is not None
    assert updated.expires_at - updated.created_at <= timedelta(days=10)
    # An update that leaves the expiry alone is not the policy's business.
    assert (await policy.update(created.id, owner="acme", scopes=["read"])).scopes == ("read",)


async def test_rotate_refuses_a_successor_without_expiry_or_too_long(store: KeyStore) -> None:
    legacy = await manager(store).create(owner="acme", name="legacy")
    policy = manager(store, max_lifetime="30d")
    with pytest.raises(LifetimeExceeded) as refused:
        await policy.rotate(legacy.id, owner="acme")
    assert refused.value.reason == "no_expiry"
    long = await manager(store).create(owner="acme", name="long", expires_in=timedelta(days=90))
    with pytest.raises(LifetimeExceeded):
        await policy.rotate(long.id, owner="acme")
    assert (await policy.get(long.id, owner="acme")).replaced_by is None
    fits = await policy.create(owner="acme", name="fits", expires_in=timedelta(days=30))
    successor = await policy.rotate(fits.id, owner="acme")
    assert successor.record.expires_at is not None


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_with_one_line_and_lists_expiring_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'life.db'}"
    monkeypatch.setenv("KEYSTILE_MAX_LIFETIME", "90d")
    base = ("--database-url", url)
    code, out, err = cli(capsys, *base, "create", "--owner", "acme", "--name", "forever")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "keys must expire" in err and "Traceback" not in err
    code, _, err = cli(
        capsys, *base, "create", "--owner", "acme", "--name", "long", "--expires-in", "91d"
    )
    assert code == 1 and "maximum lifetime of 90d" in err
    for name, days in (("soon", "3d"), ("later", "60d"), ("sooner", "1d")):
        code, _, _ = cli(
            capsys, *base, "create", "--owner", "acme", "--name", name, "--expires-in", days
        )
        assert code == 0
    code, out, _ = cli(capsys, *base, "--json", "list", "--all", "--expiring-within", "7d")
    assert code == 0
    names = [json.loads(line)["name"] for line in out.splitlines()]
    assert names == ["sooner", "soon"]
    code, _, err = cli(capsys, *base, "list", "--owner", "nobody", "--expiring-within", "7d")
    assert code == 0 and "expiring within" in err
