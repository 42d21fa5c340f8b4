"""A package's public names, each imported from its module on first use (PEP 562).

``keystile/__init__.py`` calls :func:`attach` instead of defining ``__getattr__`` itself,
so that the package's namespace, as the API reference reads it, holds only its public
names.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["attach"]


def attach(namespace: MutableMapping[str, Any], modules: Mapping[str, str]) -> None:
    """Give the package whose globals are ``namespace`` a ``__getattr__`` that imports
    ``modules[name]`` (relative to the package) on first use of ``name``, and keeps the
    name in ``namespace`` (next time it is found without the call); and a ``__dir__``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        qualified = f"{package}.{module}"
        __import__(qualified)  # as an import statement does (-X importtime sees it)
        value = getattr(sys.modules[qualified], name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *modules})

    namespace["__getattr__"] = __getattr__
    namespace["__dir__"] = __dir__
