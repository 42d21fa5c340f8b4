"""keyshield: the ``api_keys`` table of its SQLAlchemy repository.

Its keys are ``ak_v1-<key id>-<secret>``; the table holds the key id, an argon2 hash of
the secret with a pepper appended (the pepper is the deployment's, not in the table),
a name, ``is_active``, scopes (JSON), ``expires_at`` and ``created_at``. keyshield deletes
rather than revokes; an inactive key is imported disabled (``keystile enable`` turns it
back on). Hashes of its bcrypt hasher are not imported (``unknown_algorithm``). Keys have
no owner: ``--owner`` or ``--owner-from name``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .database import moment, read_table
from .records import Skipped, SourceKey, keys_of

__all__ = ["SOURCE", "TABLE", "read_keys"]

SOURCE = "keyshield"
TABLE = "api_keys"
_REQUIRED = ("id", "key_id", "key_hash", "is_active", "created_at", "expires_at")
_OPTIONAL = ("name", "scopes")
_LAYOUT = "keyshield 2.x keeps its keys in such a table"


def _algorithm(key_hash: str) -> str:
    if key_hash.startswith("$argon2"):
        return "keyshield-argon2"
    return "keyshield-bcrypt" if key_hash.startswith("$2") else "keyshield-unknown"


def _key(row: Mapping[str, Any]) -> SourceKey:
    scopes = row["scopes"]
    scopes = json.loads(scopes) if isinstance(scopes, str) else scopes or []
    if not isinstance(scopes, list):
        raise TypeError("scopes are a JSON list")
    return SourceKey(
        source_id=str(row["id"]),
        public=str(row["key_id"]),
        algorithm=_algorithm(str(row["key_hash"])),
        hash=str(row["key_hash"]),
        name=None if row["name"] is None else str(row["name"]),
        scopes=tuple(str(s) for s in scopes),
        created_at=moment(row["created_at"]),
        expires_at=moment(row["expires_at"]),
        disabled=not row["is_active"],
    )


async def read_keys(url: str, *, table: str = TABLE) -> list[SourceKey | Skipped]:
    return keys_of(await read_table(url, table, _REQUIRED, _OPTIONAL, layout=_LAYOUT), _key)
