"""djangorestframework-api-key: keys minted by the library itself, in a Django project on
SQLite and on Postgres (``drf_project``), imported from the project's own table, keep
their strings through keystile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from importing import legacy_app, opened, statuses
from keystile.errors import ImportSourceError
from keystile.importers import import_source
from keystile.stores import KeyStore

pytestmark = pytest.mark.anyio
TESTS = Path(__file__).resolve().parent


def mint(database: str) -> dict[str, Any]:
    """The keys ``drf_project.mint`` minted in ``database``, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "drf_project.mint"],
        cwd=TESTS,
        env={**os.environ, "DRF_PROJECT_DATABASE": database},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    minted: dict[str, Any] = json.loads(done.stdout)
    return minted


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def django_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The Django project's database: a SQLite file, or a schema of its own in Postgres."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'django.sqlite3'}"
        return
    import psycopg

    server = request.getfixturevalue("postgres_url")
    schema = f"drf_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{server}?schema={schema}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
async def keystile_store(sqlite_database_url: str) -> AsyncIterator[KeyStore]:
    async with opened(sqlite_database_url) as store:
        yield store


async def test_drf_api_key_keys_keep_working(
    django_database: str, keystile_store: KeyStore
) -> None:
    """Live keys (and a 1.x PBKDF2 one) get 200 with their own strings, the revoked and
    expired ones 401, a wrong secret 401; each used key is argon2id afterwards; a second
    import changes nothing."""
    minted = mint(django_database)
    report = await import_source(
        keystile_store, "drf-api-key", source_url=django_database, owner_from_name=True
    )
    assert (report.imported, dict(report.skipped)) == (5, {})
    live = [*minted["live"], minted["pbkdf2"]]
    wrong = live[0][:-1] + ("A" if live[0][-1] != "A" else "B")
    app = legacy_app(keystile_store)
    keys = [*live, minted["revoked"], minted["expired"], wrong]
    assert await statuses(app, keys) == [200, 200, 200, 401, 401, 401]
    for key in live:
        record = await keystile_store.get(f"drf.{key.partition('.')[0]}")
        assert record is not None and record.secret_hash.startswith("$argon2id$")
    billing = await keystile_store.get(f"drf.{live[0].partition('.')[0]}")
    assert billing is not None and (billing.owner, billing.name) == ("billing", "billing")
    before = (await keystile_store.list_all(), await keystile_store.list_events())
    again = await import_source(
        keystile_store, "drf-api-key", source_url=django_database, owner_from_name=True
    )
    assert (again.imported, dict(again.skipped)) == (0, {"exists": 5})
    assert (await keystile_store.list_all(), await keystile_store.list_events()) == before


async def test_a_table_that_is_not_drf_api_key_is_an_unknown_layout(
    tmp_path: Path, keystile_store: KeyStore
) -> None:
    """A database without the table, or with a table lacking its columns, is refused in
    one line that says what is missing; nothing is written."""
    import sqlite3

    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE rest_framework_api_key_apikey (id TEXT, name TEXT)")
        conn.execute("CREATE TABLE unrelated (id TEXT)")
    for table, missing in (
        (None, "no column prefix"),
        ("unrelated", "no column prefix"),
        ("nope", "no table"),
    ):
        with pytest.raises(ImportSourceError) as refused:
            await import_source(
                keystile_store,
                "drf-api-key",
                source_url=f"sqlite:///{path}",
                table=table,
                owner="acme",
            )
        assert refused.value.reason == "unknown_layout" and missing in str(refused.value)
    assert await keystile_store.list_all() == []


async def test_keys_without_an_owner_are_skipped(tmp_path: Path, keystile_store: KeyStore) -> None:
    """drf-api-key's keys have no owner: without --owner or --owner-from name each is
    skipped as ``no_owner``, and --owner gives them all one."""
    database = f"sqlite:///{tmp_path / 'django.sqlite3'}"
    mint(database)
    report = await import_source(keystile_store, "drf-api-key", source_url=database)
    assert (report.imported, dict(report.skipped)) == (0, {"no_owner": 5})
    report = await import_source(keystile_store, "drf-api-key", source_url=database, owner="acme")
    assert report.imported == 5
    assert {r.owner for r in await keystile_store.list_all()} == {"acme"}
