"""The store calls an import needs, on every store: ``import_keys`` (one transaction, ids
already taken left alone, an ``imported`` event per key) and ``update_hash`` with
``replacing`` (a conditional write; an imported hash replaced records ``rehashed``)."""

from __future__ import annotations

import dataclasses

import pytest

from keystile.stores import KeyStore
from keystile.stores.records import KeyRecord, utcnow
from keystile.stores.rules import imported_hash

pytestmark = pytest.mark.anyio

NEW_HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA"


def imported(public: str, **fields: object) -> KeyRecord:
    base = KeyRecord(
        id=f"drf.{public}",
        owner="acme",
        name=f"key {public}",
        prefix="drf",
        secret_hash=imported_hash("sha512", "ab" * 64),
        scopes=("read",),
        created_at=utcnow().replace(microsecond=0),
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


async def test_import_keys_inserts_free_ids_with_an_event_each(store: KeyStore) -> None:
    """Keys whose id is free are inserted as given, each with an ``imported`` event whose
    detail is the caller's plus what the key was created with; a taken id is left alone."""
    first, second = imported("AAAA1111"), imported("BBBB2222")
    details = {r.id: {"source": "drf-api-key", "source_id": r.id[4:]} for r in (first, second)}
    assert await store.import_keys([first], details=details, actor="ops") == [first.id]
    changed = dataclasses.replace(first, name="changed")
    inserted = await store.import_keys([changed, second], details=details, actor="ops")
    assert inserted == [second.id]
    assert await store.get(first.id) == first and await store.get(second.id) == second
    events = await store.list_events()
    assert [(e.key_id, e.action, e.actor) for e in events] == [
        (first.id, "imported", "ops"),
        (second.id, "imported", "ops"),
    ]
    assert events[0].detail["source"] == "drf-api-key"
    assert events[0].detail["scopes"] == ["read"] and "secret_hash" not in events[0].detail


async def test_replacing_an_imported_hash_writes_once_and_records_it(store: KeyStore) -> None:
    """``update_hash(..., replacing=old)`` writes only while ``old`` is stored: a second
    process replacing the same hash writes nothing, and ``rehashed`` is recorded once."""
    key = imported("CCCC3333")
    await store.import_keys([key], details={key.id: {}})
    await store.update_hash(key.id, NEW_HASH, replacing=key.secret_hash)
    await store.update_hash(key.id, "$argon2id$other", replacing=key.secret_hash)
    stored = await store.get(key.id)
    assert stored is not None and stored.secret_hash == NEW_HASH
    rehashed = [e for e in await store.list_events(key_id=key.id) if e.action == "rehashed"]
    assert [(e.owner, e.detail) for e in rehashed] == [("acme", {"from": "sha512"})]


async def test_replacing_an_argon2_hash_records_nothing(store: KeyStore) -> None:
    """An upgrade of an argon2 hash to stronger parameters is no change of the key: the
    hash is written (while it is still the one replaced) and no event is recorded."""
    key = imported("DDDD4444", secret_hash=NEW_HASH)
    await store.import_keys([key], details={key.id: {}})
    await store.update_hash(key.id, "$argon2id$stronger", replacing=NEW_HASH)
    stored = await store.get(key.id)
    assert stored is not None and stored.secret_hash == "$argon2id$stronger"
    assert [e.action for e in await store.list_events(key_id=key.id)] == ["imported"]
