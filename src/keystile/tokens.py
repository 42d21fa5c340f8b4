"""The key format: ``{prefix}_{key_id}_{secret}{checksum}``.

* ``prefix``: 1-16 lowercase letters and digits, starting with a letter (``ks`` by default),
  so secret scanners can recognise a leaked key;
* ``key_id``: 12 base62 characters (71 random bits), public, the store's primary key;
* ``secret``: 43 base62 characters encoding 256 random bits from :mod:`secrets`;
* ``checksum``: 6 base62 characters of the CRC32 of everything before it, so a typo or
  random garbage is rejected before any store is touched (as GitHub tokens do).

Base62 has no ``_``, so the two underscores split the key unambiguously.
"""

from __future__ import annotations

import re
import secrets
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import ConfigurationError, InvalidToken

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_TOKEN_LENGTH",
    "ParsedKey",
    "generate_key",
    "key_matcher",
    "new_key_id",
    "normalize_key_id",
    "parse_key",
    "redact",
    "scanning_pattern",
    "validate_prefix",
]

DEFAULT_PREFIX = "ks"
KEY_ID_LENGTH = 12
SECRET_LENGTH = 43
CHECKSUM_LENGTH = 6
MAX_PREFIX_LENGTH = 16
#: No valid key is longer; anything longer is rejected before it is hashed.
MAX_TOKEN_LENGTH = MAX_PREFIX_LENGTH + 2 + KEY_ID_LENGTH + SECRET_LENGTH + CHECKSUM_LENGTH

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DISPLAY_RE = re.compile(
    rf"(?:[a-z][a-z0-9]{{0,15}}_)?([0-9A-Za-z]{{{KEY_ID_LENGTH}}})(?:…|\.\.\.)?"
)
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
_KEY_RE = re.compile(
    rb"([a-z][a-z0-9]{0,15})_([0-9A-Za-z]{%d})_([0-9A-Za-z]{%d})"
    % (KEY_ID_LENGTH, SECRET_LENGTH + CHECKSUM_LENGTH)
)


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        chars.append(_ALPHABET[digit])
    if value:
        raise ValueError("value does not fit the width")
    return "".join(reversed(chars))


def _checksum(body: bytes) -> bytes:
    return _base62(zlib.crc32(body), CHECKSUM_LENGTH).encode("ascii")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key split into its parts. The secret never shows in ``repr``."""

    prefix: str
    key_id: str
    secret: str = field(repr=False)

    @property
    def redacted(self) -> str:
        return redact(self.key_id, self.prefix)


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigurationError(
            "key prefix must be 1-16 lowercase letters or digits, starting with a letter"
        )
    return prefix


def new_key_id() -> str:
    return _base62(secrets.randbits(71), KEY_ID_LENGTH)


def generate_key(prefix: str = DEFAULT_PREFIX, key_id: str | None = None) -> tuple[str, ParsedKey]:
    """Mint a new key; returns the plaintext (shown once) and its parts."""
    validate_prefix(prefix)
    key_id = key_id or new_key_id()
    if len(key_id) != KEY_ID_LENGTH or not all(c in _ALPHABET for c in key_id):
        raise ConfigurationError(f"key_id must be {KEY_ID_LENGTH} base62 characters")
    secret = _base62(int.from_bytes(secrets.token_bytes(32), "big"), SECRET_LENGTH)
    body = f"{prefix}_{key_id}_{secret}".encode("ascii")
    return (body + _checksum(body)).decode("ascii"), ParsedKey(prefix, key_id, secret)


def parse_key(token: bytes | str) -> ParsedKey:
    """Split and check a presented key without touching any store.

    Raises :class:`InvalidToken` with reason ``malformed`` (wrong shape, length or
    characters) or ``bad_checksum``.
    """
    raw = token.encode("utf-8", "replace") if isinstance(token, str) else token
    if len(raw) > MAX_TOKEN_LENGTH:
        raise InvalidToken("malformed")
    match = _KEY_RE.fullmatch(raw)
    if match is None:
        raise InvalidToken("malformed")
    prefix, key_id, tail = match.groups()
    secret, checksum = tail[:SECRET_LENGTH], tail[SECRET_LENGTH:]
    if checksum != _checksum(raw[:-CHECKSUM_LENGTH]):
        raise InvalidToken("bad_checksum")
    return ParsedKey(prefix.decode("ascii"), key_id.decode("ascii"), secret.decode("ascii"))


def key_matcher(prefixes: Iterable[str] = (DEFAULT_PREFIX,)) -> Callable[[bytes], bool]:
    """A test of whether a presented token is meant as a keystile key.

    True for the full key shape with any prefix, and for anything starting with one of
    ``prefixes`` and ``_`` (a truncated or mistyped key). Such a token is verified and, if
    not valid, refused; any other bearer token (a JWT, an OAuth access token) can be left
    for the app's own authentication.
    """
    starts = tuple(f"{validate_prefix(p)}_".encode("ascii") for p in prefixes)
    fullmatch = _KEY_RE.fullmatch

    def is_key(token: bytes) -> bool:
        return token.startswith(starts) or fullmatch(token) is not None

    return is_key


def normalize_key_id(text: str) -> str:
    """The key id in ``text``, which may be the id itself or its display form
    (``ks_AbC123def456`` or ``ks_AbC123def456…``, as ``redact`` and ``keystile list`` show it).

    A whole key pasted by mistake gives its id, so its secret is never echoed back in a
    "no such key" message. Anything else is returned stripped but unchanged, so it fails
    as an unknown id.
    """
    stripped = text.strip()
    whole = _KEY_RE.fullmatch(stripped.encode("utf-8", "replace"))
    if whole is not None:
        return whole.group(2).decode("ascii")
    match = _DISPLAY_RE.fullmatch(stripped)
    return match.group(1) if match is not None else stripped


def redact(key_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The display form of a key: its public parts and an ellipsis, e.g. ``ks_AbC123def456…``."""
    return f"{prefix}_{key_id}…"


def scanning_pattern(prefixes: Iterable[str] = (DEFAULT_PREFIX,)) -> str:
    """The regular expression a secret scanner is given to find leaked keys with these
    ``prefixes``: the whole key between word boundaries, in the syntax GitHub's partner
    program and most scanners take (no look-arounds)."""
    names = "|".join(validate_prefix(p) for p in dict.fromkeys(prefixes))
    group = names if "|" not in names else f"(?:{names})"
    tail = SECRET_LENGTH + CHECKSUM_LENGTH
    return rf"\b{group}_[0-9A-Za-z]{{{KEY_ID_LENGTH}}}_[0-9A-Za-z]{{{tail}}}\b"
