"""The key shapes of the libraries keystile imports from, and how each key is found.

A legacy key keeps its string. Its *public part* (djangorestframework-api-key's prefix,
fastapi-keygate's prefix, keyshield's key id) names its record: ``<tag>.<public>``, with
``tag`` the record's ``prefix`` (``drf``, ``keygate``, ``keyshield``). A keystile key id
is 12 base62 characters and has no dot, so the two never meet. Parsing a presented token
touches no store; a token of no known shape is malformed, as any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..tokens import ParsedKey

__all__ = ["FORMATS", "MAX_LEGACY_TOKEN_LENGTH", "LegacyFormat", "keyshield_format"]

#: No legacy key this module parses is longer (keyshield's, 87 bytes by default, is the
#: longest); anything longer is refused before it is hashed, as keystile's own keys are.
MAX_LEGACY_TOKEN_LENGTH = 160
_PUBLIC = re.compile(r"[A-Za-z0-9]{1,36}")
_KEYSHIELD_PREFIX = re.compile(r"[A-Za-z0-9_]{1,16}")


@dataclass(frozen=True, slots=True)
class LegacyFormat:
    """One library's key shape: ``pattern``'s first group is the public part."""

    name: str
    tag: str
    pattern: re.Pattern[bytes]
    #: The importers' ``--format`` help: what a key of this shape looks like.
    example: str

    def record_id(self, public: str) -> str:
        """The keystile record id of the key whose public part is ``public``."""
        if not _PUBLIC.fullmatch(public):
            raise ValueError(f"a {self.name} public part is 1-36 letters or digits")
        return f"{self.tag}.{public}"

    def parse(self, token: bytes) -> ParsedKey | None:
        """The key's record id, with the whole token as the secret (what the imported hash
        and, once rehashed, the argon2 hash are of), or ``None`` if not of this shape."""
        match = self.pattern.fullmatch(token)
        if match is None:
            return None
        return ParsedKey(self.tag, f"{self.tag}.{match.group(1).decode()}", token.decode())


def keyshield_format(prefix: str = "ak_v1") -> LegacyFormat:
    """keyshield's keys, ``<prefix>-<key id>-<secret>`` (its default global prefix
    ``ak_v1``; a service configured with another passes it as ``prefix``)."""
    if not _KEYSHIELD_PREFIX.fullmatch(prefix):
        raise ValueError("a keyshield prefix is 1-16 letters, digits or underscores")
    pattern = re.escape(prefix.encode()) + rb"-([A-Za-z0-9]{1,36})-[A-Za-z0-9]{1,100}"
    return LegacyFormat(
        "keyshield", "keyshield", re.compile(pattern), f"{prefix}-<key id>-<secret>"
    )


#: The shapes by name, with their default options.
FORMATS: dict[str, LegacyFormat] = {
    "drf-api-key": LegacyFormat(
        "drf-api-key",
        "drf",
        re.compile(rb"([A-Za-z0-9]{1,36})\.[A-Za-z0-9]{1,100}"),
        "<prefix>.<secret>",
    ),
    "keygate": LegacyFormat(
        "keygate",
        "keygate",
        re.compile(rb"kg_([0-9a-f]{1,16})_[A-Za-z0-9_-]{1,100}"),
        "kg_<prefix>_<secret>",
    ),
    "keyshield": keyshield_format(),
}
