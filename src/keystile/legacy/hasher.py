"""``LegacyHasher``: keystile's argon2id hasher that also takes an imported hash once.

The verifier hands every miss to its hasher in the argon2 worker pool. For an imported
hash this one checks the key with the source's algorithm (``schemes.verify_hash``) and,
on a match, returns a fresh argon2id hash of it as the upgrade, which the verifier stores
(recording ``rehashed``). The next miss of that key, in any process, is an ordinary
argon2id verification; an imported hash never authenticates through argon2 itself.
"""

from __future__ import annotations

from ..hashing import DEFAULT_PARAMETERS, Argon2Parameters, SecretHasher
from ..stores.rules import IMPORTED_HASH, imported_algorithm
from .schemes import verify_hash

__all__ = ["LegacyHasher"]


class LegacyHasher(SecretHasher):
    """A ``SecretHasher`` that verifies imported hashes too (``pepper``: keyshield's)."""

    __slots__ = ("_pepper",)

    def __init__(self, parameters: Argon2Parameters = DEFAULT_PARAMETERS, *, pepper: str) -> None:
        super().__init__(parameters)
        self._pepper = pepper

    def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        algorithm = imported_algorithm(secret_hash)
        if algorithm is None:
            return super().verify(secret_hash, secret)
        stored = secret_hash[len(IMPORTED_HASH) + len(algorithm) + 1 :]
        if not verify_hash(algorithm, stored, secret, pepper=self._pepper):
            return False, None
        return True, self.hash(secret)
