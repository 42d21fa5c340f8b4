"""The SQLite schema: its migrations, and how each kind of value is stored in it.

Timestamps are stored as UTC seconds (REAL), refill periods as seconds, lists and
metadata as JSON text.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from ..records import OwnerLimits, utcnow
from ..sql import Dialect, Statements

__all__ = ["MIGRATIONS", "SQL", "SQLITE", "migrate", "transaction"]

#: Migration scripts, applied in order, each once. Append new versions; never edit an
#: applied one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE keystile_keys (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        expires_at REAL,
        last_used_at REAL,
        revoked_at REAL,
        replaces TEXT,
        replaced_by TEXT
    );
    CREATE INDEX keystile_keys_owner_name ON keystile_keys (owner, name);
    CREATE TABLE keystile_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE keystile_keys ADD COLUMN rate_limit TEXT;
    ALTER TABLE keystile_keys ADD COLUMN quota INTEGER;
    ALTER TABLE keystile_keys ADD COLUMN quota_remaining INTEGER;
    ALTER TABLE keystile_keys ADD COLUMN quota_refill REAL;
    ALTER TABLE keystile_keys ADD COLUMN quota_reset_at REAL;
    """,
    """
    ALTER TABLE keystile_keys ADD COLUMN disabled_at REAL;
    ALTER TABLE keystile_keys ADD COLUMN ip_allowlist TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE keystile_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        key_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX keystile_events_owner_at ON keystile_events (owner, at);
    CREATE INDEX keystile_events_key_at ON keystile_events (key_id, at);
    CREATE INDEX keystile_events_at ON keystile_events (at);
    """,
    """
    CREATE TABLE keystile_usage (
        key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, minute)
    );
    CREATE INDEX keystile_usage_minute ON keystile_usage (minute);
    """,
    """
    ALTER TABLE keystile_keys ADD COLUMN budget_id TEXT;
    ALTER TABLE keystile_keys ADD COLUMN rate_limits TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE keystile_keys ADD COLUMN owner_limits TEXT;
    UPDATE keystile_keys SET budget_id = id;
    CREATE INDEX keystile_keys_budget ON keystile_keys (budget_id);
    CREATE TABLE keystile_quota_batches (
        batch TEXT PRIMARY KEY,
        at REAL NOT NULL
    );
    CREATE INDEX keystile_quota_batches_at ON keystile_quota_batches (at);
    CREATE TABLE keystile_owner_limits (
        owner TEXT PRIMARY KEY,
        limits TEXT NOT NULL,
        quota INTEGER,
        quota_remaining INTEGER,
        quota_refill REAL,
        quota_reset_at REAL,
        updated_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE keystile_webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE keystile_deliveries (
        id TEXT PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT,
        claimed_until REAL
    );
    CREATE INDEX keystile_deliveries_due ON keystile_deliveries (status, next_attempt_at);
    CREATE INDEX keystile_deliveries_webhook ON keystile_deliveries (webhook_id, created_at);
    CREATE TABLE keystile_delivery_attempts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        delivery_id TEXT NOT NULL,
        at REAL NOT NULL,
        status_code INTEGER,
        error TEXT,
        outcome TEXT NOT NULL
    );
    CREATE INDEX keystile_delivery_attempts_delivery ON keystile_delivery_attempts (delivery_id);
    """,
]

SQLITE = Dialect(
    numbered="?N",
    seq="seq",
    greatest="MAX",
    least="MIN",
    encoders={
        "time": datetime.timestamp,
        "period": timedelta.total_seconds,
        "strings": lambda v: json.dumps(list(v)),
        "json": lambda v: json.dumps(dict(v)),
        "owner": lambda v: json.dumps(v.to_row()),
    },
    decoders={
        "time": lambda v: datetime.fromtimestamp(v, timezone.utc),
        "period": lambda v: timedelta(seconds=v),
        "strings": lambda v: tuple(json.loads(v)),
        "json": json.loads,
        "owner": lambda v: OwnerLimits.from_row(json.loads(v)),
    },
)
SQL = Statements(SQLITE)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction. ``BEGIN IMMEDIATE`` takes the database's write lock
    first, so what the transaction reads cannot change before it writes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations not yet applied, in one transaction."""
    with transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS keystile_migrations"
            " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM keystile_migrations")}
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO keystile_migrations VALUES (?, ?)",
                (version, utcnow().timestamp()),
            )
