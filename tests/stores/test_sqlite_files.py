"""The SQLite store's files on disk: private when keystile creates them, untouched otherwise."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.cli import main
from keystile.stores import SQLiteKeyStore


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are created world-readable (0644) by default."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


@pytest.mark.anyio
@pytest.mark.usefixtures("umask_022")
async def test_new_database_and_its_wal_files_are_private(tmp_path: Path) -> None:
    """A database keystile creates is 0600, and so are its -wal and -shm files."""
    path = tmp_path / "keys.db"
    async with KeyManager(SQLiteKeyStore(path), argon2=CHEAPEST_PARAMETERS) as manager:
        await manager.create(owner="acme", name="ci")
        found = modes(tmp_path)
    assert "keys.db-wal" in found and "keys.db-shm" in found  # WAL mode, still open
    assert found == dict.fromkeys(found, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.anyio
@pytest.mark.usefixtures("umask_022")
async def test_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    """keystile never changes the mode of a database file that already exists."""
    path = tmp_path / "keys.db"
    async with KeyManager(SQLiteKeyStore(path), argon2=CHEAPEST_PARAMETERS):
        pass
    path.chmod(0o640)
    async with KeyManager(SQLiteKeyStore(path), argon2=CHEAPEST_PARAMETERS) as manager:
        await manager.create(owner="acme", name="ci")
        found = modes(tmp_path)
    assert found == {"keys.db": 0o640, "keys.db-wal": 0o640, "keys.db-shm": 0o640}


@pytest.mark.anyio
@pytest.mark.usefixtures("umask_022")
async def test_existing_empty_file_keeps_its_mode(tmp_path: Path) -> None:
    """An empty file made beforehand (touch keys.db) becomes the database, mode unchanged."""
    path = tmp_path / "keys.db"
    path.touch(mode=0o644)
    async with KeyManager(SQLiteKeyStore(path), argon2=CHEAPEST_PARAMETERS) as manager:
        await manager.create(owner="acme", name="ci")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


@pytest.mark.usefixtures("umask_022")
def test_keystile_init_creates_a_private_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """keystile init (and the default URL) creates keystile.db readable by its owner only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    assert main(["init"]) == 0
    assert modes(tmp_path) == {"keystile.db": 0o600}


@pytest.mark.anyio
async def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    """A database in a directory that does not exist fails as a StoreError naming the path."""
    from keystile.errors import StoreError

    store = SQLiteKeyStore(tmp_path / "missing" / "keys.db")
    with pytest.raises(StoreError, match="missing"):
        await store.open()
    assert not (tmp_path / "missing").exists()


@pytest.mark.anyio
async def test_in_memory_database_creates_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///:memory: stays in memory."""
    monkeypatch.chdir(tmp_path)
    async with KeyManager(SQLiteKeyStore(":memory:"), argon2=CHEAPEST_PARAMETERS) as manager:
        await manager.create(owner="acme", name="ci")
    assert list(tmp_path.iterdir()) == []
