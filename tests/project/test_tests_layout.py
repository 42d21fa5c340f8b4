"""The tests' own layout: one folder per part of ``src/keystile``, and no stale test path.

A test module lives in the folder ``docs/architecture.md`` ("Where a test goes") names for
the part it tests, never in ``tests/`` itself, which holds ``conftest.py`` and the helpers
the folders share. The folders are not packages, so pytest imports each test module by
its file name: two modules with one name would collide, and a readable failure here says
which. Every test path the docs, the sources and the benchmarks cite must exist, and so
must the test a ``path::name`` citation names.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
#: Where test paths are cited: ``tests/<folder>/test_x.py`` anywhere, ``<folder>/test_x.py``
#: (a node name under ``tests/``) in the security model's tables.
CITING = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "src").rglob("*.py")),
    *sorted((ROOT / "src").rglob("*.c")),
    *sorted((ROOT / "benchmarks").rglob("*.py")),
    *sorted((ROOT / "benchmarks").rglob("*.md")),
    *sorted(TESTS.rglob("*.py")),
    *sorted(TESTS.rglob("*.md")),
    ROOT / "pyproject.toml",
    ROOT / ".ci" / "run",
]
CITED = re.compile(r"(?<![\w/])(?:tests/)?([a-z]+)/(test_[a-z0-9_]+\.py)(?:::(\w+))?")


def all_test_modules() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def documented_folders() -> set[str]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text[text.index("## Where a test goes") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return set(re.findall(r"^\| `tests/([a-z]+)/` \|", section, re.M))


def test_every_test_module_sits_in_a_documented_folder() -> None:
    folders = documented_folders()
    assert {"verifier", "middleware", "stores", "adapters"} <= folders
    misplaced = [
        str(p.relative_to(TESTS))
        for p in all_test_modules()
        if p.parent.parent != TESTS or p.parent.name not in folders
    ]
    assert misplaced == []


def test_test_module_names_are_unique() -> None:
    counts = Counter(p.name for p in all_test_modules())
    assert [name for name, n in counts.items() if n > 1] == []


def test_no_folder_is_a_package() -> None:
    """An ``__init__.py`` would change how pytest names the modules and where it looks for
    the shared helpers."""
    assert sorted(str(p.relative_to(TESTS)) for p in TESTS.rglob("__init__.py")) == []


@functools.cache
def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def test_every_cited_test_path_exists() -> None:
    """``tests/<folder>/test_x.py`` and ``<folder>/test_x.py::test_y`` point at a real
    module and a real test."""
    cited = 0
    stale = []
    for source in CITING:
        if not source.is_file() or source == Path(__file__).resolve():
            continue
        for line_no, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            for folder, name, test in CITED.findall(line):
                cited += 1
                path = TESTS / folder / name
                where = f"{source.relative_to(ROOT)}:{line_no}: {folder}/{name}"
                if not path.is_file():
                    stale.append(where)
                elif test and test not in _defined_names(path):
                    stale.append(f"{where}::{test}")
    assert cited > 50
    assert stale == []


def test_the_citation_pattern_reads_both_forms() -> None:
    line = "`tests/verifier/test_cache.py` and `middleware/test_load.py::test_x[sqlite]`"
    assert CITED.findall(line) == [
        ("verifier", "test_cache.py", ""),
        ("middleware", "test_load.py", "test_x"),
    ]
