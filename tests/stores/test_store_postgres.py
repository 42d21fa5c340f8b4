"""Postgres-only behaviour of ``PostgresKeyStore``, against a real server.

The contract every store shares is tested in ``test_stores.py``; here: migrations under
concurrency, the one-statement batched touch, NOTIFY across processes, the listener's
reconnect, race-free replace, and how outages surface.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import asyncpg
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import keystile.stores
from keystile.errors import ConfigurationError, DuplicateKeyName, StoreError
from keystile.stores import KeyRecord, store_from_url
from keystile.stores.postgres import (
    LISTENER_APPLICATION_NAME,
    POOL_APPLICATION_NAME,
    PostgresKeyStore,
)
from keystile.stores.postgres.schema import MIGRATIONS
from pgtools import count_update_statements, split_url, update_statements

pytestmark = pytest.mark.postgres

T = TypeVar("T")

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def record(owner: str = "alice", name: str = "laptop", **changes: Any) -> KeyRecord:
    fields: dict[str, Any] = {
        "id": uuid.uuid4().hex[:16],
        "owner": owner,
        "name": name,
        "prefix": "ks",
        "secret_hash": "$argon2id$fake",
        "created_at": NOW,
    }
    fields.update(changes)
    return KeyRecord(**fields)


def open_store(url: str, **options: Any) -> PostgresKeyStore:
    store = store_from_url(url, **options)
    assert isinstance(store, PostgresKeyStore)
    return store


@pytest.fixture
async def raw(postgres_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database, for looking behind the store."""
    dsn, _ = split_url(postgres_database_url)
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def pg_store(postgres_database_url: str) -> AsyncIterator[PostgresKeyStore]:
    store = open_store(postgres_database_url, listen_reconnect_max=0.5)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class Heard:
    """What a subscriber received, with arrival times (``time.time()``)."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, float]] = []

    def __call__(self, key_id: str | None) -> None:
        self.events.append((key_id, time.time()))

    def ids(self) -> list[str | None]:
        return [key_id for key_id, _ in self.events]

    async def wait_for(self, key_id: str | None, timeout: float = 5.0) -> float:
        with anyio.fail_after(timeout):
            while True:
                for seen, at in self.events:
                    if seen == key_id:
                        return at
                await anyio.sleep(0.005)


async def until_listening(raw: asyncpg.Connection, store: PostgresKeyStore, heard: Heard) -> None:
    """Ping the store's channel until its listener relays a ping: from then on it listens."""
    token = f"ping-{uuid.uuid4().hex}"
    with anyio.fail_after(5):
        while token not in heard.ids():
            await raw.execute("SELECT pg_notify($1, $2)", store.channel, token)
            await anyio.sleep(0.02)


