"""The verification memo across two real processes: two uvicorn servers (``servers.py``) on
one SQLite file and the real Redis of ``KEYSTILE_TEST_REDIS_URL``, each with its own
runtime, counting its argon2 verifications in ``/stats``.

The servers live for the module, with a Redis key prefix of their own; every test mints
its own keys and reads the counters' change, so the tests do not see each other's keys.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.hashing import SecretHasher
from keystile.memo import RedisVerificationMemo
from keystile.stores import store_from_url
from keystile.tokens import generate_key, parse_key
from servers import Server, uvicorn_server

SECRET = "memo-secret-of-the-fleet-0123456789abcdef"
COUNTED = ("argon2_verifications", "memo_hits", "memo_misses", "memo_errors")


@dataclass
class Fleet:
    database_url: str
    redis_url: str
    first: Server
    second: Server


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, module_redis_url: str) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("memo-fleet")
    url = f"sqlite:///{tmp / 'keys.db'}"
    mint(url)  # the schema exists before two processes open the file
    memo = {"verification_memo": module_redis_url, "memo_secret": SECRET}
    with (
        uvicorn_server(url, tmp / "first.log", **memo) as first,
        uvicorn_server(url, tmp / "second.log", **memo) as second,
    ):
        yield Fleet(url, module_redis_url, first, second)


def mint(url: str) -> tuple[str, str]:
    async def create() -> tuple[str, str]:
        async with KeyManager(store_from_url(url), argon2=CHEAPEST_PARAMETERS) as keys:
            created = await keys.create(owner="acme", name=f"k-{secrets.token_hex(4)}")
            return created.key, created.id

    return anyio.run(create)


def get(server: Server, key: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}/whoami", headers={"X-API-Key": key}, timeout=60)


class Counts:
    """What ``server``'s counters did between ``Counts(server)`` and ``since()``."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.before = server.stats()

    def since(self) -> dict[str, int]:
        after = self.server.stats()
        return {name: after[name] - self.before[name] for name in COUNTED}


def changed(*, argon2: int, hits: int, misses: int, errors: int = 0) -> dict[str, int]:
    return dict(zip(COUNTED, (argon2, hits, misses, errors), strict=True))


def test_a_second_process_verifies_a_key_without_argon2(fleet: Fleet) -> None:
    """The first process proves the key with argon2; the second admits it with none."""
    key, _ = mint(fleet.database_url)
    first, second = Counts(fleet.first), Counts(fleet.second)
    assert get(fleet.first, key).status_code == 200
    assert first.since()["argon2_verifications"] == 1
    assert get(fleet.second, key).status_code == 200
    assert second.since() == changed(argon2=0, hits=1, misses=0)


def test_a_revocation_refuses_a_key_the_memo_remembers(fleet: Fleet) -> None:
    """The memo still proves the secret, but the second process reads the revoked state."""
    key, key_id = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200

    async def revoke() -> None:
        async with KeyManager(store_from_url(fleet.database_url)) as keys:
            assert await keys.revoke(key_id, owner="acme")

    anyio.run(revoke)
    second = Counts(fleet.second)
    r = get(fleet.second, key)
    assert r.status_code == 401 and r.json()["detail"] == "The API key has been revoked."
    assert second.since()["memo_hits"] == 1


def test_a_rotation_refuses_the_old_key_and_proves_the_new_one(fleet: Fleet) -> None:
    """After a rotation without grace, the old key's memo admits nothing (it expired); the
    successor has no entry until a process has proven it with argon2."""
    key, key_id = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200

    async def rotate() -> str:
        async with KeyManager(store_from_url(fleet.database_url)) as keys:
            return (await keys.rotate(key_id, owner="acme", grace=timedelta(0))).key

    successor = anyio.run(rotate)
    second = Counts(fleet.second)
    assert get(fleet.second, key).status_code == 401
    assert get(fleet.second, successor).status_code == 200
    assert second.since()["argon2_verifications"] == 1


def test_a_rehash_invalidates_the_memo(fleet: Fleet) -> None:
    """A new stored hash (a rehash: same secret, new salt) makes the entry stale: the second
    process runs argon2 against the new hash, then leaves an entry for it."""
    key, key_id = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200

    async def rehash() -> None:
        store = store_from_url(fleet.database_url)
        try:
            await store.update_hash(
                key_id, SecretHasher(CHEAPEST_PARAMETERS).hash(parse_key(key).secret)
            )
        finally:
            await store.close()

    anyio.run(rehash)
    second = Counts(fleet.second)
    assert get(fleet.second, key).status_code == 200
    assert second.since() == changed(argon2=1, hits=0, misses=1)


def test_a_wrong_secret_fails_even_with_a_memo_present(fleet: Fleet) -> None:
    """A token with the key's id and a wrong secret is refused by argon2, while the key's
    own entry sits in Redis."""
    key, key_id = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200
    wrong, _ = generate_key(key_id=key_id)
    second = Counts(fleet.second)
    assert get(fleet.second, wrong).status_code == 401
    assert second.since()["argon2_verifications"] == 1
    assert second.since()["memo_hits"] == 0


def test_a_forged_entry_admits_nothing(fleet: Fleet) -> None:
    """Whatever sits at a wrong token's name (garbage, or the key's genuine entry copied
    there), the second process runs argon2 and refuses the token."""
    key, key_id = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200
    memo = RedisVerificationMemo(fleet.redis_url, SECRET)
    wrong, _ = generate_key(key_id=key_id)
    conn = redis.Redis.from_url(memo.url)
    try:
        genuine = conn.get(memo.entry_key(parse_key(key)))
        assert genuine is not None
        for forged in (genuine, secrets.token_bytes(32)):
            conn.set(memo.entry_key(parse_key(wrong)), forged)
            second = Counts(fleet.second)
            assert get(fleet.second, wrong).status_code == 401
            assert second.since()["memo_hits"] == 0
            wrong, _ = generate_key(key_id=key_id)  # a new token: past the negative cache
    finally:
        conn.close()


def test_a_process_with_another_secret_runs_argon2(fleet: Fleet, tmp_path: Path) -> None:
    """A process whose memo secret differs finds no entry it can use."""
    key, _ = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200
    options = {"verification_memo": fleet.redis_url, "memo_secret": "another-" + SECRET}
    with uvicorn_server(fleet.database_url, tmp_path / "other.log", **options) as other:
        counts = Counts(other)
        assert get(other, key).status_code == 200
        assert counts.since()["argon2_verifications"] == 1
        assert counts.since()["memo_hits"] == 0


def test_redis_down_falls_back_to_argon2(
    fleet: Fleet, tmp_path: Path, closed_port_url: str
) -> None:
    """A process whose memo cannot be reached admits keys with argon2: no 500, no pass."""
    key, key_id = mint(fleet.database_url)
    assert get(fleet.first, key).status_code == 200
    wrong, _ = generate_key(key_id=key_id)
    options = {"verification_memo": closed_port_url, "memo_secret": SECRET}
    with uvicorn_server(fleet.database_url, tmp_path / "down.log", **options) as down:
        counts = Counts(down)
        assert get(down, key).status_code == 200
        assert get(down, wrong).status_code == 401
        changed = counts.since()
        assert changed["argon2_verifications"] == 2 and changed["memo_hits"] == 0
        assert changed["memo_errors"] >= 1
