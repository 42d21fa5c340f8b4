"""The names ``keystile.stores.base`` has always offered, kept importable.

They live in smaller modules now: the values in ``records`` (``KeyRecord``, ``KeyEvent``,
``QuotaState``, ``UsageBucket``, ``UsageTotal``, ``UsageCounts``, ``utcnow``), the
contract in ``protocol`` (``KeyStore``, ``ChangeListener``), the rules every store keeps
in ``rules`` (``apply_uses``, ``check_updatable``, the event details, ``revoked_error``,
``update_action``, ``UPDATABLE_FIELDS``, ``LIMIT_FIELDS``, ``EVENT_ACTIONS``,
``SYSTEM_ACTOR``) and the in-process change bus in ``bus`` (``LocalChangeBus``). New code
imports from those; nothing in keystile imports this module.
"""

from __future__ import annotations

from .bus import LocalChangeBus
from .protocol import ChangeListener, KeyStore
from .records import (
    KeyEvent,
    KeyRecord,
    QuotaState,
    UsageBucket,
    UsageCounts,
    UsageTotal,
    utcnow,
)
from .rules import (
    EVENT_ACTIONS,
    LIMIT_FIELDS,
    SYSTEM_ACTOR,
    UPDATABLE_FIELDS,
    apply_uses,
    check_updatable,
    created_detail,
    event_detail,
    pruned_detail,
    reaped_detail,
    revoked_error,
    rotated_detail,
    update_action,
)

__all__ = [
    "EVENT_ACTIONS",
    "LIMIT_FIELDS",
    "SYSTEM_ACTOR",
    "UPDATABLE_FIELDS",
    "ChangeListener",
    "KeyEvent",
    "KeyRecord",
    "KeyStore",
    "LocalChangeBus",
    "QuotaState",
    "UsageBucket",
    "UsageCounts",
    "UsageTotal",
    "apply_uses",
    "check_updatable",
    "created_detail",
    "event_detail",
    "pruned_detail",
    "reaped_detail",
    "revoked_error",
    "rotated_detail",
    "update_action",
    "utcnow",
]
