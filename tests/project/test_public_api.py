"""The public surface: ``keystile.__all__``, the names that left it, and the typing marker."""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import inspect
import subprocess
import sys
import warnings

import pytest

import keystile

#: What an app imports from ``keystile``, and nothing else, by topic: pinned, so that a name
#: joins or leaves the package's surface only by a change here (and in CHANGELOG.md).
PUBLIC = [
    *("APIKeyMiddleware", "KeystileConfig", "APIKeyUser", "revoke_presented", "charge"),
    *("KeyManager", "CreatedKey", "UNCHANGED", "KeyRecord", "KeyEvent"),
    *("UsageBucket", "UsageTotal", "store_from_url", "KeyStore", "MemoryKeyStore"),
    *("Argon2Parameters", "DEFAULT_PARAMETERS", "CHEAPEST_PARAMETERS"),
    *("KeystileError", "AuthenticationError", "ConfigurationError", "StoreError"),
    *("KeyManagementError", "KeyNotFound", "DuplicateKeyName"),
    *("InvalidKeyName", "KeyAlreadyRotated"),
    "verify",
]

#: The names that were public here before, and the module each is imported from now.
MOVED = {
    "IPAllowlist": "keystile.principal",
    "IPNotAllowed": "keystile.errors",
    "InsufficientScope": "keystile.errors",
    "InvalidRequest": "keystile.errors",
    "InvalidToken": "keystile.errors",
    "KeystileStats": "keystile.stats",
    "LimitEnforcer": "keystile.limits",
    "LimitPolicy": "keystile.limits",
    "MissingCredentials": "keystile.errors",
    "QuotaExceeded": "keystile.errors",
    "RateLimited": "keystile.errors",
    "RateLimiter": "keystile.limits",
    "SQLiteKeyStore": "keystile.stores",
    "SecretHasher": "keystile.hashing",
    "ServiceUnavailable": "keystile.errors",
    "TooManyRequests": "keystile.errors",
    "UsageRecorder": "keystile.usage",
    "VerifiedKeyCache": "keystile.cache",
    "Verifier": "keystile.verifier",
    "generate_key": "keystile.tokens",
    "parse_key": "keystile.tokens",
    "redact": "keystile.tokens",
}


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


def _attach_call() -> ast.Call:
    """The one ``_lazy.attach(...)`` call of ``keystile/__init__.py``."""
    tree = ast.parse(inspect.getsource(keystile))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "_lazy.attach"
    ]
    assert len(calls) == 1
    return calls[0]


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
    lazy = ast.literal_eval(_attach_call().args[1])
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


def test_all_is_the_pinned_list() -> None:
    """``keystile.__all__`` is exactly what an app imports (its order is ruff's, checked
    above)."""
    assert sorted(keystile.__all__) == sorted(PUBLIC)
    assert len(PUBLIC) == len(set(PUBLIC)) == 28


def test_moved_names_are_the_ones_the_package_still_finds() -> None:
    """The names that left ``__all__`` are those ``__init__.py`` still finds (with a
    warning), each from the module this test names; none is public any more."""
    found = ast.literal_eval(_attach_call().args[2])
    assert {name: f"keystile.{module}" for name, module in found.items()} == MOVED
    assert set(MOVED).isdisjoint(keystile.__all__)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_name_warns_and_names_its_module(name: str) -> None:
    """``from keystile import <moved name>`` still works for one release: the same object
    as from its module, with a DeprecationWarning saying where to import it now, at each
    use (the package does not keep it)."""
    module = importlib.import_module(MOVED[name])
    for _ in range(2):
        with pytest.warns(DeprecationWarning, match=rf"from {MOVED[name]} import {name}\b"):
            value = getattr(keystile, name)
        assert value is getattr(module, name)
    assert name not in vars(keystile)
    assert name not in dir(keystile)


def test_moved_name_warning_points_at_the_import() -> None:
    """The warning names the line that imports the moved name, not keystile's loader."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec("from keystile import Verifier", {"__name__": "an_app"})  # noqa: S102
    assert [w.category for w in caught] == [DeprecationWarning]
    assert caught[0].filename == "<string>"


def test_unknown_name_is_an_attribute_error() -> None:
    """A name keystile never had is an AttributeError (an ImportError on import), not a
    warning."""
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = keystile.no_such_name  # type: ignore[attr-defined]


def test_public_import_does_not_warn() -> None:
    """Importing every public name, in a fresh interpreter with warnings as errors, warns
    of nothing."""
    code = f"from keystile import {', '.join(PUBLIC)}"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
