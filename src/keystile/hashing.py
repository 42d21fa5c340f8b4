"""argon2id at rest.

Why argon2 for 256-bit random secrets, which no dictionary attack can reach? Defence in
depth: a database dump may leak together with keys that were imported or are shorter
than ours, and the cost is paid once per key per process (the verified-key cache
remembers a proven key), not once per request.

Why these parameters (t=1, m=8 MiB, p=1, about 7 ms per verify on a 2-core machine)?
A high-entropy secret needs no memory-hard stretching against guessing; the cost only
has to make a dump of *weak* imported secrets expensive to attack while keeping cold
starts (active keys x verify cost) and miss floods cheap. The argon2-cffi default
(t=3, m=64 MiB, p=4) takes over 100 ms here, which would make every cache miss and
every cold start 20 times slower.

Why upgrades only ever go up: a stored hash is re-hashed on a successful verify only when
the configured parameters are at least as strong as the hash's in every dimension and
stronger in one (see :meth:`SecretHasher.verify`). argon2's ``check_needs_rehash`` asks
"different?", not "weaker?": one process started with test parameters (or an older,
cheaper configuration still running during a deploy) would otherwise rewrite every key
it verified to its own cheaper hash, and processes disagreeing on the parameters would
rewrite the same key back and forth.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHEAPEST_PARAMETERS", "DEFAULT_PARAMETERS", "Argon2Parameters", "SecretHasher"]


@dataclass(frozen=True, slots=True)
class Argon2Parameters:
    time_cost: int = 1
    memory_cost: int = 8 * 1024  # KiB
    parallelism: int = 1
    hash_len: int = 32
    salt_len: int = 16


#: The production default, measured in benchmarks/ (about 7 ms per verify).
DEFAULT_PARAMETERS = Argon2Parameters()
#: Hash shapes whose ``upgrades`` answer a hasher keeps (a store holds a few at most).
_SHAPES_KEPT = 64
#: For tests only: the cheapest parameters argon2 accepts.
CHEAPEST_PARAMETERS = Argon2Parameters(time_cost=1, memory_cost=8, parallelism=1, salt_len=8)


class SecretHasher:
    """Hash and verify key secrets with argon2id. Blocking: call it from a worker thread.

    argon2-cffi (and cffi) is imported by the first hasher made, not by importing keystile:
    a process that imports keystile and never verifies a secret does not load it, and the
    hit path never needs it.
    """

    __slots__ = (
        "_argon2",
        "_current",
        "_hasher",
        "_mismatch",
        "_type_strength",
        "_upgrades_by_shape",
        "parameters",
    )

    def __init__(self, parameters: Argon2Parameters = DEFAULT_PARAMETERS) -> None:
        import argon2
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
        from argon2.low_level import ARGON2_VERSION

        self._argon2 = argon2
        #: What a failed verification raises: every one is a mismatch.
        self._mismatch = (VerifyMismatchError, VerificationError, InvalidHashError, UnicodeError)
        #: The variants ranked as password hashes: argon2id resists both the side channels
        #: argon2d is open to and the time-memory trade-offs argon2i is open to.
        self._type_strength = {argon2.Type.D: 0, argon2.Type.I: 0, argon2.Type.ID: 1}
        self.parameters = parameters
        self._current = argon2.Parameters(
            type=argon2.Type.ID,
            version=ARGON2_VERSION,
            salt_len=parameters.salt_len,
            hash_len=parameters.hash_len,
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost,
            parallelism=parameters.parallelism,
        )
        self._hasher = argon2.PasswordHasher.from_parameters(self._current)
        #: ``upgrades`` by the hash's shape (its parameters and the lengths of its salt
        #: and digest, all it depends on): asked on every miss, for a handful of shapes.
        self._upgrades_by_shape: dict[tuple[str | int, ...], bool] = {}

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, secret_hash: str, secret: str) -> tuple[bool, str | None]:
        """Return ``(matched, upgraded_hash)``.

        ``upgraded_hash`` is a fresh hash at the current parameters when the secret
        matched a hash they would strengthen (:meth:`upgrades`), else ``None``: a hasher
        configured with weaker parameters never rewrites a stronger stored hash.
        A corrupt stored hash counts as a mismatch: it can never authenticate.
        """
        try:
            self._hasher.verify(secret_hash, secret)
        except self._mismatch:
            return False, None
        if self.upgrades(secret_hash):
            return True, self._hasher.hash(secret)
        return True, None

    def upgrades(self, secret_hash: str) -> bool:
        """Whether re-hashing ``secret_hash`` at this hasher's parameters strengthens it.

        True only when no dimension goes down (time and memory cost, hash and salt
        length, the variant with argon2id above argon2i/argon2d, the argon2 version) and
        at least one goes up. Parallelism counts neither way: it spreads the same work
        over lanes rather than adding any. A hash that cannot be parsed is left alone.
        """
        parts = secret_hash.split("$")
        if len(parts) != 6:
            return self._upgrades(secret_hash)
        shape: tuple[str | int, ...] = (*parts[:4], len(parts[4]), len(parts[5]))
        known = self._upgrades_by_shape.get(shape)
        if known is None:
            if len(self._upgrades_by_shape) >= _SHAPES_KEPT:
                self._upgrades_by_shape.clear()
            known = self._upgrades_by_shape[shape] = self._upgrades(secret_hash)
        return known

    def _upgrades(self, secret_hash: str) -> bool:
        argon2 = self._argon2
        try:
            stored = argon2.extract_parameters(secret_hash)
        except argon2.exceptions.InvalidHashError:
            return False
        current, strength = self._current, self._type_strength
        pairs = [
            (current.time_cost, stored.time_cost),
            (current.memory_cost, stored.memory_cost),
            (current.hash_len, stored.hash_len),
            (current.salt_len, stored.salt_len),
            (strength[current.type], strength[stored.type]),
            (current.version, stored.version),
        ]
        return all(new >= old for new, old in pairs) and any(new > old for new, old in pairs)
