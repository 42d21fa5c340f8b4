"""Keys imported from a CSV or JSON Lines file keep their strings: verified once with their
source's hash, rehashed to argon2id, and from then on ordinary keys in every respect."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from apps import client
from importing import dotted_key, legacy_app, row, statuses, write_csv
from keystile.config import KeystileConfig
from keystile.errors import ConfigurationError, ImportSourceError
from keystile.importers import ImportReport, import_source
from keystile.importers import files as import_files
from keystile.manager import KeyManager
from keystile.stores import KeyStore, MemoryKeyStore
from keystile.stores.records import KeyRecord
from keystile.stores.rules import imported_hash
from keystile.tokens import generate_key

pytestmark = pytest.mark.anyio


async def import_file(store: KeyStore, path: Path, **options: Any) -> ImportReport:
    return await import_source(store, "csv", file=path, **options)


async def test_imported_keys_work_and_are_rehashed_on_first_use(
    store: KeyStore, tmp_path: Path
) -> None:
    """The key strings get 200, revoked and expired 401, a wrong secret 401; after the first
    use the stored hash is argon2id and a ``rehashed`` event says from what."""
    live, revoked, expired = dotted_key(), dotted_key(), dotted_key()
    rows = [
        row(*live, scopes="read write"),
        row(*revoked, revoked="true"),
        row(*expired, expires_at="2020-01-01T00:00:00"),
    ]
    report = await import_file(store, write_csv(tmp_path / "keys.csv", rows))
    assert (report.imported, dict(report.skipped)) == (3, {})
    app = legacy_app(store)
    wrong = live[1][:-1] + ("A" if live[1][-1] != "A" else "B")
    keys = [live[1], revoked[1], expired[1], wrong, live[1]]
    assert await statuses(app, keys) == [200, 401, 401, 401, 200]
    record = await store.get(f"drf.{live[0]}")
    assert record is not None and record.secret_hash.startswith("$argon2id$")
    events = await store.list_events(key_id=record.id)
    assert [e.action for e in events] == ["imported", "rehashed"]
    assert events[1].detail == {"from": "sha512"}
    async with client(app) as http:
        seen = (await http.get("/whoami", headers={"Authorization": f"Bearer {live[1]}"})).json()
    assert seen["scopes"] == ["authenticated", "read", "write"]
    assert (seen["owner"], seen["display_name"]) == ("acme", f"apikey:key {live[0]}")


async def test_a_rehashed_key_is_an_ordinary_key(store: KeyStore, tmp_path: Path) -> None:
    """Once rehashed, another process verifies the key with argon2 alone and serves it from
    its cache; the imported hash is gone."""
    public, key = dotted_key()
    await import_file(store, write_csv(tmp_path / "keys.csv", [row(public, key)]))
    assert await statuses(legacy_app(store), [key]) == [200]
    other = legacy_app(store, cache_ttl=61.0)  # another runtime, as in another process
    assert await statuses(other, [key, key]) == [200, 200]
    stats = other.stats()
    assert (stats.argon2_verifications, stats.cache_hits) == (1, 1)
    events = await store.list_events(key_id=f"drf.{public}")
    assert [e.action for e in events].count("rehashed") == 1


async def test_a_second_import_changes_nothing(store: KeyStore, tmp_path: Path) -> None:
    """Importing the same file again imports nothing and counts every key as existing."""
    path = write_csv(tmp_path / "keys.csv", [row(*dotted_key()) for _ in range(3)])
    await import_file(store, path)
    before = (await store.list_all(), await store.list_events())
    again = await import_file(store, path)
    assert (again.imported, dict(again.skipped)) == (0, {"exists": 3})
    assert (await store.list_all(), await store.list_events()) == before


async def test_dry_run_writes_nothing(store: KeyStore, tmp_path: Path) -> None:
    """``dry_run`` reports the keys it would import and writes none."""
    path = write_csv(tmp_path / "keys.csv", [row(*dotted_key()) for _ in range(2)])
    report = await import_file(store, path, dry_run=True)
    assert report.imported == 2 and report.dry_run
    assert await store.list_all() == [] and await store.list_events() == []


async def test_an_unknown_legacy_token_costs_what_an_unknown_key_does() -> None:
    """A token of a legacy shape that matches no record goes the way of an unknown
    keystile key: one store read, no hashing, the negative cache answering it next."""
    counted = []
    for unknown in (dotted_key()[1], generate_key()[0]):
        app = legacy_app(MemoryKeyStore())
        assert await statuses(app, [unknown, unknown]) == [401, 401]
        c = app.verifier.counters
        counted.append((c.argon2_verifications, c.cache_misses, c.negative_hits, c.rejects))
    assert counted[0] == counted[1] == (0, 1, 1, {"unknown": 2})


async def test_rows_that_cannot_be_imported_are_skipped_and_counted(tmp_path: Path) -> None:
    """An unknown or forged algorithm, a malformed hash, a cost past the bounds, a bad id,
    no owner and an unreadable time each skip their row, counted by reason."""
    store = MemoryKeyStore()
    good = dotted_key()
    rows = [
        row(*good),
        row(*dotted_key(), hash_algorithm="md5"),
        row(*dotted_key(), hash_algorithm="plaintext", hash="anything"),
        row(*dotted_key(), hash="abc"),
        row(
            *dotted_key(),
            hash_algorithm="pbkdf2_sha256",
            hash=f"pbkdf2_sha256$999999999$salt${'A' * 43}=",
        ),
        row(
            *dotted_key(),
            hash_algorithm="argon2",
            hash="$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        ),
        row("bad id!", "bad id!.secret"),
        row(*dotted_key(), owner=""),
        row(*dotted_key(), created_at="yesterday"),
    ]
    report = await import_file(store, write_csv(tmp_path / "keys.csv", rows))
    assert report.key_ids == [f"drf.{good[0]}"]
    assert dict(report.skipped) == {
        "unknown_algorithm": 2,
        "invalid_hash": 3,
        "invalid_id": 1,
        "no_owner": 1,
        "invalid_row": 1,
    }
    assert len(await store.list_all()) == 1


async def test_a_forged_imported_hash_never_authenticates() -> None:
    """A record whose imported hash names an algorithm keystile does not know (written to
    the store by hand) refuses its key: nothing is compared in plain text."""
    store = MemoryKeyStore()
    public, key = dotted_key()
    forged = KeyRecord(
        id=f"drf.{public}",
        owner="acme",
        name="forged",
        prefix="drf",
        secret_hash=imported_hash("plaintext", key),
    )
    await store.insert(forged)
    assert await statuses(legacy_app(store), [key]) == [401]
    assert (await store.get(forged.id)) == forged


async def test_hostile_and_clashing_names(tmp_path: Path) -> None:
    """Markup stays text (stored as given); a name with control characters or too long
    becomes ``imported <id>``; a name another key holds gets the key's id appended."""
    store = MemoryKeyStore()
    markup, control, long, first, second = (dotted_key() for _ in range(5))
    rows = [
        row(*markup, name="<script>alert(1)</script>"),
        row(*control, name="\x1b[31mred\x1b[0m"),
        row(*long, name="x" * 200),
        row(*first, name="ci"),
        row(*second, name="ci"),
    ]
    report = await import_file(store, write_csv(tmp_path / "keys.csv", rows))
    names = {r.id.partition(".")[2]: r.name for r in await store.list_all()}
    assert names[markup[0]] == "<script>alert(1)</script>"
    assert names[control[0]] == f"imported {control[0]}"
    assert names[long[0]] == f"imported {long[0]}"
    assert (names[first[0]], names[second[0]]) == ("ci", f"ci ({second[0]})")
    assert dict(report.renamed) == {"invalid_name": 2, "duplicate_name": 1}


