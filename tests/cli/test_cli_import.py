"""``keystile import``: what it prints, its JSON, a dry run, a second run, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import run  # the CLI tests' runner: exit code, stdout, stderr

from importing import dotted_key, row, write_csv
from keystile import importers
from keystile.cli.importing import SOURCES


def test_import_csv(
    sqlite_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run says what it would import; the import says what it did and what it
    skipped, by reason; a second run imports nothing; ``--json`` is one object."""
    rows = [row(*dotted_key()), row(*dotted_key()), row(*dotted_key(), hash_algorithm="md5")]
    path = str(write_csv(tmp_path / "keys.csv", rows))
    assert run(capsys, "--database-url", sqlite_database_url, "init")[0] == 0
    code, out, err = run(
        capsys, "--database-url", sqlite_database_url, "import", "csv", "--file", path, "--dry-run"
    )
    assert (code, out) == (0, "")
    assert f"would import 2 key(s) from csv into {sqlite_database_url}" in err
    assert "skipped 1: unknown_algorithm 1" in err
    code, out, err = run(
        capsys, "--database-url", sqlite_database_url, "import", "csv", "--file", path
    )
    assert code == 0 and "imported 2 key(s)" in err
    code, out, _ = run(
        capsys, "import", "csv", "--file", path, "--json", "--database-url", sqlite_database_url
    )
    report = json.loads(out)
    assert code == 0 and out.count("\n") == 1
    assert (report["imported"], report["skipped"]) == (0, {"exists": 2, "unknown_algorithm": 1})
    code, out, _ = run(capsys, "--database-url", sqlite_database_url, "--json", "events")
    actions = [json.loads(line)["action"] for line in out.splitlines()]
    assert actions == ["imported", "imported"]
    assert json.loads(out.splitlines()[0])["actor"].startswith("cli:")


def test_import_errors_are_one_line(
    sqlite_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreachable source, a missing table, a missing option or two owner options end
    with one line on stderr and exit code 1, never a traceback."""
    sqlite = f"sqlite:///{tmp_path / 'nowhere.db'}"
    empty = tmp_path / "empty.db"
    empty.touch()
    assert run(capsys, "--database-url", sqlite_database_url, "init")[0] == 0
    for argv in (
        ["import", "drf-api-key", "--source-url", sqlite, "--owner", "acme"],
        ["import", "keygate", "--source-url", "postgresql://nobody:secret@127.0.0.1:1/x"],
        ["import", "keyshield", "--source-url", f"sqlite:///{empty}", "--owner", "acme"],
        ["import", "keygate"],
        ["import", "csv", "--file", "keys.csv", "--owner", "a", "--owner-from", "name"],
    ):
        code, out, err = run(capsys, "--database-url", sqlite_database_url, *argv)
        assert (code, out) == (1, ""), argv
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "secret" not in err


def test_the_command_lists_every_source() -> None:
    """The command's sources are the importers' (listed apart so --help loads neither)."""
    assert tuple(SOURCES) == importers.SOURCES
