"""Which cache-hit path runs: the compiled ``keystile._speedups`` or pure Python.

As MarkupSafe does with its ``_speedups``: the C extension is built when a compiler is
there (``setup.py``), and imported here once; without it, keystile runs the pure-Python
path, which stays beside it as the fallback and as the oracle the tests compare it with.

``KEYSTILE_PURE_PYTHON=1`` forces the pure-Python path. ``KEYSTILE_REQUIRE_SPEEDUPS=1``
makes importing keystile fail when the compiled path is not in use (CI sets it, so a
build that silently fell back is caught).
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["Table", "compiled_kernel"]

_FORCE_PURE = os.environ.get("KEYSTILE_PURE_PYTHON") == "1"
_REQUIRE = os.environ.get("KEYSTILE_REQUIRE_SPEEDUPS") == "1"

#: ``keystile._speedups.Table``, or ``None`` when the pure-Python path runs.
Table: type[_speedups.Table] | None = None
_kernel: Callable[[], str] | None = None

if not _FORCE_PURE:
    try:
        from . import _speedups
    except ImportError as exc:
        if _REQUIRE:
            raise ImportError(
                "KEYSTILE_REQUIRE_SPEEDUPS=1 but keystile._speedups cannot be imported "
                f"({exc}); reinstall keystile with a C compiler and the Python headers"
            ) from exc
    else:
        Table = _speedups.Table
        _kernel = _speedups.kernel
elif _REQUIRE:
    raise ImportError("KEYSTILE_REQUIRE_SPEEDUPS=1 and KEYSTILE_PURE_PYTHON=1 contradict")


def compiled_kernel() -> str | None:
    """The compiled scan kernel in use (``avx2``, ``sse2``, ``scalar``), ``None`` if pure."""
    return None if _kernel is None else _kernel()
