"""Key stores, chosen by URL: ``sqlite:///path``, ``postgresql://…``, ``memory://``.

``PostgresKeyStore`` is imported on first use, so asyncpg is loaded only by a program
that uses Postgres."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .memory import MemoryKeyStore
from .protocol import KeyStore
from .records import KeyEvent, KeyRecord
from .sqlite import SQLiteKeyStore

if TYPE_CHECKING:
    from .postgres import PostgresKeyStore

__all__ = [
    "KeyEvent",
    "KeyRecord",
    "KeyStore",
    "MemoryKeyStore",
    "PostgresKeyStore",
    "SQLiteKeyStore",
    "store_from_url",
]


def store_from_url(url: str, **options: Any) -> KeyStore:
    """Build the store a URL names (not yet opened).

    ``sqlite:///keystile.db`` is relative to the working directory, ``sqlite:////abs/keystile.db``
    absolute; ``postgresql://`` and ``postgres://`` take the usual libpq URL.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        name = url.split("://", 1)[1].strip("/") if "://" in url else ""
        return MemoryKeyStore(name or None)
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise ConfigurationError(
                f"a SQLite URL looks like sqlite:///relative.db or sqlite:////abs/path.db, "
                f"not {url!r}"
            )
        return SQLiteKeyStore(url[len("sqlite:///") :], **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresKeyStore

        return PostgresKeyStore(url, **options)
    raise ConfigurationError(
        f"unsupported database URL scheme {scheme or url!r}: use sqlite:///path.db, "
        "postgresql://user@host/db or memory://"
    )


def __getattr__(name: str) -> Any:
    if name == "PostgresKeyStore":
        from .postgres import PostgresKeyStore

        return PostgresKeyStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
