"""The strict tooling runs as part of the test command: ruff (format, lint), mypy, and the
import contracts of ``docs/architecture.md`` (import-linter, configured in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


#: import-linter's command (package ``importlinter``; ``python -m importlinter.cli`` runs nothing).
LINT_IMPORTS = [str(Path(sys.executable).with_name("lint-imports")), "--no-logo", "--no-cache"]


def test_import_contracts_hold() -> None:
    """Every import keeps the layers of docs/architecture.md (import-linter's contracts)."""
    result = subprocess.run(LINT_IMPORTS, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_import_contracts_can_fail(tmp_path: Path) -> None:
    """The contracts refuse a copy of the code whose bottom layer imports the CLI."""
    shutil.copytree(ROOT / "src" / "keystile", tmp_path / "src" / "keystile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "src" / "keystile" / "errors.py"
    errors.write_text(errors.read_text(encoding="utf-8") + "\nfrom keystile import cli\n")
    result = subprocess.run(
        LINT_IMPORTS,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "src")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "keystile.errors is not allowed to import keystile.cli" in result.stdout
