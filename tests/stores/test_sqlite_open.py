"""SQLite: several stores opening one new database file at once all open it (the switch
to WAL waits for the other connection instead of failing as "database is locked")."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio


async def test_stores_open_a_new_file_together(tmp_path: Path) -> None:
    """Six stores open each of 40 new files concurrently: none fails."""
    failures: list[BaseException] = []

    async def open_and_close(url: str) -> None:
        store = store_from_url(url)
        try:
            await store.open()
        except Exception as exc:
            failures.append(exc)
        finally:
            await store.close()

    for round_ in range(40):
        url = f"sqlite:///{tmp_path / f'{round_}.db'}"
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(open_and_close, url)
    assert failures == []
