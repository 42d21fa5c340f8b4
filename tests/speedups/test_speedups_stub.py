"""``_speedups.pyi`` describes the compiled module as it is, and ships with the package.

The stub is read with ``ast`` (never imported); the module is introspected: its public
names, its ``Table``'s methods, and the signatures ``inspect.signature`` reads from the
compiled docstrings (each opens with one). mypy's ``stubtest`` checks the same stub
against the same module its own way.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import keystile
from hitpaths import COMPILED_AVAILABLE

pytestmark = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")

if COMPILED_AVAILABLE:
    from keystile import _speedups

PACKAGE = Path(keystile.__file__).resolve().parent
STUB = PACKAGE / "_speedups.pyi"
ROOT = Path(__file__).resolve().parents[2]
_KINDS = inspect.Parameter


def definitions(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """The names a stub body defines: functions, classes, annotated and plain assignments."""
    found: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
        elif isinstance(node, ast.Assign):
            found.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return found


def public(names: Any) -> set[str]:
    return {name for name in names if not name.startswith("_")}


Parameters = list[tuple[str, inspect._ParameterKind]]


def stub_parameters(function: ast.FunctionDef) -> Parameters:
    args = function.args
    params: Parameters = [(a.arg, _KINDS.POSITIONAL_ONLY) for a in args.posonlyargs]
    params += [(a.arg, _KINDS.POSITIONAL_OR_KEYWORD) for a in args.args]
    if args.vararg is not None:
        params.append((args.vararg.arg, _KINDS.VAR_POSITIONAL))
    params += [(a.arg, _KINDS.KEYWORD_ONLY) for a in args.kwonlyargs]
    if args.kwarg is not None:
        params.append((args.kwarg.arg, _KINDS.VAR_KEYWORD))
    return params


def runtime_parameters(obj: Any) -> Parameters:
    return [(p.name, p.kind) for p in inspect.signature(obj).parameters.values()]


@pytest.fixture(scope="module")
def stub() -> dict[str, ast.stmt]:
    return definitions(ast.parse(STUB.read_text(encoding="utf-8")).body)


@pytest.fixture(scope="module")
def table_stub(stub: dict[str, ast.stmt]) -> dict[str, ast.stmt]:
    node = stub["Table"]
    assert isinstance(node, ast.ClassDef)
    return definitions(node.body)


def test_module_names_agree(stub: dict[str, ast.stmt]) -> None:
    """Every public name of the module is in the stub, and every one in the stub is in
    the module."""
    assert public(stub) == public(dir(_speedups))


def test_table_members_agree(table_stub: dict[str, ast.stmt]) -> None:
    """The stub's ``Table`` has exactly the methods of the compiled type, public and special."""
    runtime = set(vars(_speedups.Table)) - {"__doc__"}
    assert set(table_stub) == runtime


def test_function_signatures_agree(stub: dict[str, ast.stmt]) -> None:
    """Each module function takes the parameters the stub gives it, by name and kind."""
    functions = [n for n in stub.values() if isinstance(n, ast.FunctionDef)]
    assert functions
    for node in functions:
        assert stub_parameters(node) == runtime_parameters(getattr(_speedups, node.name)), node.name


def test_method_signatures_agree(table_stub: dict[str, ast.stmt]) -> None:
    """Each method of ``Table``, and its constructor, takes the parameters the stub gives
    it, by name and kind (positional-only where the C code reads them by position)."""
    for name, node in table_stub.items():
        if isinstance(node, ast.AnnAssign) or (
            isinstance(node, ast.FunctionDef) and _is_property(node)
        ):
            # An attribute: a member of the C type, not a method.
            assert inspect.isdatadescriptor(getattr(_speedups.Table, name)), name
            continue
        assert isinstance(node, ast.FunctionDef), name
        if name == "__new__":
            assert stub_parameters(node)[1:] == runtime_parameters(_speedups.Table)
        else:
            assert stub_parameters(node) == runtime_parameters(getattr(_speedups.Table, name)), name


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def test_constants_agree(stub: dict[str, ast.stmt]) -> None:
    """The stub's constants have the module's values."""
    node = stub["DIGEST_SIZE"]
    assert isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant)
    assert node.value.value == _speedups.DIGEST_SIZE == 32


def test_stubtest_passes(tmp_path: Path) -> None:
    """mypy's stubtest finds nothing in the stub that the module does not do."""
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nfollow_imports = skip\n")  # the stub alone, not the package
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "keystile._speedups", "--mypy-config-file", config],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(PACKAGE.parent)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_stub_is_package_data() -> None:
    """The wheel ships the stub beside ``py.typed``, so the package's users type-check
    against it."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "_speedups.pyi" in config["tool"]["setuptools"]["package-data"]["keystile"]
