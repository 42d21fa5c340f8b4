"""``PostgresKeyStore``, put together from its parts."""

from __future__ import annotations

from .events import Events
from .hooks import Hooks
from .keys import Keys
from .owners import Owners
from .usage import Usage
from .watch import Watch

__all__ = ["PostgresKeyStore"]


class PostgresKeyStore(Keys, Events, Owners, Usage, Watch, Hooks):
    """``postgresql://…``: the production store, an asyncpg pool shared by many processes.

    Every lifecycle change is one transaction that also runs ``pg_notify`` on a channel
    of its own schema (``watch``). Values only ever travel as ``$n`` parameters.

    Its parts, one concern each: ``connection`` (the URL, the pool, errors and retries),
    ``schema`` (migrations, schema names, how values are stored), ``keys``, ``events``,
    ``owners`` (owner limits), ``usage``, ``watch`` (NOTIFY and the LISTEN connection),
    ``hooks`` (webhooks and their outbox)."""
