"""The fleet's verification memo: argon2 once per key per fleet, not once per process.

Each process proves a key's secret with argon2 once and caches it; a fleet of N processes
pays it N times after every deploy. With ``verification_memo="redis://…"`` and a memo
secret, the process whose argon2 accepted a token leaves in Redis::

    name  = <prefix>:memo:hex(HMAC(name key, token)[:16])
    value = HMAC(value key, token ‖ 0 ‖ the key's stored argon2 hash)      (32 bytes, TTL)

both keys derived from the memo secret, which comes from ``KEYSTILE_MEMO_SECRET`` or
``memo_secret=``, never from the database or Redis. Another process that misses its
cache asks Redis for the name as it reads the key's record (``ask``: the GET is sent
before the store read, so the two round trips overlap), then compares the value with the
one it computes from the record's hash, in constant time (``recall``). Equal: the secret was
proven against this very hash, so argon2 is skipped; the key's state (revoked, expired,
disabled) is still the record's, read from the store as on every miss. Anything else
(no entry, another value, Redis down) runs argon2 as without a memo.

Why it cannot admit a wrong key:

* the value binds the token and the stored hash: a rotation (a new key), a rehash (a new
  hash) or a copy of another token's entry gives another value, so a stale or moved
  entry never matches, and a revocation is the record's state, read from the store;
* without the secret nobody can compute a name or a value: reading Redis shows neither
  tokens nor key ids, and a written entry never matches (docs/security.md, "The
  verification memo");
* a process whose hasher would strengthen the stored hash does not trust the memo: it runs
  argon2, so the rehash happens as without a memo.

Redis failing (refused, timed out, an unexpected answer) opens a breaker: for
``MEMO_RETRY_INTERVAL`` seconds no miss asks Redis, and every miss runs argon2. Nothing on
this path raises: the memo can only save argon2 runs, never refuse or admit a request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from .errors import ConfigurationError
from .limits.redis import redact_redis_url, split_key_prefix
from .resp import RespClient
from .tokens import ParsedKey

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "DEFAULT_MEMO_TTL",
    "MEMO_RETRY_INTERVAL",
    "MEMO_SECRET_ENV",
    "MEMO_TIMEOUT",
    "MIN_MEMO_SECRET_LENGTH",
    "MemoKeys",
    "NullMemo",
    "RedisVerificationMemo",
    "VerificationMemo",
    "check_memo_options",
    "memo_secret_from_env",
    "open_memo",
]

logger = logging.getLogger("keystile")

#: Where the memo secret comes from when ``memo_secret=`` is not given.
MEMO_SECRET_ENV = "KEYSTILE_MEMO_SECRET"  # noqa: S105 - the variable's name
#: Bytes a memo secret has at least (``secrets.token_urlsafe(32)`` gives 43 characters).
MIN_MEMO_SECRET_LENGTH = 32
#: Seconds an entry stays in Redis: long enough for a rolling deploy to find it. Its
#: validity does not depend on it (the hash and the state decide), only Redis's memory.
DEFAULT_MEMO_TTL = 86_400.0
#: Seconds Redis is left alone after a failure: misses run argon2 meanwhile, without
#: a round trip (or a connect timeout) each.
MEMO_RETRY_INTERVAL = 5.0
#: Seconds to connect to Redis and to wait for an answer before the memo counts as down.
#: Longer than the rate limiter's (0.25 s): only misses wait for it, giving up costs an
#: argon2 run, and on a busy host a tight timeout fires while Redis is merely slow.
MEMO_TIMEOUT = 0.5
#: The URL schemes of a Redis the memo can use.
_SCHEMES = ("redis", "rediss", "unix")
#: Bytes of the name's HMAC in the Redis key: 128 bits, no two tokens share one.
_NAME_BYTES = 16


class VerificationMemo(Protocol):
    """What the verifier asks on a miss (sent before the store read, answered after it)
    and tells after argon2."""

    hits: int
    misses: int
    errors: int

    def ask(self, parsed: ParsedKey) -> Any:
        """Start looking ``parsed``'s entry up, so the lookup overlaps the store read;
        what it returns goes to ``recall`` (``None``: ``recall`` looks it up itself)."""
        ...

    async def recall(
        self,
        parsed: ParsedKey,
        secret_hash: str,
        upgrades: Callable[[str], bool],
        asked: Any = None,
    ) -> bool:
        """True when an entry proves ``parsed``'s secret against ``secret_hash``: argon2
        may be skipped. ``upgrades(secret_hash)`` true: the hash is to be strengthened,
        which needs argon2, so the memo is not used."""
        ...

    async def remember(self, parsed: ParsedKey, secret_hash: str) -> None:
        """argon2 proved ``parsed``'s secret against ``secret_hash``: leave an entry."""
        ...

    async def aclose(self) -> None: ...


