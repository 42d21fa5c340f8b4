"""djangorestframework-api-key: the ``APIKey`` table of a Django project.

Its keys are ``<prefix>.<secret>`` (an 8-character prefix, a 32-character secret); the
table (``rest_framework_api_key_apikey``, or a custom key model's, ``--table``) holds
the prefix, the hash of the whole key, a name, ``revoked``, ``expiry_date`` and
``created``. Versions 2.x and 3.x hash with SHA-512 (``sha512$$<hex>``); 1.x with
Django's password hasher (``pbkdf2_sha256$…``, or ``argon2$…``), which 2.x upgraded on
first use as keystile does. The prefix and hashed_key columns date from 1.4: older
tables are an unknown layout. Keys have no owner: ``--owner`` or ``--owner-from name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..stores.records import utcnow
from .database import moment, read_table
from .records import Skipped, SourceKey, keys_of

__all__ = ["SOURCE", "TABLE", "read_keys"]

SOURCE = "drf-api-key"
TABLE = "rest_framework_api_key_apikey"
_COLUMNS = ("prefix", "hashed_key", "created", "name", "revoked", "expiry_date")
_LAYOUT = "djangorestframework-api-key 1.4 or later keeps its keys in such a table"


def _algorithm(hashed_key: str) -> tuple[str, str]:
    """The algorithm of a stored hash, and the hash as the importer checks it."""
    if hashed_key.startswith("sha512$$"):
        return "sha512", hashed_key[len("sha512$$") :]
    if hashed_key.startswith("argon2$"):
        return "argon2", hashed_key
    return hashed_key.partition("$")[0], hashed_key


def _key(row: Mapping[str, Any]) -> SourceKey:
    algorithm, stored = _algorithm(str(row["hashed_key"]))
    prefix = str(row["prefix"])
    return SourceKey(
        source_id=prefix,
        public=prefix,
        algorithm=algorithm,
        hash=stored,
        name=None if row["name"] is None else str(row["name"]),
        created_at=moment(row["created"]),
        expires_at=moment(row["expiry_date"]),
        # drf-api-key keeps no revocation time: the import's moment stands for it.
        revoked_at=utcnow() if row["revoked"] else None,
    )


async def read_keys(url: str, *, table: str = TABLE) -> list[SourceKey | Skipped]:
    return keys_of(await read_table(url, table, _COLUMNS, layout=_LAYOUT), _key)
