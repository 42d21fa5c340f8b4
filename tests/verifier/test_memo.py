"""The fleet's verification memo (``memo.py``): its options, what it keeps in Redis, how it
refuses what it did not write, and how it steps aside when Redis fails.

These tests run two middlewares with two runtimes in one process on one SQLite file and
the real Redis of ``KEYSTILE_TEST_REDIS_URL`` (``tests/verifier/test_memo_processes.py`` runs two
processes). Every test gets a Redis key prefix of its own, deleted afterwards.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from apps import client, inner_app
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    Argon2Parameters,
    ConfigurationError,
    KeyManager,
    KeystileConfig,
    MemoryKeyStore,
)
from keystile.memo import (
    MEMO_SECRET_ENV,
    MemoKeys,
    NullMemo,
    RedisVerificationMemo,
    open_memo,
)
from keystile.stores import store_from_url
from keystile.tokens import generate_key, parse_key

pytestmark = pytest.mark.anyio

SECRET = "memo-secret-for-the-tests-0123456789abcdef"
#: A stronger argon2 than the cheapest: a hasher with it rehashes keys minted cheaply.
STRONGER = Argon2Parameters(time_cost=1, memory_cost=16, parallelism=1, salt_len=8)


def app_on(url: str, **options: Any) -> APIKeyMiddleware:
    """The test app on its own runtime (its own store object) at ``url``."""
    options = {"argon2": CHEAPEST_PARAMETERS, "memo_secret": SECRET, **options}
    return APIKeyMiddleware(inner_app(), store=store_from_url(url), **options)


async def mint(url: str) -> tuple[str, str]:
    async with KeyManager(store_from_url(url), argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name=f"k-{secrets.token_hex(4)}")
        return created.key, created.id


async def status(app: APIKeyMiddleware, key: str) -> int:
    async with client(app) as http:
        return (await http.get("/whoami", headers={"X-API-Key": key})).status_code


async def redis_entries(redis_url: str) -> dict[bytes, bytes]:
    """Every entry under the test's prefix: Redis key → value."""
    import redis.asyncio as aioredis

    memo = RedisVerificationMemo(redis_url, SECRET)
    conn = aioredis.Redis.from_url(memo.url)
    try:
        names = [k async for k in conn.scan_iter(match=f"{memo.prefix}:memo:*")]
        return {name: await conn.get(name) for name in names}
    finally:
        await conn.aclose()


async def write_entry(redis_url: str, key: str, value: bytes) -> None:
    """Put ``value`` where ``key``'s entry goes (an attacker who knew the name)."""
    import redis.asyncio as aioredis

    memo = RedisVerificationMemo(redis_url, SECRET)
    conn = aioredis.Redis.from_url(memo.url)
    try:
        await conn.set(memo.entry_key(parse_key(key)), value)
    finally:
        await conn.aclose()


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://cache:6379/0",
        "cache:6379",
        "redis://cache:port/0",
        "redis:///0",
        "redis://cache:6379/two",
        "mysql://cache/0",
    ],
)
def test_a_bad_memo_url_is_a_configuration_error(url: str) -> None:
    """The middleware refuses to start with a memo URL it cannot use, and says which."""
    with pytest.raises(ConfigurationError, match="verification_memo"):
        KeystileConfig(store=MemoryKeyStore(), verification_memo=url, memo_secret=SECRET)


def test_a_short_memo_secret_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret under 32 bytes is refused, from the option and from the environment alike."""
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        KeystileConfig(
            store=MemoryKeyStore(), verification_memo="redis://cache:6379/2", memo_secret="short"
        )
    monkeypatch.setenv(MEMO_SECRET_ENV, "x" * 31)
    with pytest.raises(ConfigurationError, match=MEMO_SECRET_ENV):
        KeystileConfig(store=MemoryKeyStore(), verification_memo="redis://cache:6379/2")
    with pytest.raises(ConfigurationError, match="memo_ttl"):
        KeystileConfig(
            store=MemoryKeyStore(),
            verification_memo="redis://cache:6379/2",
            memo_secret=SECRET,
            memo_ttl=0,
        )


def test_the_memo_secret_comes_from_the_environment_and_never_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KEYSTILE_MEMO_SECRET is read with a memo URL; memo_secret= beats it; the repr shows
    neither, nor the URL's password."""
    monkeypatch.setenv(MEMO_SECRET_ENV, "e" * 40)
    config = KeystileConfig(
        store=MemoryKeyStore(), verification_memo="redis://:hunter2@cache:6379/2"
    )
    assert config.memo_secret == "e" * 40
    assert "e" * 40 not in repr(config) and "hunter2" not in repr(config)
    explicit = config.replace(memo_secret=SECRET)
    assert explicit.memo_secret == SECRET and SECRET not in repr(explicit)
    assert explicit.runtime_key != config.runtime_key
    assert KeystileConfig(store=MemoryKeyStore()).memo_secret is None


