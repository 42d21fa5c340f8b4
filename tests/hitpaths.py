"""The two cache-hit paths, for tests that must hold on both.

``compiled`` is ``keystile._speedups``: its ``Table`` holds the digests and serves the whole
hit path (header walk, BLAKE2b, scan) in one call. ``pure`` is the pure-Python table
(``keystile.cache.PyTable`` and the tag scan of ``keystile.tagscan``), the fallback and
the oracle. Both run in one process: ``keystile._accel.Table`` is what a new
``VerifiedKeyCache`` consults when it is not told which table to use, so setting it to
``None`` for the length of a test makes every cache (and so every verifier and
middleware) built in the test pure, at no cost to the production path.

Tests take the path from the ``hit_path`` fixture of ``conftest.py`` (parametrized over
``HIT_PATHS``): ``pytestmark = pytest.mark.usefixtures("hit_path")`` runs a whole module
on both, an argument ``hit_path: str`` one test. ``compiled`` is skipped only where the
extension is not in use (not built, or ``KEYSTILE_PURE_PYTHON=1``); under
``KEYSTILE_REQUIRE_SPEEDUPS=1`` a missing extension already fails ``import keystile``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keystile import _accel

COMPILED_AVAILABLE = _accel.Table is not None
COMPILED_ONLY = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")
HIT_PATHS = [pytest.param("compiled", marks=COMPILED_ONLY), "pure"]


@contextmanager
def using(name: str) -> Iterator[None]:
    """Caches made inside use the ``name`` hit path (``compiled`` or ``pure``)."""
    if name not in ("compiled", "pure"):
        raise ValueError(f"no hit path {name!r}")
    saved = _accel.Table
    if name == "pure":
        _accel.Table = None
    try:
        yield
    finally:
        _accel.Table = saved
