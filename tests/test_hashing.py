"""argon2id at rest: hash, verify, and upgrade on a successful verify (``keystile.hashing``)."""

from __future__ import annotations

import argon2
import pytest

from keystile.hashing import (
    CHEAPEST_PARAMETERS,
    DEFAULT_PARAMETERS,
    Argon2Parameters,
    SecretHasher,
)

SECRET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg"
#: Different from CHEAPEST_PARAMETERS in every cost, still cheap to compute.
OLD_PARAMETERS = Argon2Parameters(time_cost=2, memory_cost=16, parallelism=2, salt_len=8)


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
