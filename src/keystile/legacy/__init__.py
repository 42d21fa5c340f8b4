"""Keys issued by other libraries, working unchanged: the middleware's ``legacy_formats``.

``legacy_formats=["drf-api-key", "keygate"]`` (or a dict of per-format options, such as
``{"keyshield": {"pepper": ...}}``) lets the middleware read the key shapes of those
libraries (``formats.py``). Such a key is looked up by its public part, verified once
with the algorithm it was imported with (``schemes.py``) in the argon2 worker pool, then
rehashed to argon2id (``hasher.py``); from then on it is an ordinary key on the same
constant-time cache path. A legacy token that matches no record costs what an unknown
keystile key does: one store read, no hashing, and the negative cache answers it next.

keyshield peppers its hashes: the pepper comes from the option, else the
``KEYSTILE_KEYSHIELD_PEPPER`` environment variable, else keyshield's own default. It is
held in memory only, never stored or shown.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, InvalidToken
from ..hashing import Argon2Parameters
from ..tokens import ParsedKey, parse_key
from .formats import FORMATS, MAX_LEGACY_TOKEN_LENGTH, LegacyFormat, keyshield_format
from .hasher import LegacyHasher
from .schemes import KEYSHIELD_DEFAULT_PEPPER

__all__ = ["KEYSHIELD_PEPPER_ENV", "LegacyFormats", "LegacyOption"]

KEYSHIELD_PEPPER_ENV = "KEYSTILE_KEYSHIELD_PEPPER"

#: What ``legacy_formats`` takes: format names, or names with their options.
LegacyOption = Iterable[str] | Mapping[str, Mapping[str, str] | None]

_OPTIONS = {"drf-api-key": frozenset(), "keygate": frozenset(), "keyshield": {"pepper", "prefix"}}


@dataclass(frozen=True, slots=True)
class LegacyFormats:
    """The legacy key shapes a middleware reads, and keyshield's pepper (never shown)."""

    formats: tuple[LegacyFormat, ...]
    pepper: str = field(default=KEYSHIELD_DEFAULT_PEPPER, repr=False)
    max_token_length: int = MAX_LEGACY_TOKEN_LENGTH

    @classmethod
    def from_option(cls, option: LegacyOption | None) -> LegacyFormats | None:
        """The formats ``legacy_formats`` names, checked (``None`` for none)."""
        if not option:
            return None
        if isinstance(option, (str, bytes)):
            raise TypeError(f"legacy_formats takes a list of names, not one string: {option!r}")
        given: Mapping[str, Any] = option if isinstance(option, Mapping) else dict.fromkeys(option)
        formats, pepper = [], os.environ.get(KEYSHIELD_PEPPER_ENV) or KEYSHIELD_DEFAULT_PEPPER
        for name, options in given.items():
            if name not in FORMATS:
                raise ConfigurationError(
                    f"unknown legacy format {name!r}; known: {', '.join(FORMATS)}"
                )
            options = dict(options or {})
            unknown = set(options) - _OPTIONS[name]
            if unknown:
                raise ConfigurationError(
                    f"legacy format {name!r} takes no option {', '.join(sorted(unknown))}"
                )
            if name == "keyshield":
                pepper = options.get("pepper") or pepper
                try:
                    formats.append(keyshield_format(options.get("prefix", "ak_v1")))
                except ValueError as exc:
                    raise ConfigurationError(str(exc)) from None
            else:
                formats.append(FORMATS[name])
        return cls(tuple(formats), pepper)

    def parse(self, token: bytes) -> ParsedKey:
        """A keystile key, else a key of one of the formats, else keystile's refusal."""
        try:
            return parse_key(token)
        except InvalidToken:
            for legacy in self.formats:
                parsed = legacy.parse(token)
                if parsed is not None:
                    return parsed
            raise

    def matches(self, token: bytes) -> bool:
        """Whether ``token`` has one of the formats' shapes (a credential to verify)."""
        return any(f.pattern.fullmatch(token) is not None for f in self.formats)

    def hasher(self, parameters: Argon2Parameters) -> LegacyHasher:
        return LegacyHasher(parameters, pepper=self.pepper)
