"""What a verified report says, and what is done about each token in it.

A token counts as a keystile key (``true_positive``) only when its secret verifies
against the stored hash: a string shaped like a key, with a real key id and a made-up
secret, is a ``false_positive`` and changes nothing, so nobody can get someone else's key
revoked by committing its public id. Every key found gets a ``leaked`` audit event (actor
``github:secret-scanning``, the report's url, source and type in its detail), whatever
the action.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread

from ..errors import InvalidToken, KeyManagementError, ReportRefused
from ..manager import KeyManager
from ..stores.records import KeyEvent, KeyRecord, utcnow
from ..stores.rules import is_imported
from ..tokens import parse_key

__all__ = ["ACTIONS", "SCANNING_ACTOR", "Action", "Finding", "act_on", "parse_report"]

#: Who the audit log names for what the endpoint does.
SCANNING_ACTOR = "github:secret-scanning"
Action = Literal["revoke", "disable", "report"]
ACTIONS: tuple[Action, ...] = ("revoke", "disable", "report")
#: The longest url, source or type kept in an event's detail.
MAX_FIELD = 2048


@dataclass(frozen=True, slots=True)
class Finding:
    """One token of a report: what GitHub saw and where."""

    token: str
    type: str
    url: str
    source: str

    @property
    def token_hash(self) -> str:
        return hashlib.sha256(self.token.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Finding(token_hash={self.token_hash[:12]}…, type={self.type!r}, url={self.url!r})"


def _text(item: dict[str, Any], name: str) -> str:
    value = item.get(name, "")
    if not isinstance(value, str):
        raise ReportRefused("malformed", 400, f"each report's {name!r} must be a string")
    return value[:MAX_FIELD]


def parse_report(body: bytes, max_tokens: int) -> list[Finding]:
    """The findings of a report body: a JSON array of ``{token, type, url, source}``."""
    try:
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReportRefused("malformed", 400, "the body is not JSON") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ReportRefused("malformed", 400, "the body must be a JSON array of objects")
    if len(items) > max_tokens:
        raise ReportRefused(
            "too_many_tokens", 413, f"a report may carry at most {max_tokens} tokens"
        )
    findings = []
    for item in items:
        token = item.get("token")
        if not isinstance(token, str) or not token:
            raise ReportRefused("malformed", 400, "each report needs a non-empty 'token'")
        findings.append(
            Finding(token, _text(item, "type"), _text(item, "url"), _text(item, "source"))
        )
    return findings


async def _genuine(manager: KeyManager, token: str) -> KeyRecord | None:
    """The key ``token`` is, if it is one: its shape, its checksum and its secret."""
    try:
        parsed = parse_key(token)
    except InvalidToken:
        return None
    record = await manager.store.get(parsed.key_id)
    if record is None or is_imported(record) or record.prefix != parsed.prefix:
        return None
    matched, _ = await anyio.to_thread.run_sync(
        manager.hasher.verify, record.secret_hash, parsed.secret
    )
    return record if matched else None


async def _apply(manager: KeyManager, record: KeyRecord, action: Action) -> str:
    """What ``action`` did to ``record``: ``revoked``, ``disabled``, ``reported``, or
    ``already revoked``/``already disabled``."""
    if record.revoked_at is not None:
        return "already revoked"
    if action == "revoke":
        await manager.revoke(record.id, owner=record.owner, actor=SCANNING_ACTOR)
        return "revoked"
    if action == "disable":
        if record.disabled_at is not None:
            return "already disabled"
        try:
            await manager.disable(record.id, owner=record.owner, actor=SCANNING_ACTOR)
        except KeyManagementError:  # revoked meanwhile
            return "already revoked"
        return "disabled"
    return "reported"


async def act_on(
    manager: KeyManager, findings: list[Finding], action: Action
) -> list[dict[str, str]]:
    """Act on each finding; GitHub's feedback: ``token_hash``, ``token_type``, ``label``."""
    feedback = []
    done: dict[str, bool] = {}
    for finding in findings:
        digest = finding.token_hash
        if digest not in done:
            record = await _genuine(manager, finding.token)
            if record is not None:
                outcome = await _apply(manager, record, action)
                detail = {
                    "url": finding.url,
                    "source": finding.source,
                    "type": finding.type,
                    "action": outcome,
                }
                event = KeyEvent(
                    utcnow(), record.id, record.owner, "leaked", SCANNING_ACTOR, detail
                )
                await manager.store.record_event(event)
            done[digest] = record is not None
        label = "true_positive" if done[digest] else "false_positive"
        feedback.append({"token_hash": digest, "token_type": finding.type, "label": label})
    return feedback
