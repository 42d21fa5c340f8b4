"""Budgets from the keystile command: named limits, the largest quota, and one clear error
for a malformed one (exit 1, nothing written)."""

from __future__ import annotations

import json

import pytest

from keystile.cli.arguments import MAX_QUOTA as CLI_MAX_QUOTA
from keystile.limits import MAX_QUOTA
from test_cli import run, url  # noqa: F401  (url: the fixture)


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
