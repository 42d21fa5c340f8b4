"""Per-key usage: requests and refused attempts counted per minute, written with the
batched flush on every store, read back (rolled up) through KeyManager.usage and the CLI,
and deleted after the retention period."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from apps import client, protect
from keystile import CHEAPEST_PARAMETERS, KeyManager, KeyNotFound, KeyStore, StoreError, UsageBucket
from keystile.cli import main as cli
from keystile.stores import store_from_url
from keystile.tokens import generate_key
from keystile.usage import UsageRecorder

pytestmark = pytest.mark.anyio


async def mint(store: KeyStore, owner: str = "acme") -> tuple[str, str]:
    async with KeyManager(store, argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner=owner, name=f"k-{uuid.uuid4().hex[:8]}")
        return created.key, created.id


def wrong_secret(key_id: str) -> str:
    """A well-formed key (valid checksum) for ``key_id`` whose secret does not match."""
    return generate_key(key_id=key_id)[0]


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(0.02)


def totals(buckets: list[UsageBucket]) -> tuple[int, int]:
    return sum(b.requests for b in buckets), sum(b.rejected for b in buckets)


async def send_traffic(database_url: str) -> tuple[str, str]:
    """25 requests with key A, 7 with key B, 4 wrong secrets for A (distinct and repeated),
    2 unknown key ids, through the real middleware; flushed. Returns (A id, B id)."""
    store = store_from_url(database_url)
    await store.open()
    key_a, id_a = await mint(store)
    key_b, id_b = await mint(store)
    app = protect(store, flush_interval=3600)
    async with client(app) as http:
        for _ in range(25):
            assert (await http.get("/whoami", headers={"X-API-Key": key_a})).status_code == 200
        for _ in range(7):
            assert (await http.get("/whoami", headers={"X-API-Key": key_b})).status_code == 200
        bad = wrong_secret(id_a)
        for presented in (bad, bad, bad, wrong_secret(id_a)):
            assert (await http.get("/whoami", headers={"X-API-Key": presented})).status_code == 401
        unknown_key = generate_key()[0]
        assert (await http.get("/whoami", headers={"X-API-Key": unknown_key})).status_code == 401
        assert (await http.get("/whoami", headers={"X-API-Key": "ks_garbage"})).status_code == 401
    await app.recorder.flush()
    await app.aclose()
    await store.close()
    return id_a, id_b


async def test_requests_and_rejections_read_back_per_key(database_url: str) -> None:
    """25 with A, 7 with B and 4 wrong secrets for A read back as 25/4 and 7/0."""
    id_a, id_b = await send_traffic(database_url)
    async with KeyManager(store_from_url(database_url)) as keys:
        a = await keys.usage(id_a, owner="acme", since=timedelta(hours=1))
        b = await keys.usage(id_b, owner="acme", since=timedelta(hours=1), by="hour")
        top = await keys.top_keys("acme", since=timedelta(hours=1), limit=10)
    assert totals(a) == (25, 4)
    assert totals(b) == (7, 0)
    assert [(t.key_id, t.requests, t.rejected) for t in top] == [(id_a, 25, 4), (id_b, 7, 0)]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """The CLI in a thread of its own (outside the test runner's event loop)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return cli(list(argv))

    with ThreadPoolExecutor(1) as thread:
        code = thread.submit(call).result()
    return code, out.getvalue(), err.getvalue()


async def test_cli_json_reads_back_the_same_counts(database_url: str) -> None:
    """keystile usage --json: one object per bucket, summing to 25/4 for A and 7/0 for B."""
    id_a, id_b = await send_traffic(database_url)
    for key_id, expected in ((id_a, (25, 4)), (id_b, (7, 0))):
        code, out, err = await anyio.to_thread.run_sync(
            lambda k=key_id: run_cli(
                "--database-url",
                database_url,
                "usage",
                k,
                "--owner",
                "acme",
                "--since",
                "1h",
                "--by",
                "minute",
                "--json",
            )
        )
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert rows and all(set(r) == {"start", "requests", "rejected"} for r in rows)
        assert (sum(r["requests"] for r in rows), sum(r["rejected"] for r in rows)) == expected


async def test_cli_chart_fits_80_columns_and_top_lists_busiest(database_url: str) -> None:
    """The bar chart stays within 80 columns and shows the totals; --top ranks A over B."""
    id_a, id_b = await send_traffic(database_url)
    code, out, err = await anyio.to_thread.run_sync(
        lambda: run_cli(
            "--database-url",
            database_url,
            "usage",
            f"ks_{id_a}…",
            "--owner",
            "acme",
            "--since",
            "6h",
            "--by",
            "hour",
        )
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) >= 8 and max(len(line) for line in lines) <= 80
    assert lines[-1].split()[-2:] == ["25", "4"]
    code, out, err = await anyio.to_thread.run_sync(
        lambda: run_cli(
            "--database-url",
            database_url,
            "usage",
            "--owner",
            "acme",
            "--since",
            "1d",
            "--top",
            "1",
        )
    )
    assert code == 0, err
    assert id_a in out and id_b not in out


async def test_cli_plot_writes_a_png(sqlite_database_url: str, tmp_path: Path) -> None:
    """--plot writes a file with the PNG signature."""
    id_a, _ = await send_traffic(sqlite_database_url)
    target = tmp_path / "usage.png"
    code, _, err = await anyio.to_thread.run_sync(
        lambda: run_cli(
            "--database-url",
            sqlite_database_url,
            "usage",
            id_a,
            "--owner",
            "acme",
            "--since",
            "1d",
            "--by",
            "hour",
            "--plot",
            str(target),
        )
    )
    assert code == 0, err
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_cli_plot_without_matplotlib_names_the_extra(sqlite_database_url: str) -> None:
    """Without matplotlib, --plot fails with one line naming keystile[plot], exit 1."""
    import subprocess
    import sys

    id_a, _ = await send_traffic(sqlite_database_url)
    code = (
        "import sys; sys.modules['matplotlib'] = None; from keystile.cli import main;"
        f" sys.exit(main(['--database-url', {sqlite_database_url!r}, 'usage', {id_a!r},"
        " '--owner', 'acme', '--plot', 'x.png']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "keystile[plot]" in done.stderr


async def test_another_owners_key_reads_as_unknown(database_url: str) -> None:
    """usage() of another owner's key id raises KeyNotFound; the CLI says so in one line."""
    id_a, _ = await send_traffic(database_url)
    async with KeyManager(store_from_url(database_url)) as keys:
        with pytest.raises(KeyNotFound):
            await keys.usage(id_a, owner="globex", since=timedelta(days=1))
    code, out, err = await anyio.to_thread.run_sync(
        lambda: run_cli("--database-url", database_url, "usage", id_a, "--owner", "globex")
    )
    assert (code, out, err.count("\n")) == (1, "", 1)


async def test_buckets_roll_up_by_hour_and_day(store: KeyStore) -> None:
    """Minute rows written across hours sum into hour and day buckets aligned to UTC."""
    _, key_id = await mint(store)
    day = datetime(2031, 3, 4, tzinfo=timezone.utc)
    minutes = {
        day + timedelta(hours=1, minutes=5): (3, 1),
        day + timedelta(hours=1, minutes=59): (4, 0),
        day + timedelta(hours=2, minutes=0): (5, 2),
        day + timedelta(days=1, minutes=1): (6, 0),
    }
    await store.add_usage({(key_id, m): c for m, c in minutes.items()})
    keys = KeyManager(store)
    since = day + timedelta(minutes=30)  # rounded down to the start of its period
    until = day + timedelta(days=2)
    by_hour = await keys.usage(key_id, owner="acme", since=since, until=until, by="hour")
    by_day = await keys.usage(key_id, owner="acme", since=since, until=until, by="day")
    by_minute = await keys.usage(key_id, owner="acme", since=since, until=until)
    assert by_hour == [
        UsageBucket(day + timedelta(hours=1), 7, 1),
        UsageBucket(day + timedelta(hours=2), 5, 2),
        UsageBucket(day + timedelta(days=1), 6, 0),
    ]
    assert by_day == [UsageBucket(day, 12, 3), UsageBucket(day + timedelta(days=1), 6, 0)]
    assert len(by_minute) == 4


async def test_flushes_from_two_processes_add_up(store: KeyStore) -> None:
    """Two writes of the same (key, minute) add, as two workers' flushes must."""
    _, key_id = await mint(store)
    minute = datetime(2031, 3, 4, 5, 6, tzinfo=timezone.utc)
    await store.add_usage({(key_id, minute): (10, 1)})
    await store.add_usage({(key_id, minute): (5, 2)})
    rows = await KeyManager(store).usage(
        key_id, owner="acme", since=minute, until=minute + timedelta(minutes=1)
    )
    assert rows == [UsageBucket(minute, 15, 3)]


class FailingUsageStore:
    """A real store whose next ``add_usage`` calls fail."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.failures_left = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def add_usage(self, counts: Any) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise StoreError("down")
        await self.inner.add_usage(counts)


async def test_failed_usage_write_keeps_counts_and_retries(store: KeyStore) -> None:
    """A failed flush loses no count: the next one writes old and new counts together."""
    _, key_id = await mint(store)
    wrapped = FailingUsageStore(store)
    wrapped.failures_left = 1
    recorder = UsageRecorder(wrapped)  # type: ignore[arg-type]
    now = datetime.now(timezone.utc).timestamp()
    for _ in range(3):
        recorder.touch(key_id, now)
    recorder.reject(key_id, now)
    with pytest.raises(StoreError):
        await recorder.flush()
    assert recorder.flush_failures == 1 and recorder.pending_usage == 1
    recorder.touch(key_id, now)
    await recorder.flush()
    rows = await KeyManager(store).usage(key_id, owner="acme", since=timedelta(minutes=5))
    assert totals(rows) == (4, 1)
    assert recorder.pending_usage == 0


async def test_pending_usage_rows_are_bounded_during_an_outage(store: KeyStore) -> None:
    """While the store fails, at most max_usage_rows rows wait; the oldest are dropped."""
    _, key_id = await mint(store)
    wrapped = FailingUsageStore(store)
    wrapped.failures_left = 100
    recorder = UsageRecorder(wrapped, max_usage_rows=5)  # type: ignore[arg-type]
    start = 1_900_000_020.0  # a minute's start
    for minute in range(12):
        recorder.touch(key_id, start + 60 * minute)
        with pytest.raises(StoreError):
            await recorder.flush()
    assert recorder.pending_usage == 5
    assert recorder.usage_dropped == 7
    wrapped.failures_left = 0
    await recorder.flush()
    since = datetime.fromtimestamp(start, timezone.utc)
    rows = await KeyManager(store).usage(key_id, owner="acme", since=since, until=None)
    assert [b.start.timestamp() for b in rows] == [start + 60 * m for m in range(7, 12)]


async def test_counting_can_be_switched_off(store: KeyStore) -> None:
    """count_usage=False keeps last_used_at and counts no request."""
    _, key_id = await mint(store)
    recorder = UsageRecorder(store, count_usage=False)
    recorder.touch(key_id, datetime.now(timezone.utc).timestamp())
    assert recorder.pending == 1 and recorder.pending_usage == 0
    recorder.count_usage = True
    recorder.touch(key_id, datetime.now(timezone.utc).timestamp())
    assert recorder.pending_usage == 1


async def test_revoked_and_disabled_keys_count_rejections(database_url: str) -> None:
    """Requests with a disabled, then a revoked key count as rejected against that key."""
    store = store_from_url(database_url)
    await store.open()
    key, key_id = await mint(store)
    app = protect(store, flush_interval=3600)
    keys = KeyManager(store)
    async with client(app) as http:
        assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 200
        await keys.disable(key_id, owner="acme")
        assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 401
        await keys.revoke(key_id, owner="acme")
        assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 401
        assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 401
    await app.aclose()
    rows = await keys.usage(key_id, owner="acme", since=timedelta(hours=1))
    assert totals(rows) == (1, 3)
    await store.close()


async def test_retention_deletes_old_rows_in_the_background(database_url: str) -> None:
    """The runtime deletes usage rows older than usage_retention and keeps newer ones."""
    store = store_from_url(database_url)
    await store.open()
    key, key_id = await mint(store)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    old, recent = now - timedelta(days=3), now - timedelta(hours=2)
    await store.add_usage({(key_id, old): (9, 0), (key_id, recent): (2, 0)})
    keys = KeyManager(store)

    async def rows() -> list[UsageBucket]:
        return await keys.usage(key_id, owner="acme", since=timedelta(days=10), until=now)

    assert len(await rows()) == 2
    app = protect(store, usage_retention=timedelta(days=1))
    async with client(app) as http:
        assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 200

        async def pruned() -> bool:
            return [b.start for b in await rows()] == [recent]

        await poll(pruned)
    await app.aclose()
    await store.close()


async def test_prune_usage_works_in_batches(store: KeyStore) -> None:
    """prune_usage deletes at most ``limit`` rows a call, oldest-minute rows only."""
    _, key_id = await mint(store)
    base = datetime(2020, 1, 1, tzinfo=timezone.utc)
    await store.add_usage({(key_id, base + timedelta(minutes=m)): (1, 0) for m in range(5)})
    cut = base + timedelta(minutes=4)
    assert await store.prune_usage(before=cut, limit=3) == 3
    assert await store.prune_usage(before=cut, limit=3) == 1
    assert await store.prune_usage(before=cut, limit=3) == 0
    rows = await KeyManager(store).usage(key_id, owner="acme", since=base, until=None)
    assert rows == [UsageBucket(cut, 1, 0)]


@pytest.mark.postgres
async def test_postgres_flush_is_one_statement_per_kind(postgres_database_url: str) -> None:
    """A flush of 40 keys' requests and rejections is one UPDATE of keystile_keys and one
    INSERT into keystile_usage, counted by statement-level triggers in Postgres."""
    import asyncpg

    from pgtools import count_update_statements, split_url, update_statements

    store = store_from_url(postgres_database_url)
    await store.open()
    minted = [await mint(store) for _ in range(40)]
    dsn, schema = split_url(postgres_database_url)
    raw = await asyncpg.connect(dsn)
    q = f'"{schema}"'
    await count_update_statements(raw, schema)
    await raw.execute(
        f"""
        CREATE TABLE {q}.usage_statements (n int NOT NULL);
        INSERT INTO {q}.usage_statements VALUES (0);
        CREATE FUNCTION {q}.count_usage() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN UPDATE {q}.usage_statements SET n = n + 1; RETURN NULL; END $$;
        CREATE TRIGGER count_usage AFTER INSERT ON {q}.keystile_usage
            FOR EACH STATEMENT EXECUTE FUNCTION {q}.count_usage();
        """  # noqa: S608
    )
    app = protect(store, flush_interval=3600, flush_max=10_000)
    async with client(app) as http:
        for key, key_id in minted:
            for presented in (key, key, wrong_secret(key_id)):
                await http.get("/whoami", headers={"X-API-Key": presented})
    assert await update_statements(raw, schema) == 0
    await app.recorder.flush()
    usage_inserts = await raw.fetchval(f"SELECT n FROM {q}.usage_statements")  # noqa: S608
    assert (await update_statements(raw, schema), usage_inserts) == (1, 1)
    row = await raw.fetchrow(
        f"SELECT count(DISTINCT key_id), sum(requests), sum(rejected) FROM {q}.keystile_usage"  # noqa: S608
    )
    assert tuple(row) == (40, 80, 40)
    await app.aclose()
    await raw.close()
    await store.close()
