"""``postgresql://…``: the production store (see ``PostgresKeyStore``). Importing this
package imports asyncpg; ``keystile.stores`` does so only when a Postgres store is used."""

from __future__ import annotations

from .connection import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LISTEN_RECONNECT_MAX,
    DEFAULT_POOL_MAX_SIZE,
    DEFAULT_POOL_MIN_SIZE,
    LISTENER_APPLICATION_NAME,
    POOL_APPLICATION_NAME,
)
from .schema import DEFAULT_SCHEMA
from .store import PostgresKeyStore

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LISTEN_RECONNECT_MAX",
    "DEFAULT_POOL_MAX_SIZE",
    "DEFAULT_POOL_MIN_SIZE",
    "DEFAULT_SCHEMA",
    "LISTENER_APPLICATION_NAME",
    "POOL_APPLICATION_NAME",
    "PostgresKeyStore",
]
