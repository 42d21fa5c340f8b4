"""The Postgres schema: its migrations, the schema name rules, and how each kind of value
is stored (``POSTGRES``, the dialect of ``sql.py``).

Table names are always qualified with the quoted schema (never ``search_path``), so a
connection pooler that drops startup parameters cannot point the store at another
schema. The schema is the one identifier put into SQL text, and it is validated first.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ...errors import ConfigurationError
from ..records import OwnerLimits
from ..sql import Dialect

__all__ = [
    "DEFAULT_SCHEMA",
    "MIGRATIONS",
    "NAMEDATALEN",
    "POSTGRES",
    "channel_for",
    "migrate",
    "quoted",
    "validate_schema",
]

DEFAULT_SCHEMA = "public"
#: The longest identifier Postgres keeps, in bytes.
NAMEDATALEN = 63

_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_CHANNEL = "keystile_changes"

#: Migration scripts, applied in order, each once; ``{schema}`` is the quoted schema.
#: Append new versions; never edit an applied one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE {schema}.keystile_keys (
        id text PRIMARY KEY,
        owner text NOT NULL,
        name text NOT NULL,
        prefix text NOT NULL,
        secret_hash text NOT NULL,
        scopes text[] NOT NULL DEFAULT '{{}}',
        metadata jsonb NOT NULL DEFAULT '{{}}',
        created_at timestamptz NOT NULL,
        expires_at timestamptz,
        last_used_at timestamptz,
        revoked_at timestamptz,
        replaces text,
        replaced_by text
    );
    CREATE INDEX keystile_keys_owner_name ON {schema}.keystile_keys (owner, name);
    """,
    """
    ALTER TABLE {schema}.keystile_keys
        ADD COLUMN rate_limit text,
        ADD COLUMN quota bigint,
        ADD COLUMN quota_remaining bigint,
        ADD COLUMN quota_refill interval,
        ADD COLUMN quota_reset_at timestamptz;
    """,
    """
    ALTER TABLE {schema}.keystile_keys
        ADD COLUMN disabled_at timestamptz,
        ADD COLUMN ip_allowlist text[] NOT NULL DEFAULT '{{}}';
    CREATE TABLE {schema}.keystile_events (
        id bigserial PRIMARY KEY,
        at timestamptz NOT NULL,
        key_id text NOT NULL,
        owner text NOT NULL,
        action text NOT NULL,
        actor text NOT NULL,
        detail jsonb NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX keystile_events_owner_at ON {schema}.keystile_events (owner, at);
    CREATE INDEX keystile_events_key_at ON {schema}.keystile_events (key_id, at);
    CREATE INDEX keystile_events_at ON {schema}.keystile_events (at);
    """,
    """
    CREATE TABLE {schema}.keystile_usage (
        key_id text NOT NULL,
        minute timestamptz NOT NULL,
        requests bigint NOT NULL DEFAULT 0,
        rejected bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, minute)
    );
    CREATE INDEX keystile_usage_minute ON {schema}.keystile_usage (minute);
    """,
    """
    ALTER TABLE {schema}.keystile_keys ADD COLUMN budget_id text;
    ALTER TABLE {schema}.keystile_keys ADD COLUMN rate_limits jsonb NOT NULL DEFAULT '{{}}';
    ALTER TABLE {schema}.keystile_keys ADD COLUMN owner_limits jsonb;
    UPDATE {schema}.keystile_keys SET budget_id = id;
    CREATE INDEX keystile_keys_budget ON {schema}.keystile_keys (budget_id);
    CREATE TABLE {schema}.keystile_quota_batches (
        batch text PRIMARY KEY,
        at timestamptz NOT NULL
    );
    CREATE INDEX keystile_quota_batches_at ON {schema}.keystile_quota_batches (at);
    CREATE TABLE {schema}.keystile_owner_limits (
        owner text PRIMARY KEY,
        limits jsonb NOT NULL,
        quota bigint,
        quota_remaining bigint,
        quota_refill interval,
        quota_reset_at timestamptz,
        updated_at timestamptz NOT NULL
    );
    """,
    """
    CREATE TABLE {schema}.keystile_webhooks (
        id text PRIMARY KEY,
        url text NOT NULL,
        secret text NOT NULL,
        events text,
        created_at timestamptz NOT NULL
    );
    CREATE TABLE {schema}.keystile_deliveries (
        id text PRIMARY KEY,
        webhook_id text NOT NULL,
        type text NOT NULL,
        payload text NOT NULL,
        created_at timestamptz NOT NULL,
        next_attempt_at timestamptz NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        status text NOT NULL DEFAULT 'pending',
        last_error text,
        claimed_until timestamptz
    );
    CREATE INDEX keystile_deliveries_due
        ON {schema}.keystile_deliveries (status, next_attempt_at);
    CREATE INDEX keystile_deliveries_webhook
        ON {schema}.keystile_deliveries (webhook_id, created_at);
    CREATE TABLE {schema}.keystile_delivery_attempts (
        id bigserial PRIMARY KEY,
        delivery_id text NOT NULL,
        at timestamptz NOT NULL,
        status_code integer,
        error text,
        outcome text NOT NULL
    );
    CREATE INDEX keystile_delivery_attempts_delivery
        ON {schema}.keystile_delivery_attempts (delivery_id);
    """,
]

