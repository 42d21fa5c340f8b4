"""The webhook tables' statements, shared by the SQL stores (rendered for a ``Dialect``),
and their rows read back as ``stores.hooks`` values.

A delivery is claimed by setting ``claimed_until`` (a lease) in the transaction that
selects it: on Postgres the select takes ``FOR UPDATE SKIP LOCKED``, so two processes
never claim one delivery; on SQLite ``BEGIN IMMEDIATE`` holds the database's write lock
for the whole claim. A lease that runs out (the process died mid-delivery) makes the
delivery claimable again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .hooks import REMOVED, Attempt, ClaimedDelivery, Delivery, Webhook, error_of, status_after
from .sql import COLUMNS, Dialect, Kind, Row, read

__all__ = ["HookStatements"]

#: ``Webhook``'s fields; ``events`` holds a JSON list of names (NULL: every event).
_WEBHOOK: dict[str, Kind] = {
    "id": "text",
    "url": "text",
    "secret": "text",
    "events": "text",
    "created_at": "time",
}
#: A new delivery's columns, then the ones its attempts change (``Delivery``'s fields).
_NEW_DELIVERY: dict[str, Kind] = {
    "id": "text",
    "webhook_id": "text",
    "type": "text",
    "payload": "text",
    "created_at": "time",
    "next_attempt_at": "time",
}
_DELIVERY: dict[str, Kind] = {
    **_NEW_DELIVERY,
    "attempts": "int",
    "status": "text",
    "last_error": "text",
}
#: ``Attempt``'s fields.
_ATTEMPT: dict[str, Kind] = {
    "delivery_id": "text",
    "at": "time",
    "status_code": "int",
    "error": "text",
    "outcome": "text",
}


class HookStatements:
    """The statements, for one dialect; ``prefix`` qualifies the tables."""

    def __init__(self, dialect: Dialect, prefix: str = "", *, skip_locked: bool = False) -> None:
        self.dialect = d = dialect
        hooks = f"{prefix}keystile_webhooks"
        deliveries = f"{prefix}keystile_deliveries"
        attempts = f"{prefix}keystile_delivery_attempts"
        self.keys = f"{prefix}keystile_keys"
        r = dialect.render
        t = d.param
        self.expiring = r(
            f"SELECT {COLUMNS} FROM {self.keys} WHERE revoked_at IS NULL"  # noqa: S608
            f" AND expires_at > {t(1, 'time')} AND expires_at <= {t(2, 'time')}"
        )
        self.insert_webhook = d.insert(hooks, _WEBHOOK)
        self.webhooks = f"SELECT {', '.join(_WEBHOOK)} FROM {hooks} ORDER BY created_at, id"  # noqa: S608
        self.delete_webhook = r(f"DELETE FROM {hooks} WHERE id = $1")  # noqa: S608
        self.abandon = r(
            f"UPDATE {deliveries} SET status = 'dead', last_error = '{REMOVED}'"  # noqa: S608
            " WHERE webhook_id = $1 AND status = 'pending'"
        )
        self.insert_delivery = d.insert(deliveries, _NEW_DELIVERY) + " ON CONFLICT (id) DO NOTHING"
        lock = " FOR UPDATE OF d SKIP LOCKED" if skip_locked else ""
        columns = ", ".join(f"d.{c}" for c in _DELIVERY)
        self.due = r(
            f"SELECT {columns}, w.url, w.secret FROM {deliveries} d"  # noqa: S608
            f" JOIN {hooks} w ON w.id = d.webhook_id"
            f" WHERE d.status = 'pending' AND d.next_attempt_at <= {t(1, 'time')}"
            " AND (d.claimed_until IS NULL OR d.claimed_until <= $1)"
            f" ORDER BY d.next_attempt_at, d.id LIMIT $2{lock}"
        )
        self.claim = r(
            f"UPDATE {deliveries} SET claimed_until = {t(1, 'time')} WHERE id = $2"  # noqa: S608
        )
        self.finish = r(
            f"UPDATE {deliveries} SET attempts = attempts + 1, status = $1,"  # noqa: S608
            f" next_attempt_at = COALESCE({t(2, 'time')}, next_attempt_at),"
            " last_error = $3, claimed_until = NULL WHERE id = $4"
        )
        self.insert_attempt = d.insert(attempts, _ATTEMPT)
        select = f"SELECT {', '.join(_DELIVERY)} FROM {deliveries}"  # noqa: S608
        order = "ORDER BY created_at DESC, id DESC LIMIT"
        self.deliveries = r(f"{select} {order} $1")
        self.webhook_deliveries = r(f"{select} WHERE webhook_id = $1 {order} $2")
        attempt_columns = ", ".join(_ATTEMPT)
        self.attempts = f"SELECT {attempt_columns} FROM {attempts} ORDER BY {d.seq}"  # noqa: S608
        self.delivery_attempts = r(
            f"SELECT {attempt_columns} FROM {attempts}"  # noqa: S608
            f" WHERE delivery_id = $1 ORDER BY {d.seq}"
        )
        self._delivery_readers = d.readers(_DELIVERY)
        self._attempt_readers = d.readers(_ATTEMPT)

    # -- values in and out -----------------------------------------------------------

    def webhook_values(self, hook: Webhook) -> list[Any]:
        events = None if hook.events is None else json.dumps(list(hook.events))
        return [hook.id, hook.url, hook.secret, events, self._time(hook.created_at)]

    def webhook(self, row: Row) -> Webhook:
        events = row["events"]
        return Webhook(
            row["id"],
            row["url"],
            row["secret"],
            None if events is None else tuple(json.loads(events)),
            self.dialect.decode("time", row["created_at"]),
        )

    def delivery_values(self, delivery: Delivery) -> list[Any]:
        return self.dialect.values(_NEW_DELIVERY, delivery)

    def delivery(self, row: Row) -> Delivery:
        return Delivery(*read(row, self._delivery_readers))

    def claimed(self, row: Row) -> ClaimedDelivery:
        return ClaimedDelivery(self.delivery(row), row["url"], row["secret"])

    def finish_values(self, attempt: Attempt, next_attempt_at: Any) -> list[Any]:
        return [
            status_after(attempt),
            self._time(next_attempt_at),
            error_of(attempt),
            attempt.delivery_id,
        ]

    def attempt_values(self, attempt: Attempt) -> list[Any]:
        return self.dialect.values(_ATTEMPT, attempt)

    def attempt(self, row: Row) -> Attempt:
        return Attempt(*read(row, self._attempt_readers))

    def _time(self, value: Any) -> Any:
        return None if value is None else self.dialect.encode("time", value)


def ids_and_names(rows: Sequence[Row]) -> dict[str, str]:
    return {row["id"]: row["name"] for row in rows}
