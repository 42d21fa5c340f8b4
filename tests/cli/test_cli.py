"""The keystile command, run in-process: output, JSON, database resolution, errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from keystile.cli import build_parser, main
from keystile.tokens import redact


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'cli.db'}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict[str, Any]]:
    """Every line of ``out`` parsed as one JSON object (JSON Lines)."""
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(isinstance(row, dict) for row in rows), out
    return rows


def one_object(out: str) -> dict[str, Any]:
    """``out`` as one JSON object on one line."""
    assert out.count("\n") == 1, out
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


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
    assert code == 0 and [k["id"] for k in json_lines(out)] == [key_id]
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
    assert code == 0 and "nothing to revoke" in err and "already revoked" in err


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
    assert code == 0 and len(json_lines(out)) == 1
    _, out, _ = run(capsys, "--database-url", url, "reap", "--unused-for", "0s", "--json")
    assert json_lines(out)[0]["status"] == "active"  # as it was before the reap
    _, out, _ = run(capsys, "--database-url", url, "list", "--owner", "acme", "--json")
    assert json_lines(out)[0]["status"] == "revoked"


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
        names[db] = [k["name"] for k in json_lines(out)]
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
    text = " ".join(parser.format_help().split())
    assert "--database-url, else $KEYSTILE_DATABASE_URL, else sqlite:///keystile.db" in text
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
        # The change log is polled every second; the TTL (an hour) plays no part.
        with anyio.fail_after(60):
            while (await c.get("/whoami", headers=headers)).status_code == 200:
                await anyio.sleep(0.02)
    await app.aclose()


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
    keys = json_lines(out)
    assert [k["name"] for k in keys if k["status"] == "active"] == ["ann's laptop"]
    assert len(keys) == 3


def create_key(url: str, capsys: pytest.CaptureFixture[str], owner: str = "acme") -> str:
    code, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", owner, "--name", "ci", "--json"
    )
    assert code == 0
    key_id: str = json.loads(out)["id"]
    return key_id


NO_DB_COMMANDS = [
    ["list", "--owner", "acme"],
    ["show", "AbC123def456", "--owner", "acme"],
    ["revoke", "AbC123def456", "--owner", "acme"],
    ["rotate", "AbC123def456", "--owner", "acme"],
    ["reap", "--unused-for", "90d"],
    ["reap", "--dry-run"],
    ["import", "csv", "--file", "keys.csv"],
]


@pytest.mark.parametrize("argv", NO_DB_COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_commands_never_create_a_missing_database(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Without a database, every command but init/create/demo fails in one line naming the
    URL it looked at and what to do, and creates no file."""
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("keystile: error: no key database at sqlite:///keystile.db")
    assert "keystile init" in err and "--database-url" in err and "KEYSTILE_DATABASE_URL" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_database_error_shows_the_path_of_a_relative_url(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """For a relative SQLite URL the error says which file it looked for."""
    code, _, err = run(capsys, "show", "AbC123def456", "--owner", "acme")
    assert code == 1 and f"(no file {tmp_path.resolve() / 'keystile.db'})" in err


@pytest.mark.parametrize("source", ["flag", "env"])
def test_missing_database_error_names_the_url_given(
    url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    """The missing-database error names the URL from --database-url or the environment."""
    if source == "env":
        monkeypatch.setenv("KEYSTILE_DATABASE_URL", url)
        code, _, err = run(capsys, "list", "--owner", "acme")
    else:
        monkeypatch.setenv("KEYSTILE_DATABASE_URL", "sqlite:///ignored.db")
        code, _, err = run(capsys, "--database-url", url, "list", "--owner", "acme")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"keystile: error: no key database at {url}: run 'keystile init'")
    assert list(tmp_path.iterdir()) == []


def test_init_and_create_create_the_database(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init creates the default database; after it, list works and says there are no keys."""
    code, _, _ = run(capsys, "init")
    assert code == 0 and (tmp_path / "keystile.db").exists()
    code, _, err = run(capsys, "list", "--owner", "acme")
    assert code == 0 and "no keys" in err


@pytest.mark.parametrize("command", ["show", "revoke", "rotate"])
@pytest.mark.parametrize("case", ["unknown-id", "other-owner", "garbage"])
def test_unknown_key_id_is_one_line_exit_1(
    url: str, capsys: pytest.CaptureFixture[str], command: str, case: str
) -> None:
    """show, revoke and rotate of a key id the owner does not have fail in one line."""
    key_id = create_key(url, capsys)
    owner = "acme"
    if case == "unknown-id":
        key_id = "AbC123def456"
    elif case == "other-owner":
        owner = "globex"
    else:
        key_id = "not a key id"
    code, out, err = run(capsys, "--database-url", url, command, key_id, "--owner", owner)
    assert code == 1 and out == ""
    assert err.startswith("keystile: error: ") and err.count("\n") == 1, err
    assert key_id in err


def test_revoke_other_owner_leaves_the_key_active(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused revoke of another owner's key changes nothing."""
    key_id = create_key(url, capsys)
    run(capsys, "--database-url", url, "revoke", key_id, "--owner", "globex")
    _, out, _ = run(capsys, "--database-url", url, "show", key_id, "--owner", "acme", "--json")
    assert json.loads(out)["status"] == "active"


def test_revoke_twice_is_idempotent(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Revoking a revoked key exits 0 and says it was already revoked."""
    key_id = create_key(url, capsys)
    code, _, err = run(capsys, "--database-url", url, "revoke", key_id, "--owner", "acme")
    assert code == 0 and err == f"revoked key {key_id}\n"
    code, _, err = run(capsys, "--database-url", url, "revoke", key_id, "--owner", "acme")
    assert code == 0 and "already revoked" in err and err.count("\n") == 1


DISPLAY_FORMS = {
    "redacted": redact,
    "three-dots": lambda key_id: redact(key_id).replace("…", "..."),
    "no-ellipsis": lambda key_id: f"ks_{key_id}",
    "other-prefix": lambda key_id: f"acme2_{key_id}…",
    "spaces": lambda key_id: f"  {key_id} ",
}


@pytest.mark.parametrize("form", DISPLAY_FORMS)
def test_display_form_accepted_as_key_id(
    url: str, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """show, rotate and revoke take the display form (ks_<id>…, ks_<id>..., ks_<id>)."""
    key_id = create_key(url, capsys)
    shown = DISPLAY_FORMS[form](key_id)
    code, out, _ = run(capsys, "--database-url", url, "show", shown, "--owner", "acme", "--json")
    assert code == 0 and json.loads(out)["id"] == key_id
    code, out, err = run(
        capsys, "--database-url", url, "rotate", shown, "--owner", "acme", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["replaces"] == key_id
    code, _, err = run(capsys, "--database-url", url, "revoke", shown, "--owner", "acme")
    assert code == 0 and err == f"revoked key {key_id}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "--owner", "acme", "--name", "x", "--expires-in", "3000000d"],
        ["create", "--owner", "acme", "--name", "x", "--expires-in", "36526d"],
        ["rotate", "AbC123def456", "--owner", "acme", "--grace", "3000000d"],
        ["reap", "--unused-for", "3000000d"],
        ["reap", "--unused-for", "99999999999w", "--dry-run"],
    ],
    ids=["expires-in", "expires-in-just-over", "grace", "unused-for", "unused-for-weeks"],
)
def test_durations_past_a_century_are_one_line_exit_1(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """A duration too long for a date is refused at parse time: one line, exit 1,
    no traceback, nothing created."""
    try:
        code = main(["--database-url", url, *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(("keystile: error: ", f"keystile {argv[0]}: error: ")), err
    assert err.count("\n") == 1 and "at most 100 years" in err
    assert list(tmp_path.iterdir()) == []


def test_expires_in_a_century_is_accepted(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The longest accepted --expires-in still mints a key."""
    code, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "x",
        "--expires-in", "36525d", "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["expires_at"] is not None


# -- global options, --version, JSON shapes ---------------------------------------------


@pytest.mark.parametrize("where", ["before", "after", "split"])
def test_global_options_go_before_or_after_the_command(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """--database-url and --json work before the command, after it, or one on each side;
    an option given before the command is not reset by the command's own parser."""
    db, as_json = ["--database-url", url], ["--json"]
    placed = {
        "before": lambda cmd: [*db, *as_json, *cmd],
        "after": lambda cmd: [*cmd, *db, *as_json],
        "split": lambda cmd: [*db, *cmd, *as_json],
    }[where]
    code, out, err = run(capsys, *placed(["create", "--owner", "acme", "--name", "ci"]))
    assert code == 0, err
    assert one_object(out)["name"] == "ci"
    code, out, err = run(capsys, *placed(["list", "--owner", "acme"]))
    assert code == 0, err
    assert [row["name"] for row in json_lines(out)] == ["ci"]
    assert (tmp_path / "cli.db").exists()
    assert not (tmp_path / "keystile.db").exists()


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    """keystile --version prints 'keystile <version>' from the package metadata, exit 0."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"keystile {importlib.metadata.version('keystile')}\n"


def test_json_is_one_object_per_key_and_one_line_per_row(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one object on one line for a command about one key, and one object per
    line (JSON Lines) for list, reap and events."""
    db = ["--database-url", url, "--json"]
    first = one_object(run(capsys, *db, "create", "--owner", "acme", "--name", "a")[1])
    second = one_object(run(capsys, *db, "create", "--owner", "acme", "--name", "b")[1])
    key_id = first["id"]
    for argv in (
        ["show", key_id, "--owner", "acme"],
        ["update", key_id, "--owner", "acme", "--scope", "items:read"],
        ["disable", key_id, "--owner", "acme"],
        ["enable", key_id, "--owner", "acme"],
        ["rotate", key_id, "--owner", "acme"],
        ["revoke", key_id, "--owner", "acme"],
        ["init"],
    ):
        code, out, err = run(capsys, *db, *argv)
        assert code == 0, err
        data = one_object(out)
        assert argv[0] == "init" or key_id in (data["id"], data["replaces"])
    assert one_object(run(capsys, *db, "show", key_id, "--owner", "acme")[1])["status"] == (
        "revoked"
    )
    listed = json_lines(run(capsys, *db, "list", "--owner", "acme")[1])
    assert len(listed) == 3 and {second["id"], key_id} <= {row["id"] for row in listed}
    events = json_lines(run(capsys, *db, "events", "--owner", "acme")[1])
    assert len(events) >= 7 and all("action" in row for row in events)
    reaped = json_lines(run(capsys, *db, "reap", "--unused-for", "0s", "--dry-run")[1])
    assert {row["id"] for row in reaped} == {second["id"], *(r["id"] for r in listed)} - {key_id}


def test_readme_documents_the_json_shapes() -> None:
    """The README's CLI section says what --json prints: one object, or JSON Lines."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Managing keys") : readme.index("### Changing, disabling")]
    assert "JSON Lines" in section and "one object" in section
    assert "keystile --json" in section and "--database-url" in section


# -- errors name the flag ---------------------------------------------------------------

#: A Python parameter name (``expires_in``, ``quota_refill``): never in a CLI error.
PARAMETER_NAME = re.compile(r"\b[a-z]+_[a-z_]+\b")

FLAG_ERRORS = [
    (["create", "--owner", "acme", "--name", "x", "--expires-in", "soon"], "--expires-in"),
    (["create", "--owner", "acme", "--name", "x", "--expires-in", "0s"], "--expires-in"),
    (["create", "--owner", "acme", "--name", "x", "--quota", "0"], "--quota"),
    (["create", "--owner", "acme", "--name", "x", "--quota", "-1"], "--quota"),
    (["create", "--owner", "acme", "--name", "x", "--quota", "many"], "--quota"),
    (["create", "--owner", "acme", "--name", "x", "--quota", "5", "--quota-refill", "0s"],
     "--quota-refill"),
    (["create", "--owner", "acme", "--name", "x", "--quota-refill", "1h"], "--quota-refill"),
    (["create", "--owner", "acme", "--name", "x", "--rate-limit", "10/fortnight"],
     "--rate-limit"),
    (["create", "--owner", "acme", "--name", "x", "--scope", "a b"], "--scope"),
    (["create", "--owner", "acme", "--name", "x", "--ip-allow", "10.1.2.3/8"], "--ip-allow"),
    (["create", "--owner", "acme", "--name", "x", "--ip-allow", "nowhere"], "--ip-allow"),
    (["create", "--owner", "acme", "--name", "x", "--metadata", "team"], "--metadata"),
    (["create", "--owner", "acme", "--name", " "], "--name"),
    (["create", "--owner", " acme", "--name", "x"], "--owner"),
    (["create", "--owner", "acme", "--name", "x", "--actor", ""], "--actor"),
    (["update", "{id}", "--owner", "acme", "--expires-in", "0s"], "--expires-in"),
    (["update", "{id}", "--owner", "acme", "--quota-refill", "1d"], "--quota-refill"),
    (["update", "{id}", "--owner", "acme", "--quota", "-1"], "--quota"),
    (["update", "{id}", "--owner", "acme", "--ip-allow", "10.1.2.3/8"], "--ip-allow"),
    (["update", "{id}", "--owner", "acme", "--scope", 'a"b'], "--scope"),
    (["rotate", "{id}", "--owner", "acme", "--grace", "soon"], "--grace"),
    (["reap", "--unused-for", "soon"], "--unused-for"),
    (["events", "--since", "soon"], "--since"),
    (["events", "--limit", "0"], "--limit"),
    (["events", "--limit", "-3"], "--limit"),
    (["events", "--prune-older-than", "soon"], "--prune-older-than"),
    (["usage", "{id}", "--owner", "acme", "--since", "soon"], "--since"),
    (["usage", "{id}", "--owner", "acme", "--by", "week"], "--by"),
    (["usage", "{id}", "--owner", "acme", "--since", "200d", "--by", "minute"], "--since"),
    (["usage", "--owner", "acme", "--top", "0"], "--top"),
    (["usage", "--owner", "acme", "--top", "-1"], "--top"),
    (["usage", "{id}", "--owner", "acme", "--plot", "/nonexistent-dir/usage.png"], "--plot"),
    (["create", "--owner", "acme", "--name", "x", "--quota", "9" * 30], "--quota"),
    (["events", "--limit", "9" * 30], "--limit"),
    (["demo", "--port", "-1"], "--port"),
    (["demo", "--port", "70000"], "--port"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"), FLAG_ERRORS, ids=[f"{a[0]} {f}={a[a.index(f) + 1]}" for a, f in FLAG_ERRORS]
)
def test_errors_name_the_flag(
    url: str, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """A bad option value is refused in one line, exit 1, naming the flag as typed and no
    Python parameter name; nothing is created."""
    key_id = create_key(url, capsys)
    try:
        code, out, err = run(capsys, "--database-url", url, *(a.format(id=key_id) for a in argv))
    except SystemExit as exc:  # argparse refuses a malformed option itself
        code, (out, err) = int(str(exc.code)), capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert flag in err, err
    assert not PARAMETER_NAME.search(err), err
    _, out, _ = run(capsys, "--database-url", url, "list", "--all")
    assert len(out.splitlines()) == 2  # the header and the key "ci"


# -- usage from --since to now ----------------------------------------------------------


def add_usage(url: str, key_id: str, counts: dict[datetime, tuple[int, int]]) -> None:
    """Usage rows for ``key_id`` as the middleware's flush writes them (per minute)."""
    from keystile.stores import store_from_url

    async def write() -> None:
        store = store_from_url(url)
        await store.open()
        try:
            await store.add_usage({(key_id, minute): n for minute, n in counts.items()})
        finally:
            await store.close()

    anyio.run(write)


def used_key(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, datetime]:
    """A key used 2 hours ago (3 requests, 1 refused) and now (2 requests)."""
    key_id = create_key(url, capsys)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    add_usage(url, key_id, {now - timedelta(hours=2): (3, 1), now: (2, 0)})
    return key_id, now


def test_usage_json_has_every_period_from_since_to_now(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """usage --json prints one row per period from --since to now, the empty ones as
    zeros, one period apart, with the counts where the key was used."""
    key_id, now = used_key(url, capsys)
    code, out, err = run(
        capsys, "--database-url", url, "usage", key_id, "--owner", "acme",
        "--since", "3h", "--by", "hour", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json_lines(out)
    starts = [datetime.fromisoformat(str(row["start"])) for row in rows]
    assert len(rows) == 4
    assert starts == [starts[0] + timedelta(hours=i) for i in range(4)]
    assert starts[0] <= now - timedelta(hours=2) and now < starts[-1] + timedelta(hours=1)
    assert [(row["requests"], row["rejected"]) for row in rows].count((0, 0)) == 2
    assert (sum(r["requests"] for r in rows), sum(r["rejected"] for r in rows)) == (5, 1)


def test_usage_chart_shows_every_period(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar chart has a line for every minute of four hours (241), empty or not."""
    key_id, _ = used_key(url, capsys)
    code, out, err = run(
        capsys, "--database-url", url, "usage", key_id, "--owner", "acme",
        "--since", "4h", "--by", "minute",
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("period (UTC)") and lines[-1].split()[-2:] == ["5", "1"]
    periods = lines[1:-1]
    assert len(periods) == 4 * 60 + 1
    assert sum(line.split()[-2:] == ["0", "0"] for line in periods) == len(periods) - 2


def test_usage_plot_has_a_time_axis_from_since_to_now(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--plot draws over a time axis (matplotlib dates) that spans --since to now."""
    pytest.importorskip("matplotlib")
    from matplotlib.dates import date2num
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: saved.append(figure))
    key_id, now = used_key(url, capsys)
    code, _, err = run(
        capsys, "--database-url", url, "usage", key_id, "--owner", "acme",
        "--since", "6h", "--by", "hour", "--plot", "usage.png",
    )  # fmt: skip
    assert code == 0, err
    (axes,) = saved[0].axes
    assert type(axes.xaxis.get_major_formatter()).__module__ == "matplotlib.dates"
    left, right = axes.get_xlim()
    assert left <= date2num(now - timedelta(hours=6)) < date2num(now) <= right
    assert right - left <= 7 / 24 + 1e-6  # seven hourly periods, in days


# -- the demo leaves nothing behind -----------------------------------------------------


def demo_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("keystile-demo-*"))


@pytest.fixture
def demo_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a demo subprocess whose temporary files go to a fresh folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KEYSTILE_DATABASE_URL"}
    return {**env, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}, tmp


def test_demo_self_test_deletes_its_database(
    tmp_path: Path, demo_env: tuple[dict[str, str], Path]
) -> None:
    """keystile demo --self-test says where its database is and deletes it on exit."""
    env, tmp = demo_env
    result = subprocess.run(
        [*CLI, "demo", "--self-test", "--port", "0"],
        capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"database sqlite:///{tmp}/keystile-demo-" in result.stdout
    assert demo_folders(tmp) == []


def test_demo_deletes_its_database_on_ctrl_c(
    tmp_path: Path, demo_env: tuple[dict[str, str], Path]
) -> None:
    """Ctrl+C (SIGINT) to a demo that is serving stops it and deletes its database."""
    import threading

    import httpx

    env, tmp = demo_env
    process = subprocess.Popen(
        [*CLI, "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    printed: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            printed.append(line)
            if line.startswith("Press Ctrl+C"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(printed)
        base = re.search(r"curl -i (http://127\.0\.0\.1:\d+)/whoami   # 401", "".join(printed))
        assert base is not None
        answered = False
        for _ in range(1500):  # until the server answers (it starts after the message)
            try:
                answered = httpx.get(base.group(1) + "/", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                threading.Event().wait(0.02)
        assert answered
        assert len(demo_folders(tmp)) == 1
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode in (0, 130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr
    assert demo_folders(tmp) == []


def test_demo_deletes_its_database_on_an_error(
    tmp_path: Path, demo_env: tuple[dict[str, str], Path]
) -> None:
    """A demo that fails after minting (no port to bind on that host) fails in one line
    and deletes its database."""
    env, tmp = demo_env
    result = subprocess.run(
        [*CLI, "demo", "--self-test", "--host", "192.0.2.1"],
        capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("keystile: error: ") and result.stderr.count("\n") == 1
    assert demo_folders(tmp) == []


CLI = [sys.executable, "-m", "keystile.cli"]


@pytest.fixture(params=["buffered", "unbuffered"])
def cli_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment for a keystile subprocess, with block-buffered stdout (what a user
    usually has) or unbuffered (PYTHONUNBUFFERED=1): a closed pipe fails at another place."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if request.param == "unbuffered":
        env["PYTHONUNBUFFERED"] = "1"
    return env


def _assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr
    assert "Exception ignored" not in stderr
    assert stderr == ""


@pytest.mark.anyio
async def test_output_into_head_ends_quietly(url: str, cli_env: dict[str, str]) -> None:
    """keystile list --json | head -1, with more output than the pipe holds, stops quietly
    with the status of a command killed by SIGPIPE."""
    from keystile import CHEAPEST_PARAMETERS, KeyManager

    async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
        for i in range(40):
            await manager.create(owner="acme", name=f"k{i}", metadata={"pad": "x" * 8000})
    for argv in (["list", "--owner", "acme", "--json"], ["list", "--owner", "acme"]):
        command = shlex.join([*CLI, "--database-url", url, *argv])
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command} | head -1"],
            capture_output=True, text=True, check=False, timeout=60, env=cli_env,
        )  # fmt: skip
        assert result.stdout.count("\n") == 1
        _assert_quiet(result.stderr)
        assert result.returncode in (0, 141)  # 0: the table fit in the pipe
        if "--json" in argv:
            assert result.returncode == 141


@pytest.mark.parametrize(
    ("argv", "statuses"),
    [
        (["list", "--owner", "acme", "--json"], {141}),
        (["list", "--owner", "acme"], {141}),
        (["show", "AbC123def456", "--owner", "acme", "--json"], {1}),
        (["--help"], {0, 141}),  # argparse ignores its own write errors; the flush does not
    ],
    ids=["list-json", "list-table", "error", "help"],
)
def test_output_to_a_closed_pipe_ends_quietly(
    url: str,
    capsys: pytest.CaptureFixture[str],
    cli_env: dict[str, str],
    argv: list[str],
    statuses: set[int],
) -> None:
    """Output to a pipe whose reader has gone ends with nothing on stderr but the error,
    if any, whether it fails on the write or on the last flush."""
    create_key(url, capsys)
    process = subprocess.Popen(
        [*CLI, "--database-url", url, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    if statuses == {1}:
        assert stderr.startswith("keystile: error: no key ") and stderr.count("\n") == 1
    else:
        _assert_quiet(stderr)
    assert process.returncode in statuses


# -- usage limits -----------------------------------------------------------------------


def test_create_with_limits_and_show_them(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """create with limits; show prints the limit, the quota and what is left."""
    code, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci",
        "--rate-limit", "10/s", "--quota", "1000", "--quota-refill", "1d", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0
    assert (data["rate_limit"], data["quota"], data["quota_remaining"]) == ("10/second", 1000, 1000)
    assert data["quota_refill"] == 86400
    code, out, _ = run(capsys, "--database-url", url, "show", data["id"], "--owner", "acme")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["rate_limit"] == "10/second"
    assert (lines["quota"], lines["quota_remaining"], lines["quota_refill"]) == (
        "1000",
        "1000",
        "1d",
    )


def test_update_changes_limits_of_a_display_form_id(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """update KEY_ID (display form too) changes the limits; --no-rate-limit/--no-quota clear."""
    key_id = create_key(url, capsys)
    shown = redact(key_id, "ks")
    code, out, err = run(
        capsys, "--database-url", url, "update", shown, "--owner", "acme",
        "--rate-limit", "100/minute", "--quota", "5", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0, err
    assert (data["rate_limit"], data["quota"], data["quota_remaining"]) == ("100/minute", 5, 5)
    code, out, err = run(
        capsys, "--database-url", url, "update", key_id, "--owner", "acme",
        "--no-rate-limit", "--no-quota",
    )  # fmt: skip
    assert code == 0 and "rate limit -" in err and "quota -" in err
    _, out, _ = run(capsys, "--database-url", url, "show", key_id, "--owner", "acme", "--json")
    assert (json.loads(out)["rate_limit"], json.loads(out)["quota"]) == (None, None)


@pytest.mark.parametrize(
    "argv",
    [
        ("update", "{id}", "--owner", "acme"),
        ("update", "{id}", "--owner", "globex", "--rate-limit", "1/second"),
        ("update", "{id}", "--owner", "acme", "--rate-limit", "10/fortnight"),
        ("update", "{id}", "--owner", "acme", "--quota", "-1"),
        ("update", "{id}", "--owner", "acme", "--quota-refill", "1d"),
        ("update", "{id}", "--owner", "acme", "--rate-limit", "1/s", "--no-rate-limit"),
        ("create", "--owner", "acme", "--name", "x", "--quota-refill", "1h"),
    ],
)
def test_limit_errors_are_one_line_exit_1(
    url: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    """Bad limits, nothing to update, a refill without a quota, another owner: one line, exit 1."""
    key_id = create_key(url, capsys)
    try:
        code, out, err = run(capsys, "--database-url", url, *(a.format(id=key_id) for a in argv))
    except SystemExit as exc:  # argparse refuses a malformed option itself
        code, (out, err) = int(str(exc.code)), capsys.readouterr()
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_update_disable_enable_and_list_all(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """update --scope/--ip-allow/--name, disable, enable and list --all, by display form too."""
    _, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci", "--json"
    )
    key_id = json.loads(out)["id"]
    code, out, _ = run(
        capsys, "--database-url", url, "update", f"ks_{key_id}…", "--owner", "acme",
        "--scope", "items:read", "--scope", "reports:read", "--ip-allow", "10.0.0.0/8",
        "--name", "deploy", "--metadata", "team=infra", "--expires-in", "30d", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["scopes"] == ["items:read", "reports:read"]
    assert (data["ip_allowlist"], data["name"], data["metadata"]) == (
        ["10.0.0.0/8"], "deploy", {"team": "infra"},
    )  # fmt: skip
    code, out, _ = run(
        capsys, "--database-url", url, "disable", key_id, "--owner", "acme", "--json"
    )
    assert code == 0 and json.loads(out)["status"] == "disabled"
    code, out, _ = run(capsys, "--database-url", url, "list", "--owner", "acme")
    assert "disabled" in out
    code, out, _ = run(capsys, "--database-url", url, "enable", key_id, "--owner", "acme", "--json")
    assert code == 0 and json.loads(out)["status"] == "active"
    run(capsys, "--database-url", url, "create", "--owner", "globex", "--name", "g")
    code, out, _ = run(capsys, "--database-url", url, "list", "--all", "--json")
    assert code == 0 and sorted(k["owner"] for k in json_lines(out)) == ["acme", "globex"]
    code, out, _ = run(
        capsys, "--database-url", url, "update", key_id, "--owner", "acme", "--no-ip-allow",
        "--no-expiry", "--json",
    )  # fmt: skip
    assert json.loads(out)["ip_allowlist"] == [] and json.loads(out)["expires_at"] is None


def test_operation_errors_are_one_line_exit_1(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad CIDR, clashing flags, nothing to update or another owner: one line, exit 1."""
    _, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci", "--json"
    )
    key_id = json.loads(out)["id"]
    for argv in (
        ("update", key_id, "--owner", "acme", "--ip-allow", "10.1.2.3/8"),
        ("update", key_id, "--owner", "acme", "--ip-allow", "10.0.0.0/8", "--no-ip-allow"),
        ("update", key_id, "--owner", "acme"),
        ("disable", key_id, "--owner", "globex"),
    ):
        code, out, err = run(capsys, "--database-url", url, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1, argv


def test_changing_a_revoked_key_is_one_line_exit_1(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """update, rename, disable and enable of a revoked key: one line saying so, exit 1."""
    key_id = create_key(url, capsys)
    assert run(capsys, "--database-url", url, "revoke", key_id, "--owner", "acme")[0] == 0
    for argv in (
        ("update", key_id, "--owner", "acme", "--scope", "admin"),
        ("update", key_id, "--owner", "acme", "--name", "renamed"),
        ("disable", key_id, "--owner", "acme"),
        ("enable", key_id, "--owner", "acme"),
    ):
        code, out, err = run(capsys, "--database-url", url, *argv)
        assert (code, out, err.count("\n")) == (1, "", 1), argv
        assert "is revoked" in err and "Traceback" not in err, argv
    code, out, _ = run(capsys, "--database-url", url, "show", key_id, "--owner", "acme", "--json")
    shown = json.loads(out)
    assert (shown["status"], shown["name"], shown["scopes"]) == ("revoked", "ci", [])


def test_ip_allowlist_errors_are_one_line_exit_1(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """257 --ip-allow networks, a zone id or an IPv4-mapped network: one line, exit 1."""
    many = [arg for i in range(257) for arg in ("--ip-allow", f"10.0.{i // 256}.{i % 256}/32")]
    for options in (many, ["--ip-allow", "fe80::%eth0/64"], ["--ip-allow", "::ffff:0:0/96"]):
        code, out, err = run(
            capsys, "--database-url", url, "create", "--owner", "acme", "--name", "x", *options
        )
        assert (code, out, err.count("\n")) == (1, "", 1), options[:2]
        assert "ip_allowlist" in err and "Traceback" not in err
