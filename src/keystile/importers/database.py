"""Reading another library's table from its own database: SQLite or Postgres.

The source is opened read-only (SQLite) or only read from (Postgres); nothing is written
to it. A URL may name the driver as SQLAlchemy URLs do (``sqlite+aiosqlite:///…``,
``postgresql+asyncpg://…``); a Postgres URL may carry ``?schema=NAME`` (else the
connection's current schema). Every failure is one ``ImportSourceError`` line: the
database cannot be reached (``unreachable``), or the table or a column the importer
needs is not there (``unknown_layout``, naming what is missing).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import anyio.to_thread

from ..errors import ImportSourceError

__all__ = ["Rows", "moment", "read_table"]

Rows = list[dict[str, Any]]

_SQLITE = re.compile(r"sqlite(?:\+\w+)?:///(.+)")
_POSTGRES = re.compile(r"postgres(?:ql)?(?:\+\w+)?://(.*)", re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: Seconds to connect to a Postgres source before giving up.
CONNECT_TIMEOUT = 10.0


async def read_table(
    url: str, table: str, required: Sequence[str], optional: Sequence[str] = (), *, layout: str
) -> Rows:
    """Every row of ``table``: the ``required`` columns (missing: ``unknown_layout``,
    with ``layout`` saying what the importer expects) and those of ``optional`` there
    (missing ones read as ``None``)."""
    if not _IDENTIFIER.fullmatch(table):
        raise ImportSourceError("unknown_layout", f"invalid table name {table[:70]!r}")
    sqlite = _SQLITE.fullmatch(url)
    if sqlite is not None:
        columns, rows = await anyio.to_thread.run_sync(_read_sqlite, sqlite.group(1), table)
    elif _POSTGRES.fullmatch(url):
        columns, rows = await _read_postgres(url, table)
    else:
        raise ImportSourceError(
            "unreachable", "the source URL must be sqlite:///path or postgresql://…"
        )
    if columns is None:
        raise ImportSourceError("unknown_layout", f"no table {table!r} in the source: {layout}")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ImportSourceError(
            "unknown_layout",
            f"table {table!r} has no column {', '.join(missing)}: {layout}",
        )
    wanted = [*required, *optional]
    return [{c: row.get(c) for c in wanted} for row in rows]


def _read_sqlite(path: str, table: str) -> tuple[set[str] | None, Rows]:
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ImportSourceError(
            "unreachable", f"cannot open SQLite database {path}: {exc}"
        ) from None
    try:
        conn.row_factory = sqlite3.Row
        info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
        if not info:
            return None, []
        rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608
        return {row["name"] for row in info}, [dict(row) for row in rows]
    except sqlite3.Error as exc:
        raise ImportSourceError(
            "unreachable", f"cannot read SQLite database {path}: {exc}"
        ) from None
    finally:
        conn.close()


async def _read_postgres(url: str, table: str) -> tuple[set[str] | None, Rows]:
    import asyncpg

    from ..stores.postgres.url import PostgresURL

    target = PostgresURL.parse(re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", url))
    failures = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
    try:
        conn = await asyncpg.connect(target.dsn, timeout=CONNECT_TIMEOUT)
    except failures as exc:
        where = target.redact(url)
        raise ImportSourceError(
            "unreachable", f"cannot connect to {where}: {target.redact(str(exc))}"
        ) from None
    try:
        schema = target.schema or await conn.fetchval("SELECT current_schema()")
        if not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema):
            raise ImportSourceError("unknown_layout", f"invalid schema name {schema!r}")
        found = await conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = $2",
            schema,
            table,
        )
        if not found:
            return None, []
        rows = await conn.fetch(f'SELECT * FROM "{schema}"."{table}"')  # noqa: S608
        return {r["column_name"] for r in found}, [dict(r) for r in rows]
    except failures as exc:
        raise ImportSourceError("unreachable", f"cannot read {table!r}: {exc}") from None
    finally:
        await conn.close()


def moment(value: Any) -> datetime | None:
    """A timestamp as a source stores it (a datetime, or ISO text as SQLite keeps it;
    naive means UTC), aware; ``None`` for none. ``ValueError`` for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise ValueError(f"not a timestamp: {type(value).__name__}")
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
