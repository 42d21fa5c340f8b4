"""A limit changed by another process (the CLI) reaches a running middleware: by NOTIFY on
Postgres, by the change log on SQLite."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import pytest
from test_limits import limited_app, mint, statuses

from apps import client
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio


def cli(url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keystile.cli", "--database-url", url, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_update_elsewhere(url: str, key_id: str, *options: str) -> None:
    done = await anyio.to_thread.run_sync(lambda: cli(url, "update", key_id, *options))
    assert done.returncode == 0, done.stderr


async def until_passes(http: Any, key: str, timeout: float = 10.0) -> None:
    """Poll (refused requests take nothing) until the key passes again."""
    with anyio.fail_after(timeout):
        while (await statuses(http, key, 1)) != [200]:
            await anyio.sleep(0.05)


@pytest.mark.postgres
async def test_limit_change_in_another_process_arrives_by_notify(
    postgres_database_url: str,
) -> None:
    """keystile update in a child process: the listening middleware applies it within the poll."""
    key, key_id = await mint(postgres_database_url, rate_limit="1/minute")
    app = limited_app(store_from_url(postgres_database_url), cache_ttl=3600)
    async with client(app) as http:
        assert await statuses(http, key, 2) == [200, 429]
        with anyio.fail_after(10):
            while not app.store._listening:  # type: ignore[attr-defined]
                await anyio.sleep(0.02)
        events = app.stats().revocation_events
        await run_update_elsewhere(
            postgres_database_url, key_id, "--owner", "acme", "--rate-limit", "4/minute"
        )
        await until_passes(http, key)
        assert app.stats().revocation_events > events
        assert await statuses(http, key, 4) == [200, 200, 200, 429]
    await app.aclose()


async def test_limit_change_in_another_process_arrives_by_the_sqlite_change_log(
    sqlite_database_url: str,
) -> None:
    """keystile update in a child process: the SQLite watcher relays it to the middleware."""
    key, key_id = await mint(sqlite_database_url, quota=1)
    app = limited_app(store_from_url(sqlite_database_url), cache_ttl=3600)
    async with client(app) as http:
        assert await statuses(http, key, 2) == [200, 429]
        await run_update_elsewhere(sqlite_database_url, key_id, "--owner", "acme", "--no-quota")
        await until_passes(http, key)
        assert await statuses(http, key, 5) == [200] * 5
    await app.aclose()
