"""argon2id at rest: hash, verify, and upgrade on a successful verify (``keystile.hashing``)."""

from __future__ import annotations

import dataclasses

import argon2
import pytest

from apps import client, protect
from keystile import KeyManager, KeyStore
from keystile.hashing import (
    CHEAPEST_PARAMETERS,
    DEFAULT_PARAMETERS,
    Argon2Parameters,
    SecretHasher,
)
from keystile.verifier import Verifier

SECRET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg"
#: Weaker than CHEAPEST_PARAMETERS (a shorter hash) and nowhere stronger.
OLD_PARAMETERS = Argon2Parameters(
    time_cost=1, memory_cost=8, parallelism=1, hash_len=16, salt_len=8
)
#: Stronger than CHEAPEST_PARAMETERS in time and memory, still cheap to compute.
STRONGER = Argon2Parameters(time_cost=2, memory_cost=16, parallelism=1, salt_len=8)


def test_hash_verify_round_trip(hasher: SecretHasher) -> None:
    """A secret verifies against its own hash, with no upgrade needed."""
    assert hasher.verify(hasher.hash(SECRET), SECRET) == (True, None)


def test_hash_is_argon2id(hasher: SecretHasher) -> None:
    """The stored form is an argon2id PHC string."""
    assert hasher.hash(SECRET).startswith("$argon2id$")


def test_hash_carries_its_parameters(hasher: SecretHasher) -> None:
    """The hash string records the hasher's cost parameters and lengths."""
    params = argon2.extract_parameters(hasher.hash(SECRET))
    assert params.type is argon2.Type.ID
    assert (params.time_cost, params.memory_cost, params.parallelism) == (1, 8, 1)
    assert (params.hash_len, params.salt_len) == (32, 8)


def test_hash_is_salted(hasher: SecretHasher) -> None:
    """Hashing one secret twice gives two different strings."""
    assert hasher.hash(SECRET) != hasher.hash(SECRET)


def test_hash_does_not_contain_secret(hasher: SecretHasher) -> None:
    """The stored hash does not contain the plaintext secret."""
    assert SECRET not in hasher.hash(SECRET)


def test_wrong_secret_is_rejected(hasher: SecretHasher) -> None:
    """A different secret does not verify and yields no upgraded hash."""
    assert hasher.verify(hasher.hash(SECRET), SECRET[:-1] + "h") == (False, None)


def test_empty_secret_does_not_match(hasher: SecretHasher) -> None:
    """An empty secret does not verify against a real hash."""
    assert hasher.verify(hasher.hash(SECRET), "") == (False, None)


@pytest.mark.parametrize(
    "corrupt",
    [
        "",
        "not a hash",
        "$argon2id$",
        "$argon2id$v=19$m=8,t=1,p=1$",
        "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$!!!!",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        "\x00",
        "$argon2id$v=19$m=8,t=1,p=1$é$é",
    ],
    ids=[
        "empty",
        "text",
        "prefix-only",
        "no-salt",
        "bad-base64",
        "bcrypt",
        "nul",
        "non-ascii",
    ],
)
def test_corrupt_hash_never_authenticates_nor_raises(hasher: SecretHasher, corrupt: str) -> None:
    """A corrupt stored hash is a mismatch ``(False, None)``, never an exception."""
    assert hasher.verify(corrupt, SECRET) == (False, None)


def test_truncated_hash_is_a_mismatch(hasher: SecretHasher) -> None:
    """A valid hash cut short does not verify."""
    stored = hasher.hash(SECRET)
    assert hasher.verify(stored[:-5], SECRET) == (False, None)


def test_tampered_hash_is_a_mismatch(hasher: SecretHasher) -> None:
    """A valid hash with one digest character changed does not verify."""
    stored = hasher.hash(SECRET)
    tampered = stored[:-3] + ("A" if stored[-3] != "A" else "B") + stored[-2:]
    assert hasher.verify(tampered, SECRET) == (False, None)


def test_old_parameters_verify_and_upgrade(hasher: SecretHasher) -> None:
    """A hash made with other parameters verifies and comes back upgraded."""
    old = SecretHasher(OLD_PARAMETERS).hash(SECRET)
    matched, upgraded = hasher.verify(old, SECRET)
    assert matched is True
    assert upgraded is not None and upgraded != old


def test_upgraded_hash_has_current_parameters(hasher: SecretHasher) -> None:
    """The upgraded hash carries the current parameters and verifies with no further upgrade."""
    old = SecretHasher(OLD_PARAMETERS).hash(SECRET)
    _, upgraded = hasher.verify(old, SECRET)
    assert upgraded is not None
    assert upgraded.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert argon2.extract_parameters(upgraded).hash_len == 32
    assert hasher.verify(upgraded, SECRET) == (True, None)


