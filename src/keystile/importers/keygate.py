"""fastapi-keygate: its ``keygate_keys`` table.

Its keys are ``kg_<prefix>_<secret>``; the table holds the prefix, the SHA-256 of the
whole key, the owner (``owner_id``), a name, per-minute and per-hour limits, scopes
(space-separated), and ``created_at``, ``revoked_at`` and ``expires_at`` (naive UTC).
Versions before ``expires_at`` and ``scopes`` existed read as keys without them. The
per-minute limit becomes the key's rate limit (else the per-hour one).
"""

from __future__ import annotations

from .database import moment, read_table
from .records import Skipped, SourceKey

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


async def read_keys(url: str, *, table: str = TABLE) -> list[SourceKey | Skipped]:
    rows = await read_table(url, table, _REQUIRED, _OPTIONAL, layout=_LAYOUT)
    keys: list[SourceKey | Skipped] = []
    for row in rows:
        try:
            created, revoked = moment(row["created_at"]), moment(row["revoked_at"])
            expires = moment(row["expires_at"])
        except (ValueError, TypeError):
            keys.append(Skipped("invalid_row"))
            continue
        keys.append(
            SourceKey(
                source_id=str(row["id"]),
                public=str(row["prefix"]),
                algorithm="sha256",
                hash=str(row["key_hash"]),
                name=None if row["name"] is None else str(row["name"]),
                owner=str(row["owner_id"]),
                scopes=tuple(str(row["scopes"] or "").split()),
                created_at=created,
                expires_at=expires,
                revoked_at=revoked,
                rate_limit=_rate_limit(row["per_minute"], row["per_hour"]),
            )
        )
    return keys
