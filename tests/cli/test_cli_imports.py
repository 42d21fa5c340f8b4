"""What the keystile command imports: ``--help`` loads argparse and the command's own small
modules, a command loads the manager and the stores when it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: Run in a fresh interpreter: the ``keystile`` package stands in as an empty package over
#: the same directory, so that what its ``__init__`` imports for the middleware does not
#: hide what the command imports; then ``main(argv)``, and at exit the modules it loaded.
PROBE = """
import atexit, importlib.util, sys, types
spec = importlib.util.find_spec("keystile")
package = types.ModuleType("keystile")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["keystile"] = package
before = set(sys.modules)
atexit.register(lambda: print(" ".join(set(sys.modules) - before), file=sys.stderr))
from keystile.cli import main
sys.exit(main(sys.argv[1:]))
"""

HEAVY = (
    "keystile.manager",
    "keystile.importers",
    "keystile.legacy",
    "keystile.stores",
    "keystile.middleware",
    "keystile.validation",
    "anyio",
    "argon2",
    "starlette",
    "asyncpg",
    "numpy",
)


def _loaded_by(*argv: str, cwd: Path) -> set[str]:
    """The modules ``keystile <argv>`` loaded, besides those the interpreter starts with."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stderr.split())


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(f"{h}.") for h in HEAVY)}


@pytest.mark.parametrize(
    "command", [[], ["create"], ["usage"], ["demo"], ["import"], ["import", "csv"]], ids=str
)
def test_help_imports_no_manager_store_or_framework(command: list[str], tmp_path: Path) -> None:
    """``keystile --help`` (and a command's ``--help``) imports none of the manager, the
    stores, the importers, anyio, argon2, starlette, asyncpg or numpy: the command's
    modules only."""
    loaded = _loaded_by(*command, "--help", cwd=tmp_path)
    assert _heavy(loaded) == set()
    assert "keystile.cli.keys" in loaded
    outside_the_command = {
        m for m in loaded if m.startswith("keystile") and not m.startswith("keystile.cli")
    }
    assert outside_the_command <= {"keystile.database_url", "keystile.durations", "keystile.errors"}
    assert "keystile.cli.session" not in loaded


def test_a_command_imports_the_manager_when_it_runs(tmp_path: Path) -> None:
    """``keystile init`` loads the manager, the stores and anyio: the probe above sees them."""
    loaded = _loaded_by("--database-url", f"sqlite:///{tmp_path / 'k.db'}", "init", cwd=tmp_path)
    assert {"keystile.manager", "keystile.stores", "anyio", "keystile.cli.session"} <= loaded