def test_old_parameters_wrong_secret_is_not_upgraded(hasher: SecretHasher) -> None:
    """A wrong secret against an old-parameter hash gives no upgrade."""
    old = SecretHasher(OLD_PARAMETERS).hash(SECRET)
    assert hasher.verify(old, "wrong") == (False, None)


def test_argon2i_hash_is_upgraded_to_argon2id(hasher: SecretHasher) -> None:
    """An imported argon2i hash verifies and is upgraded to argon2id."""
    legacy = argon2.PasswordHasher(
        time_cost=1, memory_cost=8, parallelism=1, salt_len=8, type=argon2.Type.I
    ).hash(SECRET)
    matched, upgraded = hasher.verify(legacy, SECRET)
    assert matched is True
    assert upgraded is not None and upgraded.startswith("$argon2id$")


def test_default_parameters_are_the_documented_profile() -> None:
    """The production default is argon2id t=1, m=8 MiB, p=1."""
    assert DEFAULT_PARAMETERS.time_cost == 1
    assert DEFAULT_PARAMETERS.memory_cost == 8192
    assert DEFAULT_PARAMETERS.parallelism == 1


def test_default_hasher_uses_default_parameters() -> None:
    """``SecretHasher()`` hashes at the default parameters."""
    stored = SecretHasher().hash(SECRET)
    assert stored.startswith("$argon2id$v=19$m=8192,t=1,p=1$")


def test_cheapest_hash_needs_upgrade_under_defaults(hasher: SecretHasher) -> None:
    """A test-profile hash is upgraded by a default-profile hasher."""
    _, upgraded = SecretHasher(DEFAULT_PARAMETERS).verify(hasher.hash(SECRET), SECRET)
    assert upgraded is not None and "m=8192,t=1,p=1" in upgraded


def test_cheapest_parameters_are_cheaper_than_default() -> None:
    """The test profile is no costlier than the default in any dimension."""
    assert CHEAPEST_PARAMETERS.memory_cost < DEFAULT_PARAMETERS.memory_cost
    assert CHEAPEST_PARAMETERS.time_cost <= DEFAULT_PARAMETERS.time_cost


# -- never downgrade --------------------------------------------------------------------


def test_default_hash_is_not_downgraded_by_cheapest() -> None:
    """A hasher with CHEAPEST_PARAMETERS verifies a default-cost hash and leaves it alone."""
    stored = SecretHasher(DEFAULT_PARAMETERS).hash(SECRET)
    assert SecretHasher(CHEAPEST_PARAMETERS).verify(stored, SECRET) == (True, None)


def test_cheapest_hash_is_upgraded_by_default() -> None:
    """A hasher with DEFAULT_PARAMETERS upgrades a cheapest-cost hash to the default cost."""
    stored = SecretHasher(CHEAPEST_PARAMETERS).hash(SECRET)
    matched, upgraded = SecretHasher(DEFAULT_PARAMETERS).verify(stored, SECRET)
    assert matched is True
    assert upgraded is not None and upgraded.startswith("$argon2id$v=19$m=8192,t=1,p=1$")


@pytest.mark.parametrize(
    ("stored", "current"),
    [
        (dict(time_cost=2, memory_cost=8), dict(time_cost=1, memory_cost=16)),
        (dict(time_cost=1, memory_cost=16), dict(time_cost=2, memory_cost=8)),
        (dict(hash_len=32, time_cost=1), dict(hash_len=16, time_cost=2)),
        (dict(salt_len=16, memory_cost=8), dict(salt_len=8, memory_cost=16)),
        (dict(time_cost=2), dict(time_cost=1)),
        (dict(memory_cost=16), dict(memory_cost=8)),
        (dict(parallelism=2, memory_cost=16), dict(parallelism=1, memory_cost=16)),
        (dict(parallelism=1, memory_cost=16), dict(parallelism=2, memory_cost=16)),
    ],
    ids=[
        "time-down-memory-up",
        "memory-down-time-up",
        "hash-len-down",
        "salt-len-down",
        "time-down",
        "memory-down",
        "parallelism-only-down",
        "parallelism-only-up",
    ],
)
def test_no_upgrade_unless_nothing_goes_down(
    stored: dict[str, int], current: dict[str, int]
) -> None:
    """Any dimension that would go down blocks the upgrade; parallelism alone never counts."""
    old = SecretHasher(dataclasses.replace(CHEAPEST_PARAMETERS, **stored)).hash(SECRET)
    hasher = SecretHasher(dataclasses.replace(CHEAPEST_PARAMETERS, **current))
    assert hasher.verify(old, SECRET) == (True, None)


