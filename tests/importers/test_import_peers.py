"""fastapi-keygate and keyshield: keys minted with each library's own API in its own
SQLite database (as the benchmarks set them up), imported from its table, keep their
strings through keystile."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from importing import legacy_app, opened, statuses
from keystile.importers import import_source
from keystile.manager import KeyManager
from keystile.stores import KeyStore

pytestmark = pytest.mark.anyio
PEPPER = "keystile-import-test-pepper"


@pytest.fixture
async def keystile_store(sqlite_database_url: str) -> AsyncIterator[KeyStore]:
    async with opened(sqlite_database_url) as store:
        yield store


def wrong(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def mint_keygate(path: Path) -> dict[str, Any]:
    """Keys of fastapi-keygate's zero-setup SQLite gate: two owners, scopes, a per-minute
    limit, a revoked key and an expired one."""
    from keygate import KeyGate

    gate = KeyGate(db_url=f"sqlite:///{path}", default_per_minute=None)
    live = gate.create_key("acme", name="ci", scopes=["read"])
    limited = gate.create_key("globex", name="etl", per_minute=1)
    revoked = gate.create_key("acme", name="old laptop")
    assert gate.revoke(revoked.id)
    past = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=1)
    expired = gate.create_key("acme", name="trial", expires_at=past)
    gate._engine.dispose()
    return {
        "live": live.key,
        "limited": limited.key,
        "revoked": revoked.key,
        "expired": expired.key,
    }


async def test_keygate_keys_keep_working(tmp_path: Path, keystile_store: KeyStore) -> None:
    """Owners, scopes and the per-minute limit carry over; live keys 200, revoked, expired
    and wrong ones 401; argon2id after the first use; a second import changes nothing."""
    minted = mint_keygate(tmp_path / "keygate.db")
    source = f"sqlite:///{tmp_path / 'keygate.db'}"
    report = await import_source(keystile_store, "keygate", source_url=source)
    assert (report.imported, dict(report.skipped)) == (4, {})
    app = legacy_app(keystile_store, ("keygate",))
    keys = [minted["live"], minted["revoked"], minted["expired"], wrong(minted["live"])]
    assert await statuses(app, keys) == [200, 401, 401, 401]
    assert await statuses(app, [minted["live"]], "/write") == [403]
    assert await statuses(app, [minted["limited"], minted["limited"]]) == [200, 429]
    prefix = minted["live"].split("_")[1]
    record = await keystile_store.get(f"keygate.{prefix}")
    assert record is not None and record.secret_hash.startswith("$argon2id$")
    assert (record.owner, record.scopes) == ("acme", ("read",))
    owners = {r.owner for r in await keystile_store.list_all()}
    assert owners == {"acme", "globex"}
    before = await keystile_store.list_all()
    again = await import_source(keystile_store, "keygate", source_url=source)
    assert (again.imported, dict(again.skipped)) == (0, {"exists": 4})
    assert await keystile_store.list_all() == before


async def mint_keyshield(path: Path, pepper: str | None) -> dict[str, Any]:
    """Keys of keyshield's SQL repository (its README's FastAPI example, the benchmarks'
    setup), with argon2 at test cost: a live key, a disabled one and an expired one."""
    from argon2 import PasswordHasher
    from keyshield import ApiKeyService
    from keyshield.hasher.argon2 import Argon2ApiKeyHasher
    from keyshield.repositories.sql import SqlAlchemyApiKeyRepository
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    hasher = Argon2ApiKeyHasher(pepper=pepper, password_hasher=cheap)
    try:
        make_session = async_sessionmaker(engine, expire_on_commit=False)
        async with make_session() as session, session.begin():
            repo = SqlAlchemyApiKeyRepository(session)
            await repo.ensure_table(async_engine=engine)
            svc = ApiKeyService(repo=repo, hasher=hasher, min_delay=0, max_delay=0)
            _, live = await svc.create(name="billing", scopes=["read", "write"])
            off, disabled = await svc.create(name="switched off")
            off.disable()
            await svc.update(off)
            soon = datetime.now(timezone.utc) + timedelta(hours=1)
            trial, expired = await svc.create(name="trial", expires_at=soon)
            trial.expires_at = datetime.now(timezone.utc) - timedelta(days=1)
            await svc.update(trial)
            assert (await svc.verify_key(live)).name == "billing"
    finally:
        await engine.dispose()
    return {"live": live, "disabled": disabled, "expired": expired}


async def test_keyshield_keys_keep_working(tmp_path: Path, keystile_store: KeyStore) -> None:
    """With keyshield's pepper, the live key gets 200, the disabled and expired ones and a
    wrong secret 401; an inactive key is imported disabled and ``enable`` turns it on;
    a middleware without the pepper refuses every key."""
    minted = await mint_keyshield(tmp_path / "keyshield.db", PEPPER)
    source = f"sqlite+aiosqlite:///{tmp_path / 'keyshield.db'}"
    report = await import_source(keystile_store, "keyshield", source_url=source, owner="acme")
    assert (report.imported, dict(report.skipped)) == (3, {})
    unpeppered = legacy_app(keystile_store, ("keyshield",), cache_ttl=61.0)
    assert await statuses(unpeppered, [minted["live"]]) == [401]
    app = legacy_app(keystile_store, {"keyshield": {"pepper": PEPPER}})
    keys = [minted["live"], minted["disabled"], minted["expired"], wrong(minted["live"])]
    assert await statuses(app, keys) == [200, 401, 401, 401]
    key_id = f"keyshield.{minted['live'].split('-')[1]}"
    record = await keystile_store.get(key_id)
    assert record is not None and record.secret_hash.startswith("$argon2id$")
    assert record.scopes == ("read", "write")
    disabled_id = f"keyshield.{minted['disabled'].split('-')[1]}"
    await KeyManager(keystile_store).enable(disabled_id, owner="acme")
    assert await statuses(app, [minted["disabled"]]) == [200]
    again = await import_source(keystile_store, "keyshield", source_url=source, owner="acme")
    assert (again.imported, dict(again.skipped)) == (0, {"exists": 3})


async def test_keyshield_default_pepper(
    tmp_path: Path, keystile_store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyshield deployment that never set a pepper used keyshield's default, and so
    does keystile when given none (option or ``KEYSTILE_KEYSHIELD_PEPPER``)."""
    monkeypatch.delenv("KEYSTILE_KEYSHIELD_PEPPER", raising=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using default pepper", UserWarning)
        minted = await mint_keyshield(tmp_path / "keyshield.db", None)
    source = f"sqlite:///{tmp_path / 'keyshield.db'}"
    await import_source(keystile_store, "keyshield", source_url=source, owner="acme")
    assert await statuses(legacy_app(keystile_store, ("keyshield",)), [minted["live"]]) == [200]
