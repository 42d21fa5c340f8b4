"""The audit log: one event per change, written in the change's own transaction, on every
store; events() and `keystile events --json`; changes reaching other processes; the
Postgres upgrade of a database made by the previous schema."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apps import client, protect
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, KeyStore, revoke_presented
from keystile.cli import main
from keystile.errors import DuplicateKeyName, StoreError
from keystile.hashing import SecretHasher
from keystile.stores import store_from_url
from keystile.stores.records import utcnow
from keystile.tokens import generate_key

pytestmark = pytest.mark.anyio

LIFECYCLE = ["created", "updated", "disabled", "enabled", "rotated", "created", "revoked"]


def manager(store: KeyStore, actor: str = "default-actor") -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS, actor=actor)


async def test_events_list_every_change_with_the_actor_passed(store: KeyStore) -> None:
    """created, updated, disabled, enabled, rotated (+ the successor) and revoked, in order."""
    keys = manager(store)
    created = await keys.create(owner="acme", name="ci", actor="alice@example.com")
    await keys.update(created.id, owner="acme", scopes=["items:read"], actor="bob")
    await keys.disable(created.id, owner="acme", actor="carol")
    await keys.enable(created.id, owner="acme", actor="carol")
    successor = await keys.rotate(created.id, owner="acme")
    await keys.revoke(created.id, owner="acme", actor="dave")
    events = await keys.events(owner="acme")
    assert [e.action for e in events] == LIFECYCLE
    assert [e.actor for e in events] == [
        "alice@example.com", "bob", "carol", "carol", "default-actor", "default-actor", "dave",
    ]  # fmt: skip
    assert events[1].detail == {"scopes": ["items:read"]}
    assert events[4].detail["replaced_by"] == successor.id and events[5].key_id == successor.id
    assert all(e.owner == "acme" and e.at.tzinfo is not None for e in events)


async def test_events_filter_by_owner_key_time_and_limit(store: KeyStore) -> None:
    """owner=, key_id= (display form too), since= and limit= narrow the log."""
    keys = manager(store)
    a = await keys.create(owner="acme", name="a")
    b = await keys.create(owner="acme", name="b")
    await keys.create(owner="globex", name="g")
    await keys.disable(a.id, owner="acme")
    assert len(await keys.events()) == 4
    assert [e.key_id for e in await keys.events(owner="acme")] == [a.id, b.id, a.id]
    assert [e.action for e in await keys.events(key_id=f"ks_{a.id}…")] == ["created", "disabled"]
    assert await keys.events(since=timedelta(0)) == []
    assert len(await keys.events(since=timedelta(hours=1))) == 4
    assert [e.action for e in await keys.events(owner="acme", limit=1)] == ["disabled"]


async def test_failed_change_writes_no_event(store: KeyStore) -> None:
    """A duplicate create or a rename onto a held name fails and records nothing."""
    keys = manager(store)
    await keys.create(owner="acme", name="taken")
    other = await keys.create(owner="acme", name="other")
    with pytest.raises(DuplicateKeyName):
        await keys.create(owner="acme", name="taken")
    with pytest.raises(DuplicateKeyName):
        await keys.update(other.id, owner="acme", name="taken")
    assert [e.action for e in await keys.events(owner="acme")] == ["created", "created"]
    assert (await keys.get(other.id, owner="acme")).name == "other"


async def test_replace_and_reap_are_recorded(store: KeyStore) -> None:
    """create(replace=True) records replaced + created; reap records reaped."""
    keys = manager(store)
    old = await keys.create(owner="acme", name="laptop")
    new = await keys.create(owner="acme", name="laptop", replace=True)
    await keys.reap(unused_for=timedelta(0), actor="reaper")
    events = [(e.key_id, e.action) for e in await keys.events(owner="acme")]
    assert events == [
        (old.id, "created"), (old.id, "replaced"), (new.id, "created"), (new.id, "reaped"),
    ]  # fmt: skip


async def test_events_hold_no_secret_or_hash(store: KeyStore) -> None:
    """No plaintext key, secret or hash appears in any event."""
    keys = manager(store)
    created = await keys.create(owner="acme", name="ci")
    rotated = await keys.rotate(created.id, owner="acme")
    await keys.update(rotated.id, owner="acme", metadata={"k": "v"}, ip_allowlist=["10.0.0.0/8"])
    text = json.dumps([e.to_dict() for e in await keys.events()])
    for record, plaintext in ((created.record, created.key), (rotated.record, rotated.key)):
        assert plaintext not in text and plaintext.rsplit("_", 1)[1][:43] not in text
        assert record.secret_hash not in text and "argon2" not in text


async def test_prune_events_deletes_only_older_ones(store: KeyStore) -> None:
    """prune_events(older_than=...) keeps recent events and deletes the rest."""
    keys = manager(store)
    await keys.create(owner="acme", name="ci")
    assert await keys.prune_events(older_than=timedelta(hours=1)) == 0
    assert [e.action for e in await keys.events()] == ["created", "pruned"]
    assert await keys.prune_events(older_than=timedelta(0)) == 2
    assert [e.action for e in await keys.events()] == ["pruned"]


async def test_logout_is_recorded_with_the_key_as_actor(store: KeyStore) -> None:
    """revoke_presented records a logout by apikey:<name>."""

    async def logout(request: Request) -> JSONResponse:
        return JSONResponse({"revoked": await revoke_presented(request)})

    app = APIKeyMiddleware(
        Starlette(routes=[Route("/logout", logout, methods=["POST"])]),
        store=store,
        argon2=CHEAPEST_PARAMETERS,
    )
    created = await manager(store).create(owner="acme", name="laptop")
    async with client(app) as http:
        answer = await http.post("/logout", headers={"X-API-Key": created.key})
    assert answer.json() == {"revoked": True}
    last = (await manager(store).events(key_id=created.id))[-1]
    assert (last.action, last.actor) == ("logout", "apikey:laptop")
    await app.aclose()


async def test_change_that_cannot_be_audited_does_not_happen_on_sqlite(
    sqlite_database_url: str,
) -> None:
    """SQLite: with the events table gone, a revoke fails and the key stays active."""
    await unauditable_revoke_changes_nothing(sqlite_database_url)


@pytest.mark.postgres
async def test_change_that_cannot_be_audited_does_not_happen_on_postgres(
    postgres_database_url: str,
) -> None:
    """Postgres: with the events table gone, a revoke fails and the key stays active."""
    await unauditable_revoke_changes_nothing(postgres_database_url)


async def unauditable_revoke_changes_nothing(database_url: str) -> None:
    store = store_from_url(database_url)
    keys = manager(store)
    await keys.open()
    try:
        created = await keys.create(owner="acme", name="ci")
        await drop_events_table(database_url)
        with pytest.raises(StoreError):
            await keys.revoke(created.id, owner="acme")
        assert (await keys.get(created.id, owner="acme")).status() == "active"
    finally:
        await keys.close()


async def drop_events_table(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        path = database_url[len("sqlite:///") :]
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE keystile_events")
        conn.commit()
        conn.close()
        return
    import asyncpg

    base, schema = database_url.split("?schema=")
    raw = await asyncpg.connect(base)
    try:
        await raw.execute(f'DROP TABLE "{schema}".keystile_events')
    finally:
        await raw.close()


# -- the CLI ---------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main(["--database-url", url, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_events_json_lists_each_change_with_the_actor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keystile events --json prints one object per change, with --actor or cli:<user>@<host>."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    _, out, _ = cli(capsys, url, "create", "--owner", "acme", "--name", "ci", "--json")
    key_id = json.loads(out)["id"]
    steps = [
        ("update", f"ks_{key_id}…", "--owner", "acme", "--scope", "items:read",
         "--ip-allow", "10.0.0.0/8", "--actor", "alice@example.com"),
        ("disable", key_id, "--owner", "acme", "--actor", "alice@example.com"),
        ("enable", key_id, "--owner", "acme", "--actor", "alice@example.com"),
        ("rotate", key_id, "--owner", "acme", "--actor", "alice@example.com"),
        ("revoke", key_id, "--owner", "acme", "--actor", "alice@example.com"),
    ]  # fmt: skip
    for step in steps:
        code, _, err = cli(capsys, url, *step)
        assert code == 0, err
    code, out, _ = cli(capsys, url, "events", "--owner", "acme", "--since", "1h", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["action"] for e in lines] == LIFECYCLE
    assert lines[0]["actor"].startswith("cli:") and "@" in lines[0]["actor"]
    assert {e["actor"] for e in lines[1:]} == {"alice@example.com"}
    assert lines[1]["detail"] == {"ip_allowlist": ["10.0.0.0/8"], "scopes": ["items:read"]}
    code, out, _ = cli(capsys, url, "events", "--key", key_id, "--json")
    assert {json.loads(line)["key_id"] for line in out.splitlines()} == {key_id}


# -- across processes -------------------------------------------------------------------


def run_cli(url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keystile.cli", "--database-url", url, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def scopes_reach_a_running_app_from_another_process(url: str) -> None:
    async with manager(store_from_url(url)) as keys:
        created = await keys.create(owner="acme", name=f"k-{uuid.uuid4().hex[:8]}", scopes=["read"])
    store = store_from_url(url)
    app = protect(store, cache_ttl=3600)
    async with client(app) as http:
        headers = {"X-API-Key": created.key}
        assert (await http.get("/write", headers=headers)).status_code == 403
        if url.startswith("postgresql"):
            with anyio.fail_after(10):
                while not app.store._listening:  # type: ignore[attr-defined]
                    await anyio.sleep(0.02)
        done = await anyio.to_thread.run_sync(
            lambda: run_cli(url, "update", created.id, "--owner", "acme", "--scope", "write")
        )
        assert done.returncode == 0, done.stderr
        with anyio.fail_after(10):
            while (await http.get("/write", headers=headers)).status_code != 200:
                await anyio.sleep(0.05)
    await app.aclose()
    await store.close()


async def test_scope_update_in_another_process_arrives_by_the_sqlite_change_log(
    sqlite_database_url: str,
) -> None:
    """keystile update --scope in a child process reaches a running app (SQLite change log)."""
    await scopes_reach_a_running_app_from_another_process(sqlite_database_url)


@pytest.mark.postgres
async def test_scope_update_in_another_process_arrives_by_notify(
    postgres_database_url: str,
) -> None:
    """keystile update --scope in a child process reaches a running app (Postgres NOTIFY)."""
    await scopes_reach_a_running_app_from_another_process(postgres_database_url)


# -- the Postgres upgrade --------------------------------------------------------------


@pytest.mark.postgres
async def test_database_of_the_previous_schema_upgrades_in_place(
    postgres_database_url: str,
) -> None:
    """A schema made by migrations 1-2 with a key in it: opened, it upgrades and the key works."""
    import asyncpg

    from keystile.stores.postgres.schema import MIGRATIONS

    base, schema = postgres_database_url.split("?schema=")
    plaintext, parsed = generate_key()
    secret_hash = SecretHasher(CHEAPEST_PARAMETERS).hash(parsed.secret)
    raw = await asyncpg.connect(base)
    try:
        await raw.execute(f'CREATE SCHEMA "{schema}"')
        await raw.execute(
            f'CREATE TABLE "{schema}".keystile_migrations'
            " (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, script in enumerate(MIGRATIONS[:2], start=1):
            await raw.execute(script.format(schema=f'"{schema}"'))
            await raw.execute(
                f'INSERT INTO "{schema}".keystile_migrations (version) VALUES ($1)',  # noqa: S608
                version,
            )
        await raw.execute(
            f'INSERT INTO "{schema}".keystile_keys'  # noqa: S608
            " (id, owner, name, prefix, secret_hash, scopes, created_at)"
            " VALUES ($1, 'acme', 'old', 'ks', $2, ARRAY['read'], now())",
            parsed.key_id,
            secret_hash,
        )
        store = store_from_url(postgres_database_url)
        app = protect(store)
        async with client(app) as http:
            answer = await http.get("/whoami", headers={"X-API-Key": plaintext})
        assert answer.status_code == 200 and answer.json()["key_id"] == parsed.key_id
        keys = manager(store_from_url(postgres_database_url))
        async with keys:
            await keys.disable(parsed.key_id, owner="acme", actor="upgrade-test")
            assert [e.action for e in await keys.events()] == ["disabled"]
        await app.aclose()
        await store.close()
        versions = await raw.fetch(
            f'SELECT version FROM "{schema}".keystile_migrations'  # noqa: S608
        )
        assert sorted(r[0] for r in versions) == list(range(1, len(MIGRATIONS) + 1))
    finally:
        await raw.close()


# -- pruning is recorded -----------------------------------------------------------------


async def test_prune_records_a_pruned_event_that_survives_it(store: KeyStore) -> None:
    """prune_events writes `pruned` (actor, cutoff, count), which that prune keeps."""
    keys = manager(store)
    await keys.create(owner="acme", name="a")
    await keys.create(owner="acme", name="b")
    last_id = (await keys.events())[-1].id
    before = utcnow()
    assert await keys.prune_events(older_than=timedelta(0), actor="ops@example.com") == 2
    [pruned] = await keys.events()
    assert (pruned.action, pruned.actor, pruned.key_id, pruned.owner) == (
        "pruned", "ops@example.com", "", "",
    )  # fmt: skip
    assert pruned.detail["count"] == 2 and pruned.id > last_id
    assert pruned.at > before - timedelta(milliseconds=1)
    assert before <= datetime.fromisoformat(pruned.detail["cutoff"]) <= utcnow()
    assert await keys.prune_events(older_than=timedelta(hours=1)) == 0
    events = await keys.events()
    assert [(e.action, e.actor, e.detail["count"]) for e in events] == [
        ("pruned", "ops@example.com", 2),
        ("pruned", "default-actor", 0),
    ]
    assert events[0].id < events[1].id


async def test_prune_that_cannot_be_recorded_deletes_nothing_on_sqlite(
    sqlite_database_url: str,
) -> None:
    """SQLite: when the `pruned` event cannot be written, no event is deleted."""
    await unrecordable_prune_deletes_nothing(sqlite_database_url)


@pytest.mark.postgres
async def test_prune_that_cannot_be_recorded_deletes_nothing_on_postgres(
    postgres_database_url: str,
) -> None:
    """Postgres: when the `pruned` event cannot be written, no event is deleted."""
    await unrecordable_prune_deletes_nothing(postgres_database_url)


async def unrecordable_prune_deletes_nothing(database_url: str) -> None:
    keys = manager(store_from_url(database_url))
    async with keys:
        await keys.create(owner="acme", name="ci")
        await refuse_pruned_events(database_url)
        with pytest.raises(StoreError):
            await keys.prune_events(older_than=timedelta(0))
        assert [e.action for e in await keys.events()] == ["created"]


async def refuse_pruned_events(database_url: str) -> None:
    """Make the database refuse any `pruned` event, as a full disk or a bad grant would."""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(database_url[len("sqlite:///") :])
        conn.execute(
            "CREATE TRIGGER no_pruned BEFORE INSERT ON keystile_events"
            " WHEN NEW.action = 'pruned' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        conn.commit()
        conn.close()
        return
    import asyncpg

    base, schema = database_url.split("?schema=")
    raw = await asyncpg.connect(base)
    try:
        await raw.execute(
            f'ALTER TABLE "{schema}".keystile_events'
            " ADD CONSTRAINT no_pruned CHECK (action <> 'pruned')"
        )
    finally:
        await raw.close()


def test_cli_prune_is_listed_by_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keystile events --prune-older-than records a `pruned` event that --json lists."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cli(capsys, url, "create", "--owner", "acme", "--name", "ci")
    code, _, err = cli(capsys, url, "events", "--prune-older-than", "1h")
    assert code == 0 and "pruned 0 event(s)" in err
    code, out, _ = cli(capsys, url, "events", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["action"] for e in lines] == ["created", "pruned"]
    assert lines[1]["actor"].startswith("cli:") and lines[1]["detail"]["count"] == 0


# -- what a key was created with ---------------------------------------------------------


async def test_created_event_records_what_the_key_was_created_with(store: KeyStore) -> None:
    """scopes, expiry, rate limit, quota, allowlist and the metadata's keys (not values)."""
    keys = manager(store)
    created = await keys.create(
        owner="acme", name="ci", scopes=["items:read", "items:write"],
        expires_in=timedelta(days=30), rate_limit="10/s", quota=1000, quota_refill="1d",
        ip_allowlist=["10.0.0.0/8", "2001:db8::/32"],
        metadata={"team": "infra-value", "ticket": "value-4242"},
    )  # fmt: skip
    record = created.record
    assert record.expires_at is not None
    expected = {
        "name": "ci",
        "scopes": ["items:read", "items:write"],
        "expires_at": record.expires_at.isoformat(),
        "rate_limit": "10/second",
        "quota": 1000,
        "quota_refill": 86400.0,
        "ip_allowlist": ["10.0.0.0/8", "2001:db8::/32"],
        "metadata_keys": ["team", "ticket"],
    }
    [event] = await keys.events(key_id=created.id)
    assert event.action == "created" and dict(event.detail) == expected
    assert_holds_no_secret(event.to_dict(), created.key, record.secret_hash)
    assert "infra-value" not in json.dumps(event.to_dict())
    successor = await keys.rotate(created.id, owner="acme")
    created_again = (await keys.events(key_id=successor.id))[0]
    assert created_again.action == "created"
    assert created_again.detail["replaces"] == created.id
    assert created_again.detail["ip_allowlist"] == expected["ip_allowlist"]
    assert created_again.detail["metadata_keys"] == ["team", "ticket"]
    assert_holds_no_secret(created_again.to_dict(), successor.key, successor.record.secret_hash)


