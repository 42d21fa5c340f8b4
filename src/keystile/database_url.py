"""Where the database URL comes from, in the same order for the middleware and the CLI: an
explicit URL, then ``KEYSTILE_DATABASE_URL``, then ``sqlite:///keystile.db``.

A module of its own, importing nothing, so that ``keystile --help`` can name the default
without loading the middleware's configuration.
"""

from __future__ import annotations

import os

__all__ = ["DATABASE_URL_ENV", "DEFAULT_DATABASE_URL", "resolve_database_url"]

DATABASE_URL_ENV = "KEYSTILE_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///keystile.db"


def resolve_database_url(explicit: str | None = None) -> str:
    """An explicit URL beats ``KEYSTILE_DATABASE_URL``, which beats ``sqlite:///keystile.db``."""
    return explicit or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL
