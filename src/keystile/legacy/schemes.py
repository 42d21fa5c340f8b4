"""The hash algorithms an imported key can carry, each checked as its source library
checks it.

An imported hash is stored as ``imported$<algorithm>$<hash>`` (``stores.rules``); argon2
takes no such string, so it authenticates nothing until a middleware with
``legacy_formats`` verifies the key once with the algorithm below and rehashes it to
argon2id. Fast hashes of the whole key (SHA-256, SHA-512) are compared in constant time;
the password hashers (PBKDF2, argon2) run in the argon2 worker pool like every miss.

An importer checks each hash before it is stored (:func:`check_hash`): an unknown
algorithm, a malformed hash, or a cost beyond the bounds below (a forged hash that would
make one verification take minutes) is refused with a reason, and the key is skipped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

__all__ = [
    "ALGORITHMS",
    "KEYSHIELD_DEFAULT_PEPPER",
    "UnsupportedHash",
    "check_hash",
    "verify_hash",
]

#: What keyshield peppers with when its deployment set no pepper of its own.
KEYSHIELD_DEFAULT_PEPPER = "super-secret-pepper"

#: The algorithms an importer accepts, and what each hashes: the whole key as the client
#: sends it, except ``keyshield-argon2`` (the key's last part followed by the pepper).
ALGORITHMS = {
    "sha256": "hex SHA-256 of the whole key (fastapi-keygate)",
    "sha512": "hex SHA-512 of the whole key (djangorestframework-api-key 2.x and 3.x)",
    "pbkdf2_sha256": "Django's PBKDF2 string of the whole key (djangorestframework-api-key 1.x)",
    "argon2": "an argon2 string ($argon2id$…) of the whole key",
    "keyshield-argon2": "keyshield's argon2 string of the key's secret part and the pepper",
}

#: Bounds on what one verification may cost, far above what the libraries use.
PBKDF2_MAX_ITERATIONS = 5_000_000
ARGON2_MAX_MEMORY_KIB = 512 * 1024
ARGON2_MAX_TIME_COST = 16
ARGON2_MAX_PARALLELISM = 16

_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
_PBKDF2 = re.compile(r"pbkdf2_sha256\$([0-9]{1,9})\$([!-#%-~]{1,128})\$([A-Za-z0-9+/]{43}=)")
_ARGON2 = re.compile(
    r"\$argon2(?:id|i|d)\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)


class UnsupportedHash(ValueError):
    """A hash that cannot be imported; ``reason`` is ``unknown_algorithm`` or ``invalid_hash``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_hash(algorithm: str, source_hash: str) -> str:
    """``source_hash`` as stored, or :class:`UnsupportedHash` saying why it cannot be."""
    if algorithm not in ALGORITHMS:
        raise UnsupportedHash(
            "unknown_algorithm",
            f"unknown hash algorithm {algorithm[:40]!r}; known: {', '.join(ALGORITHMS)}",
        )
    stored = source_hash.strip()
    if algorithm in _HEX:
        stored = stored.lower()
        if not _HEX[algorithm].fullmatch(stored):
            raise UnsupportedHash("invalid_hash", f"not a hex {algorithm} digest")
        return stored
    if algorithm == "pbkdf2_sha256":
        match = _PBKDF2.fullmatch(stored)
        if match is None or not 1 <= int(match.group(1)) <= PBKDF2_MAX_ITERATIONS:
            raise UnsupportedHash(
                "invalid_hash",
                f"not a Django pbkdf2_sha256 string with 1-{PBKDF2_MAX_ITERATIONS} iterations",
            )
        return stored
    if stored.startswith("argon2$argon2"):  # Django's form: its name, then the argon2 string
        stored = stored[len("argon2") :]
    _check_argon2(stored)
    return stored


def _check_argon2(stored: str) -> None:
    import argon2

    if _ARGON2.fullmatch(stored) is None:
        raise UnsupportedHash("invalid_hash", "not an argon2 string")
    try:
        cost = argon2.extract_parameters(stored)
    except argon2.exceptions.InvalidHashError:
        raise UnsupportedHash("invalid_hash", "not an argon2 string") from None
    if (
        cost.memory_cost > ARGON2_MAX_MEMORY_KIB
        or cost.time_cost > ARGON2_MAX_TIME_COST
        or cost.parallelism > ARGON2_MAX_PARALLELISM
    ):
        raise UnsupportedHash("invalid_hash", "argon2 cost beyond what a verification may take")


def verify_hash(algorithm: str, stored: str, token: str, *, pepper: str) -> bool:
    """Whether ``token`` (the whole key as presented) matches ``stored``. Blocking (the
    password hashers): run it in a worker thread. An unknown algorithm never matches."""
    key = token.encode("utf-8")
    if algorithm == "sha256":
        return hmac.compare_digest(hashlib.sha256(key).hexdigest(), stored)
    if algorithm == "sha512":
        return hmac.compare_digest(hashlib.sha512(key).hexdigest(), stored)
    if algorithm == "pbkdf2_sha256":
        match = _PBKDF2.fullmatch(stored)
        if match is None or int(match.group(1)) > PBKDF2_MAX_ITERATIONS:
            return False
        iterations, salt, expected = int(match.group(1)), match.group(2), match.group(3)
        derived = hashlib.pbkdf2_hmac("sha256", key, salt.encode("utf-8"), iterations)
        return hmac.compare_digest(base64.b64encode(derived).decode("ascii"), expected)
    if algorithm == "argon2":
        return _argon2_matches(stored, token)
    if algorithm == "keyshield-argon2":
        return _argon2_matches(stored, token.rpartition("-")[2] + pepper)
    return False


def _argon2_matches(stored: str, material: str) -> bool:
    import argon2

    try:
        _check_argon2(stored)
        return bool(argon2.PasswordHasher().verify(stored, material))
    except (
        UnsupportedHash,
        argon2.exceptions.VerificationError,
        argon2.exceptions.InvalidHashError,
    ):
        return False
