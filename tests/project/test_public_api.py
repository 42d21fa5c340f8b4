"""The public surface: ``keystile.__all__`` and the typing marker."""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import inspect

import keystile


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """The module's statements, those under its ``if TYPE_CHECKING:`` block included
    (where the public names are imported for type checkers; at run time on first use)."""
    nodes: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "_typing.TYPE_CHECKING":
            nodes.extend(node.body)
        else:
            nodes.append(node)
    return nodes


def _public_names_in_init() -> set[str]:
    """Names ``keystile/__init__.py`` imports or assigns at module level, minus private ones."""
    tree = ast.parse(inspect.getsource(keystile))
    names: set[str] = set()
    for node in _top_level(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return {n for n in names if not n.startswith("_") and n != "annotations"}


def _isort_style_key(name: str) -> tuple[int, str]:
    """ruff RUF022's order: SCREAMING_CASE, then CamelCase, then the rest, each sorted."""
    if name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    return group, name


def test_all_is_sorted() -> None:
    """``__all__`` is in ruff's isort-style order (constants, classes, functions)."""
    assert keystile.__all__ == sorted(keystile.__all__, key=_isort_style_key)


def test_all_has_no_duplicates() -> None:
    """No name is listed twice in ``__all__``."""
    assert len(set(keystile.__all__)) == len(keystile.__all__)


def test_all_matches_public_names() -> None:
    """``__all__`` lists exactly the public names ``keystile/__init__.py`` defines or imports."""
    assert set(keystile.__all__) == _public_names_in_init()


def test_each_public_name_comes_from_the_module_it_is_imported_from() -> None:
    """The names imported on first use are ``__all__``, each from the module whose import
    type checkers read."""
    tree = ast.parse(inspect.getsource(keystile))
    imported = {
        alias.asname or alias.name: node.module
        for node in _top_level(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "_lazy.attach"
    ]
    assert len(calls) == 1
    lazy = ast.literal_eval(calls[0].args[1])
    assert lazy == imported
    assert set(lazy) == set(keystile.__all__)


def test_no_unlisted_public_attribute() -> None:
    """Every public non-module attribute of the package is listed in ``__all__``."""
    unlisted = {
        name
        for name, value in vars(keystile).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    } - set(keystile.__all__)
    assert unlisted == set()


def test_every_name_in_all_is_importable() -> None:
    """``from keystile import <name>`` works for every name in ``__all__``."""
    module = importlib.import_module("keystile")
    for name in keystile.__all__:
        assert getattr(module, name) is not None, name


def test_star_import_exports_all() -> None:
    """``from keystile import *`` binds exactly ``__all__``."""
    namespace: dict[str, object] = {}
    exec("from keystile import *", namespace)  # noqa: S102
    namespace.pop("__builtins__")
    assert set(namespace) == set(keystile.__all__)


def test_version_is_a_string() -> None:
    """``keystile.__version__`` is a non-empty string."""
    assert isinstance(keystile.__version__, str) and keystile.__version__


def test_py_typed_is_shipped() -> None:
    """The package carries the PEP 561 ``py.typed`` marker."""
    assert importlib.resources.files("keystile").joinpath("py.typed").is_file()