def test_no_secret_means_no_memo_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A memo URL without a secret: the middleware starts without a memo, and says so once."""
    monkeypatch.delenv(MEMO_SECRET_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="keystile"):
        app = APIKeyMiddleware(
            inner_app(), store=MemoryKeyStore(), verification_memo="redis://cache:6379/2"
        )
        APIKeyMiddleware(inner_app(), config=app.config)  # the same runtime: no second warning
    assert isinstance(app.verifier.memo, NullMemo)
    warnings = [r.getMessage() for r in caplog.records if "memo" in r.getMessage()]
    assert len(warnings) == 1 and MEMO_SECRET_ENV in warnings[0]
    assert isinstance(open_memo(None, SECRET, ttl=60), NullMemo)


def test_names_and_values_depend_on_the_secret_the_token_and_the_hash() -> None:
    """An entry's name hides the token and its key id; its value changes with any input."""
    _, parsed = generate_key()
    keys, other = MemoKeys(SECRET), MemoKeys(SECRET + "!")
    name = keys.name(parsed)
    assert parsed.key_id not in name and parsed.secret not in name and len(name) == 32
    assert other.name(parsed) != name
    _, sibling = generate_key(key_id=parsed.key_id)
    assert keys.name(sibling) != name
    value = keys.value(parsed, "$argon2id$one")
    assert len(value) == 32
    assert value not in (
        keys.value(parsed, "$argon2id$two"),
        keys.value(sibling, "$argon2id$one"),
        other.value(parsed, "$argon2id$one"),
    )


# -- the memo at work ---------------------------------------------------------------------


async def test_a_second_runtime_admits_a_key_without_argon2(
    redis_url: str, sqlite_database_url: str
) -> None:
    """The first runtime runs argon2 and leaves an entry; the second admits with none."""
    key, key_id = await mint(sqlite_database_url)
    first = app_on(sqlite_database_url, verification_memo=redis_url)
    second = app_on(sqlite_database_url, verification_memo=redis_url)
    assert await status(first, key) == 200
    assert await status(second, key) == 200
    one, two = first.stats(), second.stats()
    assert (one.argon2_verifications, one.memo_misses, one.memo_hits) == (1, 1, 0)
    assert (two.argon2_verifications, two.memo_hits, two.memo_misses) == (0, 1, 0)
    entries = await redis_entries(redis_url)
    assert len(entries) == 1
    ((name, value),) = entries.items()
    assert key_id.encode() not in name and key.encode() not in value
    for app in (first, second):
        await app.aclose()


async def test_a_forged_entry_admits_nothing(redis_url: str, sqlite_database_url: str) -> None:
    """Entries written without the secret (garbage, or a real entry copied to a wrong
    token's name) never admit the wrong token: argon2 runs and refuses it."""
    key, key_id = await mint(sqlite_database_url)
    first = app_on(sqlite_database_url, verification_memo=redis_url)
    assert await status(first, key) == 200
    ((_, genuine),) = (await redis_entries(redis_url)).items()
    wrong, _ = generate_key(key_id=key_id)
    second = app_on(sqlite_database_url, verification_memo=redis_url)
    for forged in (genuine, secrets.token_bytes(32), b""):
        await write_entry(redis_url, wrong, forged)
        second.evict(key_id)
        assert await status(second, wrong) == 401
    stats = second.stats()
    assert stats.memo_hits == 0 and stats.argon2_verifications >= 1
    assert stats.rejects.get("wrong_secret", 0) >= 1
    await write_entry(redis_url, key, secrets.token_bytes(32))
    assert await status(second, key) == 200  # a garbled entry: argon2 admits the real key
    assert second.stats().memo_hits == 0
    for app in (first, second):
        await app.aclose()