# -- migrations ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_migrations_are_versioned_and_idempotent_under_concurrency(
    postgres_database_url: str, raw: asyncpg.Connection
) -> None:
    """Stores opening at once and reopening apply every migration exactly once, in order."""
    _, schema = split_url(postgres_database_url)
    stores = [open_store(postgres_database_url) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for s in stores:
            tg.start_soon(s.open)
    for s in stores:
        await s.close()
    await stores[0].open()
    await stores[0].close()
    rows = await raw.fetch(f'SELECT version FROM "{schema}".keystile_migrations')  # noqa: S608
    versions = sorted(row["version"] for row in rows)
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert len(versions) >= 2


# -- batched touches ----------------------------------------------------------------


@pytest.mark.anyio
async def test_touch_many_is_one_update_statement_that_never_moves_backwards(
    postgres_database_url: str, pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """touch_many of 60 keys fires one statement-level UPDATE; GREATEST keeps the latest."""
    _, schema = split_url(postgres_database_url)
    never = [record(name=f"never-{i}") for i in range(20)]
    older = [record(name=f"older-{i}", last_used_at=NOW) for i in range(20)]
    newer = [record(name=f"newer-{i}", last_used_at=NOW) for i in range(20)]
    for r in never + older + newer:
        await pg_store.insert(r)
    await count_update_statements(raw, schema)
    later, earlier = NOW + timedelta(minutes=5), NOW - timedelta(hours=1)
    touches = {r.id: later for r in never + newer} | {r.id: earlier for r in older}

    await pg_store.touch_many(touches)

    assert await update_statements(raw, schema) == 1
    found = await pg_store.get_many(list(touches))
    assert {found[r.id].last_used_at for r in never + newer} == {later}
    assert {found[r.id].last_used_at for r in older} == {NOW}


# -- NOTIFY -------------------------------------------------------------------------

_REVOKER = """
import asyncio, json, sys, time
from keystile.stores import store_from_url

async def main():
    store = store_from_url(sys.argv[1])
    await store.open()
    print("ready", flush=True)
    for line in sys.stdin:
        owner, key_id = line.split()
        t0 = time.time()
        ok = await store.revoke(key_id, owner, at=datetime.now(timezone.utc))
        t1 = time.time()
        print(json.dumps({"ok": ok, "t0": t0, "t1": t1}), flush=True)
    await store.close()

from datetime import datetime, timezone
asyncio.run(main())
"""


@pytest.mark.anyio
async def test_revoke_in_another_process_reaches_a_watching_store(
    postgres_database_url: str, pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """A revoke committed by another OS process reaches this store's subscribers by NOTIFY."""
    keys = [record(name=f"k{i}") for i in range(20)]
    for r in keys:
        await pg_store.insert(r)
    heard = Heard()
    pg_store.subscribe(heard)
    src = str(Path(keystile.stores.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    latencies: list[float] = []  # revoke() called in the other process -> heard here
    after_commit: list[float] = []  # revoke() returned there -> heard here (may be < 0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg_store.watch)
        await until_listening(raw, pg_store, heard)
        async with await anyio.open_process(
            [sys.executable, "-c", _REVOKER, postgres_database_url], env=env
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            lines = BufferedByteReceiveStream(proc.stdout)
            with anyio.fail_after(30):
                assert await lines.receive_until(b"\n", 4096) == b"ready"
            for r in keys:
                await proc.stdin.send(f"{r.owner} {r.id}\n".encode())
                arrived = await heard.wait_for(r.id, timeout=30.0)
                with anyio.fail_after(5):
                    reply = json.loads(await lines.receive_until(b"\n", 4096))
                assert reply["ok"] is True
                latencies.append(arrived - reply["t0"])
                after_commit.append(arrived - reply["t1"])
            await proc.stdin.aclose()
            with anyio.fail_after(10):
                assert await proc.wait() == 0
        tg.cancel_scope.cancel()
    ms = [x * 1000 for x in latencies]
    ms_after = [x * 1000 for x in after_commit]
    print(
        f"\nNOTIFY across processes, n={len(ms)}: revoke() called -> subscriber "
        f"median {statistics.median(ms):.2f} ms, worst {max(ms):.2f} ms; "
        f"revoke() returned -> subscriber median {statistics.median(ms_after):.2f} ms, "
        f"worst {max(ms_after):.2f} ms"
    )


@pytest.mark.anyio
async def test_listener_reconnects_after_its_backend_is_terminated(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """A killed LISTEN connection is replaced, ``None`` is published, and NOTIFY flows again."""
    heard = Heard()
    pg_store.subscribe(heard)
    app_name = pg_store.application_name(LISTENER_APPLICATION_NAME)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg_store.watch)
        await until_listening(raw, pg_store, heard)
        assert None not in heard.ids()
        before = await raw.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        assert await raw.fetchval("SELECT pg_terminate_backend($1, 5000)", before)

        await heard.wait_for(None, timeout=5.0)
        await until_listening(raw, pg_store, heard)
        after = await raw.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        tg.cancel_scope.cancel()
    assert [row["pid"] for row in after] != [before]
    assert len(after) == 1


@pytest.mark.anyio
async def test_first_listen_after_reads_resets_subscribers(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """Keys read before the listener was up (as when Postgres was down at startup) are
    reset by its first connect: a change notified meanwhile was heard by nobody."""
    heard = Heard()
    pg_store.subscribe(heard)
    await pg_store.get("AbC123def456")
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg_store.watch)
        await until_listening(raw, pg_store, heard)
        tg.cancel_scope.cancel()
    assert heard.ids()[0] is None


@pytest.mark.anyio
async def test_revoke_unheard_before_the_first_listen_takes_effect(
    postgres_database_url: str, raw: asyncpg.Connection
) -> None:
    """A key cached before LISTEN was up and revoked unheard is refused once LISTEN is up."""
    from keystile import CHEAPEST_PARAMETERS, KeyManager
    from keystile.errors import InvalidToken
    from keystile.hashing import SecretHasher
    from keystile.verifier import Verifier

    async with KeyManager.from_url(postgres_database_url, argon2=CHEAPEST_PARAMETERS) as manager:
        created = await manager.create(owner="acme", name="ci")
    store = open_store(postgres_database_url)
    verifier = Verifier(store, hasher=SecretHasher(CHEAPEST_PARAMETERS), cache_ttl=3600)
    store.subscribe(verifier.on_change)
    heard = Heard()
    store.subscribe(heard)
    try:
        await verifier.verify(created.key.encode())  # cached; nobody listens yet
        _, schema = split_url(postgres_database_url)
        await raw.execute(
            f'UPDATE "{schema}".keystile_keys SET revoked_at = now() WHERE id = $1',  # noqa: S608
            created.id,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.watch)
            await until_listening(raw, store, heard)
            with pytest.raises(InvalidToken) as refused:
                await verifier.verify(created.key.encode())
            tg.cancel_scope.cancel()
        assert refused.value.reason == "revoked"
    finally:
        await store.close()


@pytest.mark.anyio
async def test_watch_closes_its_connection_when_cancelled(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """Cancelling watch() leaves no listener connection behind."""
    heard = Heard()
    pg_store.subscribe(heard)
    app_name = pg_store.application_name(LISTENER_APPLICATION_NAME)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg_store.watch)
        await until_listening(raw, pg_store, heard)
        tg.cancel_scope.cancel()
    with anyio.fail_after(5):
        while await raw.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
        ):
            await anyio.sleep(0.01)


# -- race-free replace --------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_replaces_leave_exactly_one_active_key(
    pg_store: PostgresKeyStore,
) -> None:
    """Two concurrent insert(replace=True) for one (owner, name), ten times over: one active."""
    for i in range(10):
        await pg_store.insert(record(owner=f"owner-{i}"))

    async def replace(owner: str) -> None:
        await pg_store.insert(record(owner=owner), replace=True)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(replace, f"owner-{i}")
            tg.start_soon(replace, f"owner-{i}")
    for i in range(10):
        keys = await pg_store.list_keys(f"owner-{i}")
        active = [k for k in keys if k.is_active()]
        assert len(keys) == 3
        assert len(active) == 1
        revoked = [k for k in keys if not k.is_active()]
        assert {k.replaced_by for k in revoked} <= {k.id for k in keys}


@pytest.mark.anyio
async def test_concurrent_inserts_without_replace_let_one_win(
    pg_store: PostgresKeyStore,
) -> None:
    """Two concurrent inserts of one (owner, name) without replace: one wins, one clashes."""
    outcomes: list[str] = []

    async def attempt() -> None:
        try:
            await pg_store.insert(record(owner="bob"))
            outcomes.append("inserted")
        except DuplicateKeyName:
            outcomes.append("duplicate")

    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt)
        tg.start_soon(attempt)
    assert sorted(outcomes) == ["duplicate", "inserted"]


# -- outages ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unreachable_server_raises_store_error_without_the_password() -> None:
    """A closed port fails open() and get() fast with StoreError, never showing the password."""
    store = open_store("postgresql://postgres:s3cret@127.0.0.1:1/test", connect_timeout=1.0)
    assert "s3cret" not in store.display_url
    assert "***" in store.display_url
    assert "s3cret" not in repr(store)
    for call in (store.open, lambda: store.get("abc")):
        with anyio.fail_after(30), pytest.raises(StoreError) as caught:
            await call()
        assert "s3cret" not in str(caught.value)
    await store.close()


@pytest.mark.anyio
async def test_silent_server_is_bounded_by_connect_timeout() -> None:
    """A server that accepts but never answers fails open() within the connect timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        store = open_store(
            f"postgresql://postgres:s3cret@127.0.0.1:{port}/test", connect_timeout=0.3
        )
        with anyio.fail_after(30), pytest.raises(StoreError) as caught:
            await store.open()
        assert "s3cret" not in str(caught.value)
    finally:
        sock.close()


@pytest.mark.anyio
async def test_store_down_at_open_recovers_when_the_database_is_reachable(
    postgres_database_url: str,
) -> None:
    """A failed open() leaves the store usable: later calls connect and migrate lazily."""
    store = open_store(postgres_database_url)
    real_dsn = store._dsn
    store._dsn = "postgresql://postgres@127.0.0.1:1/test"
    with pytest.raises(StoreError):
        await store.open()
    store._dsn = real_dsn
    try:
        await store.insert(record())
        assert [k.name for k in await store.list_keys("alice")] == ["laptop"]
    finally:
        await store.close()


@pytest.mark.anyio
async def test_terminated_pool_connections_are_replaced(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """After every pooled backend is killed, get() works again (or, at worst, StoreError)."""
    r = record()
    await pg_store.insert(r)
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(pg_store.get, r.id)
    killed = await raw.fetchval(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE application_name = $1",
        pg_store.application_name(POOL_APPLICATION_NAME),
    )
    assert killed >= 1
    results: list[KeyRecord | StoreError | None] = []
    for _ in range(5):
        try:
            results.append(await pg_store.get(r.id))
        except StoreError as exc:
            results.append(exc)
    assert all(isinstance(x, (KeyRecord, StoreError)) for x in results)
    assert results[-1] == r


@pytest.mark.anyio
async def test_writes_fail_with_store_error_when_the_pool_connections_die(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """A non-idempotent write on a killed connection raises StoreError, never anything else."""
    r = record()
    await pg_store.insert(r)
    await raw.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = $1",
        pg_store.application_name(POOL_APPLICATION_NAME),
    )
    try:
        revoked = await pg_store.revoke(r.id, r.owner, at=NOW)
    except StoreError:
        revoked = await pg_store.revoke(r.id, r.owner, at=NOW)
    assert revoked is True


@pytest.mark.anyio
async def test_store_follows_a_new_event_loop(postgres_database_url: str) -> None:
    """Each asyncio.run() gets a pool of its own loop (TestClient without ``with``)."""
    store = open_store(postgres_database_url)
    r = record()

    async def in_fresh_loop(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return await anyio.to_thread.run_sync(lambda: asyncio.run(fn()))

    async def get_and_close() -> KeyRecord | None:
        try:
            return await store.get(r.id)
        finally:
            await store.close()

    await in_fresh_loop(store.open)
    await in_fresh_loop(functools.partial(store.insert, r))
    assert await in_fresh_loop(functools.partial(store.get, r.id)) == r
    assert await in_fresh_loop(get_and_close) == r


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize("schema", ["", "1abc", "a-b", 'x"; DROP TABLE y; --', "a" * 64])
def test_invalid_schema_names_are_refused(schema: str) -> None:
    """Schema names that are not plain identifiers raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        PostgresKeyStore("postgresql://u@h/db", schema=schema or "-")
    with pytest.raises(ConfigurationError):
        PostgresKeyStore(f"postgresql://u@h/db?schema={schema or '-'}")


def test_schema_comes_from_url_and_the_keyword_wins() -> None:
    """``?schema=`` is read and stripped from the DSN; the keyword overrides it."""
    from_url = PostgresKeyStore("postgres://u:pw@h:5433/db?schema=tenant_a&sslmode=disable")
    assert from_url.schema == "tenant_a"
    assert "schema" not in from_url._dsn
    assert "sslmode=disable" in from_url._dsn
    assert from_url.channel == "keystile_changes__tenant_a"
    assert from_url.display_url == "postgres://u:***@h:5433/db?schema=tenant_a&sslmode=disable"
    assert PostgresKeyStore("postgresql://u@h/db?schema=a", schema="b").schema == "b"
    assert PostgresKeyStore("postgresql://u@h/db").channel == "keystile_changes"
    assert len(PostgresKeyStore("postgresql://u@h/db", schema="s" * 63).channel) <= 63


@pytest.mark.anyio
async def test_every_state_change_notifies_its_key_ids(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """revoke, insert(replace=True), rotate and reap each NOTIFY the ids they changed."""
    payloads: list[str] = []
    await raw.add_listener(pg_store.channel, lambda *args: payloads.append(args[3]))

    async def heard(*key_ids: str) -> None:
        with anyio.fail_after(5):
            while sorted(payloads) != sorted(key_ids):
                await anyio.sleep(0.005)
        payloads.clear()

    first, second = record(name="a"), record(name="b")
    await pg_store.insert(first)
    await pg_store.insert(second)
    with pytest.raises(DuplicateKeyName):
        await pg_store.insert(record(name="a"))
    await pg_store.update_hash(first.id, "$argon2id$new")
    await pg_store.touch_many({first.id: NOW})
    assert await pg_store.revoke(second.id, "alice", at=NOW)
    await heard(second.id)  # nothing from the inserts, the refused clash or the touches

    replacement = record(name="a")
    assert await pg_store.insert(replacement, replace=True) == [first.id]
    await heard(first.id)

    successor = record(name="a")
    assert await pg_store.rotate(replacement.id, "alice", successor, grace_until=NOW) is not None
    await heard(replacement.id)

    assert await pg_store.reap(unused_since=NOW, at=NOW, dry_run=True) != []
    reaped = await pg_store.reap(unused_since=NOW + timedelta(days=1), at=NOW, dry_run=False)
    await heard(*[r.id for r in reaped])
    assert {r.id for r in reaped} == {successor.id, replacement.id}  # unused; expired


@pytest.mark.anyio
async def test_watch_keeps_retrying_while_the_server_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """watch() survives repeated connection failures and logs the streak once, no password."""
    attempts = 0

    async def refuse(client: anyio.abc.SocketStream) -> None:
        nonlocal attempts
        attempts += 1
        await client.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - not Django
    store = open_store(
        f"postgresql://postgres:s3cret@127.0.0.1:{port}/test",
        connect_timeout=0.5,
        listen_reconnect_max=0.05,
    )
    caplog.set_level("INFO", logger="keystile.postgres")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, refuse)
        tg.start_soon(store.watch)
        with anyio.fail_after(5):
            while attempts < 5:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.name == "keystile.postgres"]
    assert len(warnings) == 1
    assert "s3cret" not in warnings[0].getMessage()


@pytest.mark.anyio
async def test_a_connection_released_inside_a_transaction_comes_back_clean(
    pg_store: PostgresKeyStore,
) -> None:
    """asyncpg's own rollback still runs: a transaction left open does not leak into the
    next borrower."""
    pool = await pg_store._get_pool()
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("CREATE TEMP TABLE leftover (x int)")
    for _ in range(pool.get_max_size()):
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.leftover')") is None


def reader_pid(store: PostgresKeyStore) -> int:
    """The backend of the connection the store keeps for key reads."""
    assert store._reader is not None
    return int(store._reader.conn.get_server_pid())


async def read_through_the_reader(store: PostgresKeyStore) -> tuple[KeyRecord, int]:
    """A key inserted and read back: the record, and the reader's backend."""
    r = record()
    await store.insert(r)
    assert await store.get(r.id) == r
    return r, reader_pid(store)


async def backend_gone(raw: asyncpg.Connection, pid: int) -> bool:
    """Whether Postgres has let go of backend ``pid``, waiting for it up to 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not await raw.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.anyio
async def test_key_reads_take_one_connection_and_no_reset_round_trip(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """A miss's read is its statement alone: the reader stays checked out between reads,
    so no pool reset (``RESET ALL``) follows it."""
    r, pid = await read_through_the_reader(pg_store)
    for _ in range(5):
        assert await pg_store.get(r.id) == r
        assert await pg_store.get_many([r.id, "nobody"]) == {r.id: r}
    assert reader_pid(pg_store) == pid
    last = await raw.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
    assert "RESET ALL" not in last and "WHERE id = ANY" in last


@pytest.mark.anyio
async def test_a_killed_reader_costs_a_retry_not_a_failed_read(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    r, pid = await read_through_the_reader(pg_store)
    assert await raw.fetchval("SELECT pg_terminate_backend($1)", pid)
    assert await backend_gone(raw, pid)
    assert await pg_store.get(r.id) == r
    assert await pg_store.get(r.id) == r
    assert reader_pid(pg_store) != pid


@pytest.mark.anyio
async def test_a_read_cancelled_mid_statement_leaves_no_backend_behind(
    pg_store: PostgresKeyStore, raw: asyncpg.Connection
) -> None:
    """A read waiting on a lock is cancelled: its connection is closed, not handed on with
    a statement still running, and the next read gets a new one."""
    r, pid = await read_through_the_reader(pg_store)
    table = f'"{pg_store.schema}".keystile_keys'
    async with raw.transaction():
        await raw.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with anyio.move_on_after(0.3) as scope:
            await pg_store.get(r.id)
        assert scope.cancelled_caught
    assert await backend_gone(raw, pid)
    assert await pg_store.get(r.id) == r
    assert reader_pid(pg_store) != pid


@pytest.mark.anyio
async def test_reads_at_once_are_each_answered_with_their_own_record(
    pg_store: PostgresKeyStore,
) -> None:
    """More reads than the one reader: the rest take the pool, and none gets another's."""
    records = [record(name=f"k{i}") for i in range(40)]
    for r in records:
        await pg_store.insert(r)
    found = await asyncio.gather(*(pg_store.get(r.id) for r in records))
    assert found == records


@pytest.mark.anyio
async def test_close_gives_the_reader_back_and_leaves_no_connection(
    postgres_database_url: str, raw: asyncpg.Connection
) -> None:
    store = open_store(postgres_database_url)
    await store.open()
    _, pid = await read_through_the_reader(store)
    with anyio.fail_after(10):
        await store.close()
    assert store._reader is None
    assert await backend_gone(raw, pid)


@pytest.mark.anyio
async def test_concurrent_flushes_of_the_same_keys_never_deadlock(
    postgres_database_url: str,
) -> None:
    """Workers flushing the same keys at once, each in its own order, lock them in one
    order: no flush fails with a deadlock and has to be retried."""
    stores = [open_store(postgres_database_url) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        keys = [record(name=f"busy-{i}") for i in range(300)]
        for r in keys:
            await stores[0].insert(r)
        await stores[0].touch_many({r.id: NOW for r in keys})
        errors: list[BaseException] = []

        async def flush(store: PostgresKeyStore, order: list[KeyRecord], at: datetime) -> None:
            try:
                await store.touch_many({r.id: at for r in order})
            except StoreError as exc:
                errors.append(exc)

        for round_ in range(15):
            at = NOW + timedelta(seconds=round_)
            async with anyio.create_task_group() as tg:
                tg.start_soon(flush, stores[0], keys, at)
                tg.start_soon(flush, stores[1], keys[::-1], at)
                tg.start_soon(flush, stores[2], keys[150:] + keys[:150], at)
        assert errors == []
        found = await stores[0].get_many([r.id for r in keys])
        assert {found[r.id].last_used_at for r in keys} == {NOW + timedelta(seconds=14)}
    finally:
        for store in stores:
            await store.close()
