"""The keystile command, run in-process: output, JSON, database resolution, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keystile.cli import build_parser, main


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'cli.db'}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_key_once_on_stdout(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """create prints the key alone on stdout and the details on stderr."""
    code, out, err = run(capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci")
    assert code == 0
    assert out.strip().startswith("ks_")
    assert out.strip() not in err
    assert "shown only this once" in err


def test_create_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """create --json prints one object with key, id, owner, name and scopes, no hash."""
    code, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci",
        "--scope", "a", "--scope", "b", "--expires-in", "90d", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0
    assert data["key"].startswith(f"ks_{data['id']}_")
    assert (data["owner"], data["name"], data["scopes"]) == ("acme", "ci", ["a", "b"])
    assert data["expires_at"] is not None
    assert "secret_hash" not in data


def test_list_show_revoke_rotate(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The lifecycle from the CLI: list, show, rotate, revoke, all owner-scoped."""
    _, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci", "--json"
    )
    key_id = json.loads(out)["id"]
    code, out, _ = run(capsys, "--database-url", url, "list", "--owner", "acme", "--json")
    assert code == 0 and [k["id"] for k in json.loads(out)] == [key_id]
    code, out, _ = run(capsys, "--database-url", url, "list", "--owner", "acme")
    assert key_id in out and "active" in out
    code, out, _ = run(capsys, "--database-url", url, "show", key_id, "--owner", "acme", "--json")
    assert json.loads(out)["name"] == "ci"
    code, _, err = run(capsys, "--database-url", url, "show", key_id, "--owner", "globex")
    assert code == 1 and err.count("\n") == 1
    code, out, _ = run(
        capsys,
        "--database-url",
        url,
        "rotate",
        key_id,
        "--owner",
        "acme",
        "--grace",
        "15m",
        "--json",
    )
    rotated = json.loads(out)
    assert code == 0 and rotated["replaces"] == key_id
    code, _, err = run(capsys, "--database-url", url, "revoke", key_id, "--owner", "acme")
    assert code == 0 and "revoked" in err
    code, _, err = run(capsys, "--database-url", url, "revoke", key_id, "--owner", "acme")
    assert code == 0 and "nothing to revoke" in err


def test_create_replace(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A second create for the same name fails in one line; --replace succeeds."""
    run(capsys, "--database-url", url, "create", "--owner", "acme", "--name", "laptop")
    code, out, err = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "laptop"
    )
    assert code == 1 and out == ""
    assert err.startswith("keystile: error:") and "--replace" in err and err.count("\n") == 1
    code, _, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "laptop", "--replace"
    )
    assert code == 0


def test_reap_dry_run(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """reap --dry-run lists without revoking; reap revokes."""
    run(capsys, "--database-url", url, "create", "--owner", "acme", "--name", "idle")
    code, out, _ = run(
        capsys, "--database-url", url, "reap", "--unused-for", "0s", "--dry-run", "--json"
    )
    assert code == 0 and len(json.loads(out)) == 1
    _, out, _ = run(capsys, "--database-url", url, "reap", "--unused-for", "0s", "--json")
    assert json.loads(out)[0]["status"] == "active"  # as it was before the reap
    _, out, _ = run(capsys, "--database-url", url, "list", "--owner", "acme", "--json")
    assert json.loads(out)[0]["status"] == "revoked"


def test_database_url_resolution(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--database-url beats KEYSTILE_DATABASE_URL, which beats sqlite:///keystile.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    run(capsys, "create", "--owner", "o", "--name", "default")
    assert (tmp_path / "keystile.db").exists()
    monkeypatch.setenv("KEYSTILE_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    run(capsys, "create", "--owner", "o", "--name", "env")
    run(
        capsys,
        "--database-url",
        f"sqlite:///{tmp_path / 'flag.db'}",
        "create",
        "--owner",
        "o",
        "--name",
        "flag",
    )
    names = {}
    for db in ("keystile.db", "env.db", "flag.db"):
        _, out, _ = run(
            capsys, "--database-url", f"sqlite:///{tmp_path / db}", "list", "--owner", "o", "--json"
        )
        names[db] = [k["name"] for k in json.loads(out)]
    assert names == {"keystile.db": ["default"], "env.db": ["env"], "flag.db": ["flag"]}


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "--owner", "acme"],
        ["create", "--owner", "acme", "--name", "x", "--expires-in", "soon"],
        ["--database-url", "mysql://nope", "list", "--owner", "acme"],
        ["--database-url", "sqlite:////nonexistent-dir/x/y.db", "init"],
        ["nosuchcommand"],
    ],
    ids=["missing-name", "bad-duration", "bad-url", "unwritable", "unknown-command"],
)
def test_errors_are_one_line_exit_1(
    url: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Every error is one line on stderr and exit code 1, never a traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    _, err = capsys.readouterr()
    assert code == 1
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_every_subcommand_has_help_with_example() -> None:
    """Each subcommand's --help carries an example; the top-level help explains the URL order."""
    parser = build_parser()
    assert "KEYSTILE_DATABASE_URL" in parser.format_help()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[attr-defined]
        assert f"keystile {name}" in sub.format_help(), name


def test_console_script_runs() -> None:
    """The installed keystile command starts and prints its help."""
    result = subprocess.run(
        [sys.executable, "-m", "keystile.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "keystile" in result.stdout


def test_demo_self_test(tmp_path: Path) -> None:
    """keystile demo serves on 127.0.0.1 and answers 200 with the key and 401 without."""
    result = subprocess.run(
        [sys.executable, "-m", "keystile.cli", "demo", "--self-test", "--port", "0"],
        capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "curl -i http://127.0.0.1:" in result.stdout
    assert result.stdout.count("(expected 200)") == 2
    assert "without a key: 401 (expected 401)" in result.stdout


@pytest.mark.anyio
async def test_cli_revoke_in_another_process_reaches_running_app(url: str) -> None:
    """A leaked key revoked with the CLI (another process) stops working in a running
    SQLite-backed app well within the TTL, through the polled change log."""
    import anyio

    from apps import client, protect
    from keystile import CHEAPEST_PARAMETERS, KeyManager, store_from_url

    async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
        created = await manager.create(owner="acme", name="leaked")
    store = store_from_url(url)
    app = protect(store, cache_ttl=3600)
    headers = {"X-API-Key": created.key}
    async with client(app) as c:
        assert (await c.get("/whoami", headers=headers)).status_code == 200
        command = [sys.executable, "-m", "keystile.cli", "--database-url", url]
        result = await anyio.run_process([*command, "revoke", created.id, "--owner", "acme"])
        assert b"revoked" in result.stderr
        started = anyio.current_time()
        with anyio.fail_after(5):
            while (await c.get("/whoami", headers=headers)).status_code == 200:
                await anyio.sleep(0.02)
        elapsed = anyio.current_time() - started
    await app.aclose()
    assert elapsed < 3  # the poll runs every second; the TTL (an hour) played no part


def test_replace_login_leaves_one_recognisable_key(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-running a device login with --replace leaves one active key with that name."""
    for _ in range(3):
        code, _, _ = run(
            capsys, "--database-url", url, "create", "--owner", "ann", "--name", "ann's laptop",
            "--replace",
        )  # fmt: skip
        assert code == 0
    _, out, _ = run(capsys, "--database-url", url, "list", "--owner", "ann", "--json")
    keys = json.loads(out)
    assert [k["name"] for k in keys if k["status"] == "active"] == ["ann's laptop"]
    assert len(keys) == 3
