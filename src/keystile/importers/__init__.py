"""Importing the keys other libraries issued, so they keep working under keystile.

One module per source, each reading the source's own storage into ``SourceKey`` values:
``drf_api_key`` (djangorestframework-api-key's table), ``keygate`` (fastapi-keygate's),
``keyshield`` (keyshield's SQLAlchemy table), ``files`` (CSV or JSON Lines, for anything
else). ``records.import_keys`` writes them as keystile records in one transaction; the
middleware's ``legacy_formats`` (``keystile.legacy``) then takes their key strings,
verifies each once with its source's algorithm, and rehashes it to argon2id.

``import_source`` is what ``keystile import`` runs.
"""

from __future__ import annotations

from pathlib import Path

from ..legacy.formats import FORMATS, LegacyFormat, keyshield_format
from ..stores.protocol import KeyStore
from ..stores.rules import SYSTEM_ACTOR
from . import drf_api_key, files, keygate, keyshield
from .records import ImportReport, Skipped, SourceKey, import_keys

__all__ = ["SOURCES", "ImportReport", "Skipped", "SourceKey", "import_keys", "import_source"]

#: The sources ``keystile import`` takes.
SOURCES = ("drf-api-key", "keygate", "keyshield", "csv")


async def import_source(
    store: KeyStore,
    source: str,
    *,
    source_url: str | None = None,
    file: str | Path | None = None,
    table: str | None = None,
    key_format: str | None = None,
    owner: str | None = None,
    owner_from_name: bool = False,
    actor: str = SYSTEM_ACTOR,
    dry_run: bool = False,
    keyshield_prefix: str = "ak_v1",
) -> ImportReport:
    """Read ``source``'s keys (from ``source_url``, or ``file`` for ``csv``) and import
    them into ``store`` (``records.import_keys``)."""
    keys: list[SourceKey | Skipped]
    shape: LegacyFormat
    if source == "csv":
        if file is None:
            raise ValueError("a csv import needs a file")
        if (key_format or "drf-api-key") not in FORMATS:
            raise ValueError(f"unknown key format {key_format!r}; known: {', '.join(FORMATS)}")
        keys, shape = files.read_keys(file), FORMATS[key_format or "drf-api-key"]
    else:
        if source_url is None:
            raise ValueError(f"a {source} import needs a source URL")
        reader = {"drf-api-key": drf_api_key, "keygate": keygate, "keyshield": keyshield}[source]
        keys = await reader.read_keys(source_url, table=table or reader.TABLE)
        shape = keyshield_format(keyshield_prefix) if source == "keyshield" else FORMATS[source]
    return await import_keys(
        store,
        keys,
        source=source,
        key_format=shape,
        owner=owner,
        owner_from_name=owner_from_name,
        actor=actor,
        dry_run=dry_run,
    )
