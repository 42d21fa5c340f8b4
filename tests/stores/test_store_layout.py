"""How the stores package is laid out: the old ``keystile.stores.base`` names still import,
asyncpg loads only with a Postgres store, the SQL columns match the records, and the
quota refill rule every store shares falls exactly on the period boundaries."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import keystile.stores.base as base
from keystile.stores.bus import LocalChangeBus
from keystile.stores.protocol import ChangeListener, KeyStore
from keystile.stores.records import KeyEvent, KeyRecord, QuotaState, UsageBucket, UsageTotal
from keystile.stores.rules import (
    EVENT_ACTIONS,
    SYSTEM_ACTOR,
    UPDATABLE_FIELDS,
    apply_uses,
    check_updatable,
    revoked_error,
)
from keystile.stores.sql import EVENT_COLUMNS, KEY_COLUMNS

#: Every name ``keystile.stores.base`` exported before the stores were split up.
BASE_NAMES = {
    "EVENT_ACTIONS",
    "LIMIT_FIELDS",
    "SYSTEM_ACTOR",
    "UPDATABLE_FIELDS",
    "ChangeListener",
    "KeyEvent",
    "KeyRecord",
    "KeyStore",
    "LocalChangeBus",
    "QuotaState",
    "UsageBucket",
    "UsageCounts",
    "UsageTotal",
    "apply_uses",
    "check_updatable",
    "created_detail",
    "event_detail",
    "pruned_detail",
    "reaped_detail",
    "revoked_error",
    "rotated_detail",
    "update_action",
    "utcnow",
}

START = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def _quota_key(remaining: int) -> KeyRecord:
    return KeyRecord(
        id="k1",
        owner="acme",
        name="ci",
        prefix="ks",
        secret_hash="$argon2id$fake",
        created_at=START,
        quota=10,
        quota_remaining=remaining,
        quota_refill=DAY,
        quota_reset_at=START,
    )


def test_base_still_exports_every_old_name() -> None:
    """``keystile.stores.base`` lists and offers every name it exported before the split."""
    assert set(base.__all__) >= BASE_NAMES
    assert all(hasattr(base, name) for name in BASE_NAMES)


def test_base_names_are_the_new_modules_objects() -> None:
    """A name imported from ``keystile.stores.base`` is the very object of its new module."""
    pairs = [
        (base.KeyRecord, KeyRecord),
        (base.KeyEvent, KeyEvent),
        (base.KeyStore, KeyStore),
        (base.ChangeListener, ChangeListener),
        (base.LocalChangeBus, LocalChangeBus),
        (base.QuotaState, QuotaState),
        (base.UsageBucket, UsageBucket),
        (base.UsageTotal, UsageTotal),
        (base.apply_uses, apply_uses),
        (base.check_updatable, check_updatable),
        (base.revoked_error, revoked_error),
        (base.EVENT_ACTIONS, EVENT_ACTIONS),
        (base.UPDATABLE_FIELDS, UPDATABLE_FIELDS),
        (base.SYSTEM_ACTOR, SYSTEM_ACTOR),
    ]
    assert [old is new for old, new in pairs] == [True] * len(pairs)


def test_sql_columns_are_the_record_fields_in_order() -> None:
    """The SQL stores build records from rows by position: the columns are the fields, in order."""
    assert list(KEY_COLUMNS) == [f.name for f in dataclasses.fields(KeyRecord)]
    assert [*EVENT_COLUMNS, "id"] == [f.name for f in dataclasses.fields(KeyEvent)]


def _modules_after(code: str) -> set[str]:
    """The modules loaded in a fresh interpreter after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(out.split())


def test_importing_keystile_does_not_load_asyncpg() -> None:
    """``import keystile`` (memory and SQLite stores included) leaves asyncpg unloaded."""
    loaded = _modules_after("import keystile, keystile.stores, keystile.cli")
    assert "keystile.stores" in loaded
    assert "asyncpg" not in loaded
    assert not any(name.startswith("keystile.stores.postgres") for name in loaded)


def test_postgres_store_is_loaded_on_first_use() -> None:
    """``keystile.stores.PostgresKeyStore`` imports the Postgres store, and asyncpg, when asked."""
    loaded = _modules_after(
        "import keystile.stores as s\nassert s.PostgresKeyStore.__name__ == 'PostgresKeyStore'"
    )
    assert {"asyncpg", "keystile.stores.postgres"} <= loaded


def test_refill_falls_exactly_one_period_after_the_reset() -> None:
    """At ``quota_reset_at + quota_refill`` the quota is full again; a microsecond before, not."""
    key = _quota_key(remaining=2)
    boundary = START + DAY
    before = boundary - timedelta(microseconds=1)
    assert key.quota_left(before) == 2
    assert key.quota_left(boundary) == 10
    assert key.next_refill(before) == boundary
    assert key.next_refill(boundary) == boundary + DAY
    assert apply_uses(key, before, 1).quota_remaining == 1
    assert apply_uses(key, before, 1).quota_reset_at == START
    assert apply_uses(key, boundary, 1).quota_remaining == 9
    assert apply_uses(key, boundary, 1).quota_reset_at == boundary


def test_refill_after_many_periods_starts_at_the_last_boundary() -> None:
    """Uses long after the reset refill once, to the start of the period they fall in."""
    key = _quota_key(remaining=0)
    at = START + 3 * DAY + timedelta(hours=5)
    used = apply_uses(key, at, 4)
    assert (used.quota_remaining, used.quota_reset_at) == (6, START + 3 * DAY)
    assert used.next_refill(at) == START + 4 * DAY
    assert used.quota_left(at) == 6