async def test_bad_files_are_refused_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An oversized file, one without the required columns, one that is not UTF-8 and a
    JSON Lines file with a line that is not an object are refused with ``bad_file``."""
    store = MemoryKeyStore()
    monkeypatch.setattr(import_files, "MAX_FILE_BYTES", 1024)
    big = write_csv(tmp_path / "big.csv", [row(*dotted_key()) for _ in range(20)])
    headless = tmp_path / "headless.csv"
    headless.write_text("a,b\n1,2\n")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"id,hash\n\xff\xfe\x00")
    lines = tmp_path / "keys.jsonl"
    lines.write_text(json.dumps(row(*dotted_key())) + "\n[1, 2]\n")
    for path in (big, headless, binary, lines):
        with pytest.raises(ImportSourceError) as refused:
            await import_file(store, path)
        assert refused.value.reason == "bad_file"
        assert "\n" not in str(refused.value)
    with pytest.raises(ImportSourceError) as missing:
        await import_file(store, tmp_path / "nowhere.csv")
    assert missing.value.reason == "unreachable"
    assert await store.list_all() == []


async def test_an_overlong_field_skips_its_row(tmp_path: Path) -> None:
    """A field past ``MAX_FIELD_LENGTH`` makes its row unreadable, not the file."""
    store = MemoryKeyStore()
    rows = [row(*dotted_key(), scopes="s" * 5000), row(*dotted_key())]
    report = await import_file(store, write_csv(tmp_path / "keys.csv", rows))
    assert (report.imported, dict(report.skipped)) == (1, {"invalid_row": 1})


async def test_json_lines(tmp_path: Path) -> None:
    """A JSON Lines file: scopes as a list, ``revoked`` as a boolean."""
    store = MemoryKeyStore()
    (live_id, live), (gone_id, gone) = dotted_key(), dotted_key()
    lines = [
        {**row(live_id, live), "scopes": ["read"], "revoked": False},
        {**row(gone_id, gone), "revoked": True},
    ]
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert (await import_file(store, path)).imported == 2
    assert await statuses(legacy_app(store), [live, gone]) == [200, 401]
    record = await store.get(f"drf.{live_id}")
    assert record is not None and record.scopes == ("read",)


async def test_other_key_shapes_and_algorithms(tmp_path: Path) -> None:
    """``--format keygate`` reads ``kg_<id>_<secret>`` keys; a Django PBKDF2 hash (a slow
    password hasher, run in the argon2 pool) and an argon2 hash of the whole key work."""
    from django.contrib.auth.hashers import Argon2PasswordHasher, PBKDF2PasswordHasher

    store = MemoryKeyStore()
    sha = ("0a1b2c3d", "kg_0a1b2c3d_" + "s" * 43)
    pbkdf2 = ("0a1b2c3e", "kg_0a1b2c3e_" + "t" * 43)
    argon = ("0a1b2c3f", "kg_0a1b2c3f_" + "u" * 43)
    django_pbkdf2 = PBKDF2PasswordHasher().encode(pbkdf2[1], "somesalt", iterations=1000)
    django_argon2 = Argon2PasswordHasher()
    django_argon2.time_cost, django_argon2.memory_cost, django_argon2.parallelism = 1, 8, 1
    rows = [
        row(
            *sha,
            hash_algorithm="sha256",
            hash=__import__("hashlib").sha256(sha[1].encode()).hexdigest(),
        ),
        row(*pbkdf2, hash_algorithm="pbkdf2_sha256", hash=django_pbkdf2),
        row(*argon, hash_algorithm="argon2", hash=django_argon2.encode(argon[1], "saltsalt")),
    ]
    path = write_csv(tmp_path / "keys.csv", rows)
    assert (await import_file(store, path, key_format="keygate")).imported == 3
    app = legacy_app(store, ("keygate",))
    assert await statuses(app, [sha[1], pbkdf2[1], argon[1], sha[1][:-1] + "x"]) == [
        200,
        200,
        200,
        401,
    ]
    actions = [e.detail.get("from") for e in await store.list_events() if e.action == "rehashed"]
    assert sorted(actions) == ["argon2", "pbkdf2_sha256", "sha256"]


async def test_imported_keys_take_part_in_everything(tmp_path: Path) -> None:
    """Scopes, rotation (the successor is a keystile key), update, limits, disable,
    revocation, usage and the audit log work on an imported key as on any other."""
    store = MemoryKeyStore()
    public, key = dotted_key()
    await import_file(store, write_csv(tmp_path / "keys.csv", [row(public, key, scopes="read")]))
    app = legacy_app(store)
    manager = KeyManager(store, actor="ops")
    key_id = f"drf.{public}"
    assert await statuses(app, [key, key], "/write") == [403, 403]
    await manager.update(key_id, owner="acme", scopes=["read", "write"])
    assert await statuses(app, [key], "/write") == [200]
    successor = await manager.rotate(key_id, owner="acme", grace=timedelta(hours=1))
    assert successor.key.startswith("ks_")
    assert await statuses(app, [key, successor.key]) == [200, 200]
    await manager.update(successor.id, owner="acme", rate_limit="1/minute")
    assert await statuses(app, [successor.key, successor.key]) == [200, 429]
    await manager.disable(key_id, owner="acme")
    assert await statuses(app, [key]) == [401]
    await manager.enable(key_id, owner="acme")
    assert await manager.revoke(key_id, owner="acme")
    assert await statuses(app, [key]) == [401]
    await app.runtime.recorder.flush()
    assert (await store.get(key_id)).last_used_at is not None  # type: ignore[union-attr]
    actions = [e.action for e in await store.list_events(key_id=key_id)]
    assert actions == [
        "imported",
        "rehashed",
        "updated",
        "rotated",
        "disabled",
        "enabled",
        "revoked",
    ]


def test_the_legacy_formats_option_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown formats or options are refused when the middleware is built; a single string
    is a type error; keyshield's pepper comes from the option or the environment and is
    never in a repr."""
    with pytest.raises(ConfigurationError, match="unknown legacy format 'nope'"):
        KeystileConfig(store=MemoryKeyStore(), legacy_formats=["nope"])
    with pytest.raises(ConfigurationError, match="takes no option"):
        KeystileConfig(store=MemoryKeyStore(), legacy_formats={"keygate": {"pepper": "x"}})
    with pytest.raises(TypeError):
        KeystileConfig(store=MemoryKeyStore(), legacy_formats="keygate")
    option = {"keyshield": {"pepper": "pepper-from-option"}}
    config = KeystileConfig(store=MemoryKeyStore(), legacy_formats=option)
    assert config.legacy is not None and config.legacy.pepper == "pepper-from-option"
    assert "pepper-from-option" not in repr(config) + repr(config.legacy)
    monkeypatch.setenv("KEYSTILE_KEYSHIELD_PEPPER", "pepper-from-env")
    config = KeystileConfig(store=MemoryKeyStore(), legacy_formats=["keyshield"])
    assert config.legacy is not None and config.legacy.pepper == "pepper-from-env"


