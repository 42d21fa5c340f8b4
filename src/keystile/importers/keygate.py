"""fastapi-keygate: its ``keygate_keys`` table.

Its keys are ``kg_<prefix>_<secret>``; the table holds the prefix, the SHA-256 of the
whole key, the owner (``owner_id``), a name, per-minute and per-hour limits, scopes
(space-separated), and ``created_at``, ``revoked_at`` and ``expires_at`` (naive UTC).
Versions before ``expires_at`` and ``scopes`` existed read as keys without them. The
per-minute limit becomes the key's rate limit (else the per-hour one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .database import moment, read_table
from .records import Skipped, SourceKey, keys_of

__all__ = ["SOURCE", "TABLE", "read_keys"]

SOURCE = "keygate"
TABLE = "keygate_keys"
_REQUIRED = ("id", "prefix", "key_hash", "owner_id", "created_at", "revoked_at")
_OPTIONAL = ("name", "per_minute", "per_hour", "expires_at", "scopes")
_LAYOUT = "fastapi-keygate keeps its keys in such a table"


def _rate_limit(per_minute: object, per_hour: object) -> str | None:
    if isinstance(per_minute, int):
        return f"{per_minute}/minute"
    if isinstance(per_hour, int):
        return f"{per_hour}/hour"
    return None


def _key(row: Mapping[str, Any]) -> SourceKey:
    return SourceKey(
        source_id=str(row["id"]),
        public=str(row["prefix"]),
        algorithm="sha256",
        hash=str(row["key_hash"]),
        name=None if row["name"] is None else str(row["name"]),
        owner=str(row["owner_id"]),
        scopes=tuple(str(row["scopes"] or "").split()),
        created_at=moment(row["created_at"]),
        expires_at=moment(row["expires_at"]),
        revoked_at=moment(row["revoked_at"]),
        rate_limit=_rate_limit(row["per_minute"], row["per_hour"]),
    )


async def read_keys(url: str, *, table: str = TABLE) -> list[SourceKey | Skipped]:
    return keys_of(await read_table(url, table, _REQUIRED, _OPTIONAL, layout=_LAYOUT), _key)
