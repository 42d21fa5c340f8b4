"""The strict tooling runs as part of the test command: ruff (format, lint) and mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = [p for p in ("src", "tests", "examples", "benchmarks") if (ROOT / p).is_dir()]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "format", "--check", *CODE],
        ["ruff", "check", *CODE],
        ["mypy"],
    ],
    ids=["ruff-format", "ruff-check", "mypy"],
)
def test_tool_passes(command: list[str]) -> None:
    """The tool reports no problem on the code base."""
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