class _FailingDialect:
    """A store dialect whose second key fails to encode, as a write failing mid-import."""

    def __init__(self, dialect: Any) -> None:
        self._dialect, self._keys = dialect, 0

    def key_values(self, record: KeyRecord) -> list[Any]:
        self._keys += 1
        if self._keys == 2:
            raise RuntimeError("the second key fails")
        values: list[Any] = self._dialect.key_values(record)
        return values

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dialect, name)


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_an_import_is_one_transaction(
    store: KeyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing on the second key leaves no key and no event: nothing half imported."""
    from keystile.stores.postgres import keys as postgres_keys
    from keystile.stores.sqlite import keys as sqlite_keys

    module: Any = sqlite_keys if "sqlite" in store.display_url else postgres_keys
    name = "SQLITE" if module is sqlite_keys else "POSTGRES"
    monkeypatch.setattr(module, name, _FailingDialect(getattr(module, name)))
    path = write_csv(tmp_path / "keys.csv", [row(*dotted_key()) for _ in range(3)])
    with pytest.raises(RuntimeError, match="second key"):
        await import_file(store, path)
    monkeypatch.undo()
    assert await store.list_all() == [] and await store.list_events() == []


async def test_legacy_tokens_are_keys_when_keys_are_optional(tmp_path: Path) -> None:
    """With ``required=False`` a token of a legacy shape is verified as a key (a wrong one
    refused, never passed on as anonymous) and stripped before the app, as keystile's own."""
    store = MemoryKeyStore()
    public, key = dotted_key()
    await import_file(store, write_csv(tmp_path / "keys.csv", [row(public, key)]))
    app = legacy_app(store, required=False)
    _, unknown = dotted_key()
    assert await statuses(app, [key, unknown]) == [200, 401]
    async with client(app) as http:
        seen = (await http.get("/whoami", headers={"Authorization": f"Bearer {key}"})).json()
        foreign = (await http.get("/whoami", headers={"Authorization": "Bearer not-a-key"})).json()
    assert seen["authenticated"] and "authorization" not in seen["headers"]
    assert not foreign["authenticated"] and "authorization" in foreign["headers"]
