"""Helpers of the import tests: keys in another library's shape, import files, and the
test app with ``legacy_formats``."""

from __future__ import annotations

import csv
import hashlib
import secrets
import string
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from apps import client, protect
from keystile.importers.files import COLUMNS
from keystile.middleware import APIKeyMiddleware
from keystile.stores import KeyStore, store_from_url

ALPHANUMERIC = string.ascii_letters + string.digits


def random_text(length: int) -> str:
    return "".join(secrets.choice(ALPHANUMERIC) for _ in range(length))


def dotted_key() -> tuple[str, str]:
    """A key of djangorestframework-api-key's shape: ``(prefix, "<prefix>.<secret>")``."""
    prefix = random_text(8)
    return prefix, f"{prefix}.{random_text(32)}"


def row(public: str, key: str, **fields: Any) -> dict[str, Any]:
    """A CSV row of ``key`` hashed with SHA-512, owner ``acme``, overridden by ``fields``."""
    values = {
        "id": public,
        "owner": "acme",
        "name": f"key {public}",
        "scopes": "",
        "created_at": "2024-01-02T03:04:05+00:00",
        "expires_at": "",
        "revoked": "false",
        "hash_algorithm": "sha512",
        "hash": hashlib.sha512(key.encode()).hexdigest(),
    }
    values.update(fields)
    return values


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def legacy_app(
    store: KeyStore, formats: Any = ("drf-api-key",), **options: Any
) -> APIKeyMiddleware:
    return protect(
        store, legacy_formats=list(formats) if isinstance(formats, tuple) else formats, **options
    )


async def statuses(app: Any, keys: Sequence[str], path: str = "/whoami") -> list[int]:
    """The status each key gets, one request each, in order."""
    async with client(app) as http:
        return [(await http.get(path, headers={"X-API-Key": key})).status_code for key in keys]


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[KeyStore]:
    """The store of ``url``, open for the block."""
    store = store_from_url(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