POSTGRES = Dialect(
    numbered="$N",
    seq="id",
    greatest="GREATEST",
    least="LEAST",
    encoders={
        "strings": list,
        "json": lambda v: json.dumps(dict(v)),
        "owner": lambda v: json.dumps(v.to_row()),
    },
    decoders={
        "strings": tuple,
        "json": json.loads,
        "owner": lambda v: OwnerLimits.from_row(json.loads(v)),
    },
    casts={
        "text": "text",
        "int": "bigint",
        "time": "timestamptz",
        "period": "interval",
        "strings": "text[]",
        "json": "jsonb",
        "owner": "jsonb",
    },
)


def validate_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"invalid Postgres schema name {schema!r}: use 1-63 letters, digits and"
            " underscores, not starting with a digit"
        )
    return schema


def channel_for(schema: str) -> str:
    """The NOTIFY channel of a schema: distinct per schema so that tenants (and test
    schemas) sharing a database do not evict each other's keys, and at most 63 bytes,
    since Postgres truncates a longer ``LISTEN`` name but rejects it in ``pg_notify``."""
    if schema == DEFAULT_SCHEMA:
        return _CHANNEL
    channel = f"{_CHANNEL}__{schema}"
    if len(channel) > NAMEDATALEN:
        channel = f"{_CHANNEL}__{hashlib.sha1(schema.encode()).hexdigest()}"  # noqa: S324
    return channel


def quoted(schema: str) -> str:
    """The (validated) schema as an identifier in SQL text."""
    return f'"{schema}"'


async def migrate(conn: Any, schema: str) -> None:
    """Apply pending migrations, once, even with many processes starting together:
    the advisory lock serialises them and each re-reads the applied versions after
    taking it. Nothing is created when all is current, so an app role without CREATE
    privilege can open a database an operator initialised."""
    q = quoted(schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"keystile:migrate:{schema}"
        )
        has_schema = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
        if not has_schema:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
        has_table = await conn.fetchval("SELECT to_regclass($1)", f"{q}.keystile_migrations")
        if not has_table:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {q}.keystile_migrations"
                " (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        done = {
            row[0]
            for row in await conn.fetch(
                f"SELECT version FROM {q}.keystile_migrations"  # noqa: S608
            )
        }
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            await conn.execute(script.format(schema=q))
            await conn.execute(
                f"INSERT INTO {q}.keystile_migrations (version, applied_at)"  # noqa: S608
                " VALUES ($1, now())",
                version,
            )