@pytest.mark.parametrize(
    "stronger",
    [
        dict(time_cost=2),
        dict(memory_cost=16),
        dict(hash_len=64),
        dict(salt_len=16),
        dict(memory_cost=16, parallelism=2),
    ],
    ids=["time", "memory", "hash-len", "salt-len", "memory-and-parallelism"],
)
def test_one_dimension_up_upgrades(hasher: SecretHasher, stronger: dict[str, int]) -> None:
    """Stronger in one dimension and equal in the rest is an upgrade, to exactly those."""
    current = dataclasses.replace(CHEAPEST_PARAMETERS, **stronger)
    matched, upgraded = SecretHasher(current).verify(hasher.hash(SECRET), SECRET)
    assert matched is True and upgraded is not None
    params = argon2.extract_parameters(upgraded)
    for name, value in stronger.items():
        assert getattr(params, name) == value


def test_argon2d_stronger_hasher_upgrades_type_and_cost() -> None:
    """An argon2d hash at a lower cost is upgraded to argon2id at the configured cost."""
    legacy = argon2.PasswordHasher(
        time_cost=1, memory_cost=8, parallelism=1, salt_len=8, type=argon2.Type.D
    ).hash(SECRET)
    matched, upgraded = SecretHasher(STRONGER).verify(legacy, SECRET)
    assert matched is True
    assert upgraded is not None and upgraded.startswith("$argon2id$v=19$m=16,t=2,p=1$")


def test_argon2i_with_higher_cost_is_not_downgraded(hasher: SecretHasher) -> None:
    """A costlier argon2i hash is left alone by a cheaper argon2id hasher: the variant alone
    does not justify lowering the cost."""
    legacy = argon2.PasswordHasher(
        time_cost=2, memory_cost=16, parallelism=1, salt_len=8, type=argon2.Type.I
    ).hash(SECRET)
    assert hasher.verify(legacy, SECRET) == (True, None)


def test_version_1_0_hash_is_upgraded(hasher: SecretHasher) -> None:
    """A hash made with argon2 version 1.0 (v=16) at the same cost is upgraded to v=19."""
    raw = argon2.low_level.hash_secret(
        SECRET.encode(),
        b"saltsalt",
        time_cost=1,
        memory_cost=8,
        parallelism=1,
        hash_len=32,
        type=argon2.Type.ID,
        version=16,
    ).decode()
    assert "$v=16$" in raw
    matched, upgraded = hasher.verify(raw, SECRET)
    assert matched is True
    assert upgraded is not None and "$v=19$" in upgraded


# -- never downgrade, end to end --------------------------------------------------------


@pytest.mark.anyio
async def test_cheap_verifier_keeps_a_default_hash(store: KeyStore) -> None:
    """A key minted at default cost, verified by a Verifier with CHEAPEST_PARAMETERS,
    keeps its stored hash byte for byte."""
    created = await KeyManager(store).create(owner="acme", name="prod")
    before = created.record.secret_hash
    assert before.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    verifier = Verifier(store, hasher=SecretHasher(CHEAPEST_PARAMETERS))
    await verifier.verify(created.key.encode())
    stored = await store.get(created.id)
    assert stored is not None and stored.secret_hash == before


@pytest.mark.anyio
async def test_cheap_middleware_keeps_a_default_hash(store: KeyStore) -> None:
    """One request through a middleware configured with CHEAPEST_PARAMETERS does not
    rewrite a default-cost hash."""
    created = await KeyManager(store).create(owner="acme", name="prod")
    app = protect(store, argon2=CHEAPEST_PARAMETERS)
    async with client(app) as c:
        r = await c.get("/whoami", headers={"X-API-Key": created.key})
    await app.aclose()
    assert r.status_code == 200
    stored = await store.get(created.id)
    assert stored is not None and stored.secret_hash == created.record.secret_hash


@pytest.mark.anyio
async def test_default_middleware_upgrades_a_cheap_hash(store: KeyStore) -> None:
    """The other way round, the middleware upgrades the hash, and the key still works."""
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="a", name="k")
    app = protect(store, argon2=DEFAULT_PARAMETERS)
    async with client(app) as c:
        first = await c.get("/whoami", headers={"X-API-Key": created.key})
    await app.aclose()
    stored = await store.get(created.id)
    assert first.status_code == 200
    assert stored is not None and stored.secret_hash.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    app = protect(store, argon2=DEFAULT_PARAMETERS)
    async with client(app) as c:
        again = await c.get("/whoami", headers={"X-API-Key": created.key})
    await app.aclose()
    assert again.status_code == 200