async def test_a_memo_with_another_secret_is_not_used(
    redis_url: str, sqlite_database_url: str
) -> None:
    """A runtime with another memo secret finds nothing the first one wrote: argon2 runs."""
    key, _ = await mint(sqlite_database_url)
    first = app_on(sqlite_database_url, verification_memo=redis_url)
    other = app_on(sqlite_database_url, verification_memo=redis_url, memo_secret="o" * 40)
    assert await status(first, key) == 200
    assert await status(other, key) == 200
    stats = other.stats()
    assert (stats.memo_hits, stats.memo_misses, stats.argon2_verifications) == (0, 1, 1)
    for app in (first, other):
        await app.aclose()


async def test_a_stronger_hasher_rehashes_instead_of_trusting_the_memo(
    redis_url: str, sqlite_database_url: str
) -> None:
    """A runtime whose argon2 parameters would strengthen the stored hash runs argon2 (and
    rehashes); the entry it leaves is bound to the new hash, which the others then use."""
    key, key_id = await mint(sqlite_database_url)
    cheap = app_on(sqlite_database_url, verification_memo=redis_url)
    strong = app_on(sqlite_database_url, verification_memo=redis_url, argon2=STRONGER)
    later = app_on(sqlite_database_url, verification_memo=redis_url)
    store = store_from_url(sqlite_database_url)
    before = await store.get(key_id)
    assert await status(cheap, key) == 200
    assert await status(strong, key) == 200
    after = await store.get(key_id)
    await store.close()
    assert before is not None and after is not None
    assert after.secret_hash != before.secret_hash and "m=16" in after.secret_hash
    assert strong.stats().argon2_verifications == 1 and strong.stats().memo_hits == 0
    assert await status(later, key) == 200
    assert later.stats().argon2_verifications == 0 and later.stats().memo_hits == 1
    for app in (cheap, strong, later):
        await app.aclose()


# -- Redis failing ------------------------------------------------------------------------


@pytest.fixture
def hanging_up_redis() -> Iterator[tuple[str, list[int]]]:
    """A local port that accepts each connection and closes it at once (a Redis that
    fails every call); yields its URL and the list of connections it took."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", accepted
    server.close()
    thread.join(timeout=10)


async def test_a_failing_redis_is_left_alone_for_a_while(
    hanging_up_redis: tuple[str, list[int]],
) -> None:
    """After a failure, misses skip Redis (no connection) until the retry interval ends."""
    url, accepted = hanging_up_redis
    now = [0.0]
    memo = RedisVerificationMemo(url, SECRET, retry_interval=5.0, monotonic=lambda: now[0])
    _, parsed = generate_key()
    never = lambda secret_hash: False  # noqa: E731
    assert await memo.recall(parsed, "$argon2id$h", never) is False
    assert memo.errors == 1 and accepted
    tried = len(accepted)
    now[0] = 4.9
    assert await memo.recall(parsed, "$argon2id$h", never) is False
    await memo.remember(parsed, "$argon2id$h")
    assert memo.errors == 2 and len(accepted) == tried
    now[0] = 5.1
    assert await memo.recall(parsed, "$argon2id$h", never) is False
    assert memo.errors == 3 and len(accepted) > tried
    await memo.aclose()


async def test_redis_down_means_argon2_never_a_500(
    closed_port_url: str, sqlite_database_url: str
) -> None:
    """A memo on a dead Redis: keys are admitted by argon2, wrong ones refused, nothing else."""
    app = app_on(sqlite_database_url, verification_memo=closed_port_url)
    key, key_id = await mint(sqlite_database_url)
    wrong, _ = generate_key(key_id=key_id)
    assert await status(app, key) == 200
    assert await status(app, wrong) == 401
    stats = app.stats()
    assert stats.argon2_verifications == 2 and stats.memo_hits == 0 and stats.memo_errors >= 1
    await app.aclose()
