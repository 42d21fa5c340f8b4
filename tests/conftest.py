"""Shared fixtures: the anyio plugin on asyncio, cheap argon2, one store per kind, and the
hit path (compiled or pure) for the tests that must hold on both.

Starlette's ``TestClient`` imports ``httpx2`` (the dev extra installs it); with plain
``httpx`` it warns, and the suite turns warnings into errors.

Postgres tests read ``KEYSTILE_TEST_POSTGRES_URL``; without it they skip with the reason,
unless ``KEYSTILE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which turns the skip into a
failure. Every Postgres test gets its own schema, dropped afterwards, so runs cannot collide.
Redis tests read ``KEYSTILE_TEST_REDIS_URL`` (``KEYSTILE_REQUIRE_REDIS=1`` alike); each gets a
key prefix of its own, deleted afterwards.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hitpaths import HIT_PATHS, using
from keystile.hashing import CHEAPEST_PARAMETERS, SecretHasher
from keystile.stores import KeyStore, store_from_url

POSTGRES_URL = os.environ.get("KEYSTILE_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("KEYSTILE_REQUIRE_POSTGRES") == "1"
SKIP_REASON = (
    "Postgres tests need KEYSTILE_TEST_POSTGRES_URL, e.g. postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=HIT_PATHS)
def hit_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """``compiled`` or ``pure``: every cache, verifier and middleware the test builds uses
    that hit path (``hitpaths.py``). Request it first (``usefixtures`` or the first
    argument) so that no other fixture builds a middleware before it."""
    with using(request.param):
        yield request.param


@pytest.fixture
def hasher() -> SecretHasher:
    return SecretHasher(CHEAPEST_PARAMETERS)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail(f"KEYSTILE_REQUIRE_POSTGRES=1 but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)
    return POSTGRES_URL


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def postgres_database_url(postgres_url: str) -> AsyncIterator[str]:
    """A Postgres URL with a schema of its own (``?schema=``), dropped after the test."""
    schema = f"keystile_test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{sep}schema={schema}"
    await drop_schema(postgres_url, schema)


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keys.db'}"


STORE_KINDS = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=STORE_KINDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test against every store: memory, SQLite and (when available) Postgres."""
    if request.param == "memory":
        yield f"memory://test-{uuid.uuid4().hex}"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        yield request.getfixturevalue("postgres_database_url")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[KeyStore]:
    store = store_from_url(database_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- Redis --------------------------------------------------------------------------------

REDIS_URL = os.environ.get("KEYSTILE_TEST_REDIS_URL", "")
REQUIRE_REDIS = os.environ.get("KEYSTILE_REQUIRE_REDIS") == "1"
REDIS_SKIP_REASON = "Redis tests need KEYSTILE_TEST_REDIS_URL, e.g. redis://127.0.0.1:6379/0"


@contextmanager
def redis_with_prefix() -> Iterator[str]:
    """The test Redis with a key prefix of its own (``?key_prefix=``), cleaned afterwards;
    skipped (failed with ``KEYSTILE_REQUIRE_REDIS=1``) without ``KEYSTILE_TEST_REDIS_URL``."""
    if not REDIS_URL:
        if REQUIRE_REDIS:
            pytest.fail(f"KEYSTILE_REQUIRE_REDIS=1 but {REDIS_SKIP_REASON}")
        pytest.skip(REDIS_SKIP_REASON)
    import redis

    prefix = f"keystile-test-{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in REDIS_URL else "?"
    yield f"{REDIS_URL}{sep}key_prefix={prefix}"
    conn = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(conn.scan_iter(match=f"{prefix}:*"))
        if keys:
            conn.delete(*keys)
    finally:
        conn.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis, a key prefix of its own per test."""
    with redis_with_prefix() as url:
        yield url


@pytest.fixture(scope="module")
def module_redis_url() -> Iterator[str]:
    """The test Redis, one key prefix for a whole module (for servers that outlive a test)."""
    with redis_with_prefix() as url:
        yield url


@pytest.fixture
def closed_port_url() -> str:
    """A Redis URL on a local port nobody listens on: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"
