"""Helpers the Postgres tests share: URL splitting, a statement counter kept by Postgres,
and a wait for middlewares' LISTEN connections."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg


def split_url(url: str) -> tuple[str, str]:
    """The plain DSN asyncpg accepts, and the schema the URL names."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = dict(query).get("schema", "public")
    kept = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=kept)), schema


async def count_update_statements(raw: asyncpg.Connection, schema: str) -> None:
    """A statement-level trigger counting UPDATE statements on keystile_keys."""
    q = f'"{schema}"'
    await raw.execute(
        f"""
        CREATE TABLE {q}.update_statements (n int NOT NULL);
        INSERT INTO {q}.update_statements VALUES (0);
        CREATE FUNCTION {q}.count_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN UPDATE {q}.update_statements SET n = n + 1; RETURN NULL; END $$;
        CREATE TRIGGER count_updates AFTER UPDATE ON {q}.keystile_keys
            FOR EACH STATEMENT EXECUTE FUNCTION {q}.count_update();
        """  # noqa: S608
    )


async def update_statements(raw: asyncpg.Connection, schema: str) -> int:
    """UPDATE statements counted since ``count_update_statements``."""
    n: int = await raw.fetchval(f'SELECT n FROM "{schema}".update_statements')  # noqa: S608
    return n


async def until_listening(raw: asyncpg.Connection, store: Any, *apps: Any) -> None:
    """NOTIFY a made-up key id on ``store``'s channel until every app (an
    ``APIKeyMiddleware``) counted it: from then on they listen."""
    seen = [app.stats().revocation_events for app in apps]
    with anyio.fail_after(5):
        while any(app.stats().revocation_events == n for app, n in zip(apps, seen, strict=True)):
            await raw.execute("SELECT pg_notify($1, $2)", store.channel, f"ping-{uuid.uuid4().hex}")
            await anyio.sleep(0.02)
