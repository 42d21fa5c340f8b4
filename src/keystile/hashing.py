"""argon2id at rest.

Why argon2 for 256-bit random secrets, which no dictionary attack can reach? Defence in
depth: a database dump may leak together with keys that were imported or are shorter
than ours, and the cost is paid once per key per process (the verified-key cache
remembers a proven key), not once per request.

Why these parameters (t=1, m=8 MiB, p=1, about 4 ms per verify on a 2-core machine)?
A high-entropy secret needs no memory-hard stretching against guessing; the cost only
has to make a dump of *weak* imported secrets expensive to attack while keeping cold
starts (active keys x verify cost) and miss floods cheap. The argon2-cffi default
(t=3, m=64 MiB, p=4) takes over 100 ms here, which would make every cache miss and
every cold start 25 times slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["CHEAPEST_PARAMETERS", "DEFAULT_PARAMETERS", "Argon2Parameters", "SecretHasher"]


@dataclass(frozen=True, slots=True)
class Argon2Parameters:
    time_cost: int = 1
    memory_cost: int = 8 * 1024  # KiB
    parallelism: int = 1
    hash_len: int = 32
    salt_len: int = 16


#: The production default, measured in benchmarks/ (about 4 ms per verify).
DEFAULT_PARAMETERS = Argon2Parameters()
#: For tests only: the cheapest parameters argon2 accepts.
CHEAPEST_PARAMETERS = Argon2Parameters(time_cost=1, memory_cost=8, parallelism=1, salt_len=8)


class SecretHasher:
    """Hash and verify key secrets with argon2id. Blocking: call it from a worker thread."""

    __slots__ = ("_hasher", "parameters")

    def __init__(self, parameters: Argon2Parameters = DEFAULT_PARAMETERS) -> None:
        self.parameters = parameters
        self._hasher = argon2.PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost,
            parallelism=parameters.parallelism,
            hash_len=parameters.hash_len,
            salt_len=parameters.salt_len,
            type=argon2.Type.ID,
        )

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        """Return ``(matched, upgraded_hash)``.

        ``upgraded_hash`` is a fresh hash at the current parameters when the secret
        matched a hash made with other parameters (``check_needs_rehash``), else ``None``.
        A corrupt stored hash counts as a mismatch: it can never authenticate.
        """
        try:
            self._hasher.verify(secret_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError, UnicodeError):
            return False, None
        if self._hasher.check_needs_rehash(secret_hash):
            return True, self._hasher.hash(secret)
        return True, None