class NullMemo:
    """No memo: every miss runs argon2 (no ``verification_memo``, or no secret)."""

    hits = misses = errors = 0

    def ask(self, parsed: ParsedKey) -> None:
        return None

    async def recall(
        self,
        parsed: ParsedKey,
        secret_hash: str,
        upgrades: Callable[[str], bool],
        asked: Any = None,
    ) -> bool:
        return False

    async def remember(self, parsed: ParsedKey, secret_hash: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


class MemoKeys:
    """The names and values of entries, from the memo secret (two keys derived from it:
    one names entries, one makes their values)."""

    __slots__ = ("_name_key", "_value_key")

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        self._name_key = hmac.digest(raw, b"keystile verification memo: name", hashlib.sha256)
        self._value_key = hmac.digest(raw, b"keystile verification memo: value", hashlib.sha256)

    def name(self, parsed: ParsedKey) -> str:
        return hmac.digest(self._name_key, _token(parsed), hashlib.sha256)[:_NAME_BYTES].hex()

    def value(self, parsed: ParsedKey, secret_hash: str) -> bytes:
        message = _token(parsed) + b"\0" + secret_hash.encode()
        return hmac.digest(self._value_key, message, hashlib.sha256)


def _token(parsed: ParsedKey) -> bytes:
    return f"{parsed.prefix}_{parsed.key_id}_{parsed.secret}".encode()


class RedisVerificationMemo:
    """The memo in Redis (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://``);
    ``?key_prefix=NAME`` puts the entries under another prefix (default ``keystile``).
    One client per event loop (``resp.py``), as its connection belongs to the loop that
    made it."""

    def __init__(
        self,
        url: str,
        secret: str | bytes,
        *,
        ttl: float = DEFAULT_MEMO_TTL,
        timeout: float = MEMO_TIMEOUT,
        retry_interval: float = MEMO_RETRY_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.prefix = split_key_prefix(url)
        self.display_url = redact_redis_url(self.url)
        self.keys = MemoKeys(secret)
        self.ttl_ms = max(1, math.ceil(ttl * 1000))
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.monotonic = monotonic
        #: Misses answered by an entry, misses with no matching entry, and misses the
        #: memo could not answer (Redis failed, or skipped while the breaker is open).
        self.hits = self.misses = self.errors = 0
        self._down_until = -math.inf
        self._failing = False
        self._client: RespClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"RedisVerificationMemo({self.display_url!r})"

    def entry_key(self, parsed: ParsedKey) -> str:
        """The Redis key of ``parsed``'s entry."""
        return f"{self.prefix}:memo:{self.keys.name(parsed)}"

    def ask(self, parsed: ParsedKey) -> asyncio.Future[Any] | None:
        """Send the GET of ``parsed``'s entry now: its round trip overlaps the store read.
        ``None`` while Redis is left alone or not yet connected (``recall`` then asks)."""
        client = self._client
        if client is None or self.monotonic() < self._down_until:
            return None
        import asyncio

        if self._loop is not asyncio.get_running_loop():
            return None
        return client.get_soon(self.entry_key(parsed))

    async def recall(
        self,
        parsed: ParsedKey,
        secret_hash: str,
        upgrades: Callable[[str], bool],
        asked: asyncio.Future[Any] | None = None,
    ) -> bool:
        if upgrades(secret_hash):
            self.misses += 1
            return False
        if self.monotonic() < self._down_until:
            self.errors += 1
            return False
        try:
            if asked is not None:
                stored = await RespClient.value_of(asked)
            else:
                stored = await self._redis().get(self.entry_key(parsed))
        except Exception as exc:  # any client or socket failure: argon2 decides
            self._failed(exc)
            return False
        self._answered()
        expected = self.keys.value(parsed, secret_hash)
        if stored is not None and hmac.compare_digest(stored, expected):
            self.hits += 1
            return True
        self.misses += 1
        return False

    async def remember(self, parsed: ParsedKey, secret_hash: str) -> None:
        if self.monotonic() < self._down_until:
            return
        value = self.keys.value(parsed, secret_hash)
        try:
            await self._redis().set(self.entry_key(parsed), value, px=self.ttl_ms)
        except Exception as exc:
            self._failed(exc)
            return
        self._answered()

    async def aclose(self) -> None:
        import asyncio

        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    def _redis(self) -> RespClient:
        import asyncio

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = RespClient(self.url, timeout=self.timeout)
            self._loop = loop
        return self._client

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._down_until = self.monotonic() + self.retry_interval
        if not self._failing:
            self._failing = True
            logger.warning(
                "keystile: the verification memo at %s is unreachable (%s); "
                "misses run argon2 until it answers",
                self.display_url,
                type(exc).__name__,
            )

    def _answered(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("keystile: the verification memo at %s answers again", self.display_url)


def memo_secret_from_env() -> str | None:
    """``KEYSTILE_MEMO_SECRET``, or ``None`` when it is unset or empty."""
    return os.environ.get(MEMO_SECRET_ENV) or None


def check_memo_options(url: str | None, secret: str | bytes | None, ttl: float) -> None:
    """The ``ConfigurationError`` of a bad memo URL, secret or TTL (``url`` ``None``: no
    memo, nothing to check). A missing secret is no error: ``open_memo`` warns."""
    if url is None:
        return
    if not isinstance(url, str):
        raise ConfigurationError(f"verification_memo must be a redis:// URL, not {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"verification_memo must be a redis://, rediss:// or unix:// URL, "
            f"not {redact_redis_url(url)!r}"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    path = parts.path.strip("/")
    if parts.scheme.lower() != "unix" and (
        not parts.hostname or port == -1 or (path and not path.isdigit())
    ):
        raise ConfigurationError(
            "verification_memo must look like redis://host:port/db (a host, a numeric port "
            f"and database), not {redact_redis_url(url)!r}"
        )
    RespClient(split_key_prefix(url)[0], timeout=MEMO_TIMEOUT)  # its parameters, checked
    if not ttl > 0:
        raise ConfigurationError(f"memo_ttl must be positive, not {ttl!r}")
    if secret is not None:
        size = len(secret.encode() if isinstance(secret, str) else secret)
        if size < MIN_MEMO_SECRET_LENGTH:
            raise ConfigurationError(
                f"the memo secret ({MEMO_SECRET_ENV} or memo_secret=) must be at least "
                f"{MIN_MEMO_SECRET_LENGTH} bytes, not {size}: generate one with "
                'python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )


def open_memo(url: str | None, secret: str | bytes | None, *, ttl: float) -> VerificationMemo:
    """The memo of these (checked) options: Redis with a URL and a secret; otherwise
    ``NullMemo``, with a warning when a URL came without a secret."""
    if url is None:
        return NullMemo()
    if secret is None:
        logger.warning(
            "keystile: verification_memo is set but no memo secret (%s or memo_secret=): "
            "the memo is off, every process runs argon2 for every key",
            MEMO_SECRET_ENV,
        )
        return NullMemo()
    return RedisVerificationMemo(url, secret, ttl=ttl)