async def test_created_event_of_a_plain_key_names_no_limits(store: KeyStore) -> None:
    """A key made with nothing but a name records empty scopes, no expiry and no limits."""
    created = await manager(store).create(owner="acme", name="plain")
    [event] = await manager(store).events(key_id=created.id)
    assert dict(event.detail) == {
        "name": "plain", "scopes": [], "expires_at": None, "rate_limit": None, "quota": None,
        "quota_refill": None, "ip_allowlist": [], "metadata_keys": [],
    }  # fmt: skip


def assert_holds_no_secret(event: dict[str, Any], plaintext: str, secret_hash: str) -> None:
    text = json.dumps(event)
    secret = plaintext.rsplit("_", 1)[1]
    for needle in (plaintext, secret, secret[:16], secret_hash, secret_hash.rsplit("$", 1)[1]):
        assert needle not in text
    assert "argon2" not in text


def test_cli_events_json_shows_what_a_key_was_created_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keystile events --json shows the created event's limits, allowlist and metadata keys."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    code, out, _ = cli(
        capsys, url, "create", "--owner", "acme", "--name", "ci", "--scope", "read",
        "--rate-limit", "5/minute", "--quota", "7", "--ip-allow", "10.0.0.0/8",
        "--metadata", "team=hidden-value", "--json",
    )  # fmt: skip
    assert code == 0
    plaintext = json.loads(out)["key"]
    code, out, _ = cli(capsys, url, "events", "--json")
    [event] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and event["action"] == "created"
    assert event["detail"] == {
        "name": "ci", "scopes": ["read"], "expires_at": None, "rate_limit": "5/minute",
        "quota": 7, "quota_refill": None, "ip_allowlist": ["10.0.0.0/8"],
        "metadata_keys": ["team"],
    }  # fmt: skip
    assert plaintext not in out and plaintext.rsplit("_", 1)[1] not in out
    assert "hidden-value" not in out and "argon2" not in out
