"""A package's public names, each imported from its module on first use (PEP 562).

``keystile/__init__.py`` calls :func:`attach` instead of defining ``__getattr__`` itself,
so that the package's namespace, as the API reference reads it, holds only its public
names.

A name that has left the package's public list stays importable from the package for a
while, from the module it lives in, with a ``DeprecationWarning`` that says where to import
it now. It is not kept in the namespace (each use warns) nor listed by ``dir()``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["attach"]


def attach(
    namespace: MutableMapping[str, Any],
    modules: Mapping[str, str],
    moved: Mapping[str, str] | None = None,
) -> None:
    """Give the package whose globals are ``namespace`` a ``__getattr__`` that imports
    ``modules[name]`` (relative to the package) on first use of ``name``, and keeps the
    name in ``namespace`` (next time it is found without the call); and a ``__dir__``.

    ``moved`` maps names no longer public here to the module (relative to the package)
    to import them from instead: they are still found, with a ``DeprecationWarning``.
    """
    package = namespace["__name__"]
    moved = moved or {}

    def load(name: str, module: str) -> Any:
        qualified = f"{package}.{module}"
        __import__(qualified)  # as an import statement does (-X importtime sees it)
        return getattr(sys.modules[qualified], name)

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is not None:
            value = load(name, module)
            namespace[name] = value
            return value
        module = moved.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # ``from package import name`` asks twice: importlib's ``hasattr`` (which would
        # blame importlib), then the import statement itself, which gets the warning.
        if sys._getframe(1).f_globals.get("__name__") != "importlib._bootstrap":
            _warn_moved(package, name, module)
        return load(name, module)

    def __dir__() -> list[str]:
        return sorted({*namespace, *modules})

    namespace["__getattr__"] = __getattr__
    namespace["__dir__"] = __dir__


def _warn_moved(package: str, name: str, module: str) -> None:
    warnings.warn(
        f"{package}.{name} is no longer a top-level name: "
        f"use 'from {package}.{module} import {name}' (the old import goes away "
        "in the next release)",
        DeprecationWarning,
        stacklevel=3,  # the line that uses the name, past __getattr__
    )
