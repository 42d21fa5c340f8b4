"""The two cache-hit paths, for tests that must hold on both.

``compiled`` is ``keystile._speedups`` (skipped where it is not built, or under
``KEYSTILE_PURE_PYTHON=1``); ``pure`` is the pure-Python path, forced for the caches made
inside ``hit_path("pure")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keystile import _accel

COMPILED_AVAILABLE = _accel.Table is not None
HIT_PATHS = [
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use"),
    ),
    "pure",
]


@contextmanager
def hit_path(name: str) -> Iterator[None]:
    """Caches made inside use the ``name`` hit path (``compiled`` or ``pure``)."""
    saved = _accel.Table
    if name == "pure":
        _accel.Table = None
    try:
        yield
    finally:
        _accel.Table = saved
