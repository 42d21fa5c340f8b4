"""``keystile webhooks``: add (the secret printed once, alone on stdout), list (never a
secret), test, deliveries with every attempt, remove; refusals are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keystile.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_webhooks_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ("--database-url", f"sqlite:///{tmp_path / 'hooks.db'}")
    assert run(capsys, *db, "init")[0] == 0
    code, out, err = run(
        capsys, *db, "webhooks", "add", "https://hooks.example.com/k", "--event", "key.created"
    )
    assert code == 0 and out.startswith("whsec_") and out.count("\n") == 1
    secret = out.strip()
    assert secret not in err and "shown only this once" in err
    code, out, _ = run(capsys, *db, "--json", "webhooks", "list")
    [hook] = [json.loads(line) for line in out.splitlines()]
    assert hook["events"] == ["key.created"] and secret not in out
    assert run(capsys, *db, "create", "--owner", "acme", "--name", "ci")[0] == 0
    assert run(capsys, *db, "webhooks", "test", hook["id"])[0] == 0
    code, out, _ = run(capsys, *db, "webhooks", "deliveries", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["type"], r["status"], r["attempts"]) for r in rows] == [
        ("key.created", "pending", []),
        ("webhook.test", "pending", []),
    ]
    assert secret not in out
    code, _, err = run(capsys, *db, "webhooks", "add", "http://hooks.example.com/k")
    assert code == 1 and err.count("\n") == 1 and "https://" in err
    code, _, err = run(capsys, *db, "webhooks", "add", "https://10.1.2.3/k")
    assert code == 1 and "private" in err
    assert run(capsys, *db, "webhooks", "remove", hook["id"])[0] == 0
    code, _, err = run(capsys, *db, "webhooks", "remove", hook["id"])
    assert code == 1 and "no webhook" in err
    code, out, _ = run(capsys, *db, "webhooks", "deliveries")
    assert out.count("dead") == 2
