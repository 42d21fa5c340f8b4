"""Budgets from the keystile command: named limits, the largest quota, and one clear error
for a malformed one (exit 1, nothing written)."""

from __future__ import annotations

import json

import pytest
from test_cli import run, url  # noqa: F401  (url: the fixture)

from keystile.cli.arguments import MAX_QUOTA as CLI_MAX_QUOTA
from keystile.limits import MAX_QUOTA


def test_named_limits_and_the_largest_quota(
    url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert CLI_MAX_QUOTA == MAX_QUOTA
    code, out, _ = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci", "--json",
        "--rate-limit", "10/s", "--limit", "burst=5/second", "--limit", "day=1000/d",
        "--quota", str(MAX_QUOTA),
    )  # fmt: skip
    assert code == 0
    created = json.loads(out)
    assert created["rate_limit"] == "10/second" and created["quota"] == MAX_QUOTA
    code, out, _ = run(
        capsys, "--database-url", url, "update", created["id"], "--owner", "acme", "--json",
        "--limit", "burst=2/second",
    )  # fmt: skip
    assert code == 0
    code, out, err = run(capsys, "--database-url", url, "show", created["id"], "--owner", "acme")
    assert code == 0 and "burst 2/second" in out + err and "day" not in out + err
    code, out, _ = run(
        capsys, "--database-url", url, "update", created["id"], "--owner", "acme", "--json",
        "--no-limits",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["rate_limits"] == {}
    assert json.loads(out)["rate_limit"] == "10/second"


@pytest.mark.parametrize(
    "bad",
    [
        ["--quota", str(MAX_QUOTA + 1)],
        ["--quota", "1e3"],
        ["--limit", "burst"],
        ["--limit", "Burst=1/s"],
        ["--limit", "burst=0/s"],
    ],
)
def test_malformed_limits_are_refused_before_anything_is_written(
    url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    bad: list[str],
) -> None:
    code, out, err = run(
        capsys, "--database-url", url, "create", "--owner", "acme", "--name", "ci", *bad
    )
    assert code == 1 and out == "" and "error: argument" in err and "Traceback" not in err
    assert run(capsys, "--database-url", url, "list", "--owner", "acme", "--json")[1] == ""


def test_owner_limits_set_show_and_clear(
    url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = ["--database-url", url]
    assert run(capsys, *db, "init")[0] == 0
    code, out, _ = run(
        capsys, *db, "owner", "limits", "acme", "--limit", "burst=50/second",
        "--limit", "sustained=10000/hour", "--quota", "1000000", "--quota-refill", "30d",
        "--json",
    )  # fmt: skip
    assert code == 0
    shown = json.loads(out)
    assert shown["rate_limits"] == {"burst": "50/second", "sustained": "10000/hour"}
    assert (shown["quota"], shown["quota_remaining"]) == (1_000_000, 1_000_000)
    assert shown["quota_refill"] == 30 * 86400
    code, out, _ = run(capsys, *db, "owner", "show", "acme")
    assert code == 0 and "burst 50/second, sustained 10000/hour" in out and "30d" in out
    code, _, err = run(capsys, *db, "owner", "limits", "acme", "--clear")
    assert code == 0 and "limits removed" in err
    code, out, _ = run(capsys, *db, "--json", "owner", "show", "acme")
    assert code == 0 and json.loads(out) == {"owner": "acme"}


@pytest.mark.parametrize(
    "bad",
    [
        ["--quota", "0"],
        ["--quota", str(MAX_QUOTA + 1)],
        ["--limit", "x=1/fortnight"],
        ["--quota-refill", "1d"],
        ["--clear", "--quota", "5"],
        [],
    ],
)
def test_malformed_owner_limits_change_nothing(
    url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    bad: list[str],
) -> None:
    db = ["--database-url", url]
    assert run(capsys, *db, "init")[0] == 0
    code, out, err = run(capsys, *db, "owner", "limits", "acme", *bad)
    assert code == 1 and out == "" and "Traceback" not in err and err
    assert json.loads(run(capsys, *db, "--json", "owner", "show", "acme")[1]) == {"owner": "acme"}


def test_usage_of_an_owner_without_a_key(
    url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = ["--database-url", url]
    assert run(capsys, *db, "create", "--owner", "acme", "--name", "ci")[0] == 0
    code, out, _ = run(capsys, *db, "--json", "usage", "--owner", "acme", "--since", "2h")
    assert code == 0 and all(json.loads(line)["requests"] == 0 for line in out.splitlines())
    assert len(out.splitlines()) == 3
