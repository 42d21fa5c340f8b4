"""``sqlite:///path``: the embedded default store (see ``SQLiteKeyStore``)."""

from __future__ import annotations

from .connection import DEFAULT_POLL_INTERVAL
from .store import SQLiteKeyStore
from .watch import CHANGE_LOG_RETENTION

__all__ = ["CHANGE_LOG_RETENTION", "DEFAULT_POLL_INTERVAL", "SQLiteKeyStore"]
