"""A WebSocket lives only as long as the key it was opened with.

The key is verified when the socket opens, and a socket may then stay open for days. So
every message after that, in either direction, checks the key again: one revoked,
disabled or expired since closes the socket with 1008 (``invalid_token``) at its next
message once the change has reached this process. Changes arrive as they do for HTTP:
the store's in-process bus, Postgres ``NOTIFY`` or SQLite's change log all end in
``Verifier.on_change``, which evicts the key and so records the cache epoch of the
change.

The check costs O(1) and reads no store while the state in hand is current: no eviction
of the key since it was taken (``VerifiedKeyCache.changed_since``, a dict lookup), taken
less than ``cache_ttl`` ago, and ``expires_at`` still ahead. Otherwise the state is taken
from the key's cache entry when that is fresh, else read from the store: a key that left
the cache because it was idle or the cache full is still valid, and its socket stays.

A store that cannot be read keeps the socket open as it keeps a cached key working over
HTTP: while the state is less than ``cache_ttl + stale_if_error`` old and no change of
the key was heard. Past that, or when a change was heard and cannot be read, the socket
is closed with 1013 (try again later): keystile cannot tell that the key is still valid.

A refused message is not delivered: the app receives ``websocket.disconnect`` instead,
and a ``websocket.send`` raises :class:`SocketClosedByKeystile` (an ``OSError``, as a
server raises for a closed connection; Starlette turns it into ``WebSocketDisconnect``).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timezone

from starlette.types import Message, Receive, Send

from .cache import CachedKey
from .errors import AuthenticationError, InvalidToken, ServiceUnavailable, StoreError
from .principal import APIKeyUser
from .responses import WEBSOCKET_POLICY_VIOLATION, WEBSOCKET_TRY_AGAIN_LATER, error_code
from .verifier import STALE_RETRY_INTERVAL, Verifier

__all__ = ["KeyWatch", "SocketClosedByKeystile", "guard_websocket"]

logger = logging.getLogger("keystile")

#: Store reads of a key whose state keeps changing meanwhile, before the last one is used.
_SETTLE_ATTEMPTS = 3


class SocketClosedByKeystile(OSError):
    """The app sent on a WebSocket keystile closed because its key is no longer valid."""


class KeyWatch:
    """The state of one socket's key: what the check on each message compares."""

    __slots__ = ("_checked_at", "_epoch", "_expires_at", "_failed_at", "_verifier", "key_id")

    def __init__(self, verifier: Verifier, user: APIKeyUser) -> None:
        self._verifier = verifier
        self.key_id = user.key_id
        cache = verifier.cache
        entry = cache.get(user.key_id)
        # The key still cached with this principal is current as of now; one that left the
        # cache (or was replaced) meanwhile may predate a change: its state is looked at
        # again at the first message.
        if entry is not None and entry.user is user:
            self._expires_at = entry.expires_at
            self._checked_at = entry.checked_at
            self._epoch = cache.epoch
        else:
            expires_at = user.expires_at
            self._expires_at = expires_at.timestamp() if expires_at is not None else None
            self._checked_at = float("-inf")
            self._epoch = -1
        self._failed_at = float("-inf")

    async def refusal(self) -> AuthenticationError | None:
        """Why the socket must close now, or ``None`` while its key is valid."""
        verifier = self._verifier
        if (
            verifier.cache.changed_since(self.key_id, self._epoch)
            or verifier.monotonic() - self._checked_at > verifier.cache_ttl
        ):
            refused = await self._look_again()
            if refused is not None:
                return refused
        expires_at = self._expires_at
        if expires_at is not None and verifier.clock() >= expires_at:
            return InvalidToken("expired")
        return None

    async def _look_again(self) -> AuthenticationError | None:
        """Take the key's state from a fresh cache entry, else from the store."""
        verifier = self._verifier
        cache = verifier.cache
        now = verifier.monotonic()
        entry = cache.get(self.key_id)
        if entry is not None and now - entry.checked_at <= verifier.cache_ttl:
            self._take(entry.expires_at, entry.checked_at, cache.epoch)
            return None
        heard = cache.changed_since(self.key_id, self._epoch)
        servable = not heard and now - self._checked_at <= (
            verifier.cache_ttl + verifier.stale_if_error
        )
        if servable and now - self._failed_at < STALE_RETRY_INTERVAL:
            verifier.counters.stale_served += 1
            return None
        try:
            for _ in range(_SETTLE_ATTEMPTS):
                epoch = cache.epoch
                record = await verifier.store.get(self.key_id)
                if not cache.changed_since(self.key_id, epoch):
                    break
        except Exception as exc:
            if servable and isinstance(exc, StoreError):
                self._failed_at = now
                verifier.counters.stale_served += 1
                return None
            logger.warning(
                "keystile: cannot read the state of key %s for its open WebSocket (%s: %s); "
                "closing it",
                self.key_id,
                type(exc).__name__,
                exc,
            )
            return ServiceUnavailable("store_unavailable")
        verifier.counters.state_refreshes += 1
        status = "unknown"
        if record is not None:
            status = record.status(datetime.fromtimestamp(verifier.clock(), timezone.utc))
        if status != "active":
            return InvalidToken(status)
        assert record is not None
        expires_at = record.expires_at.timestamp() if record.expires_at is not None else None
        fresh = CachedKey(APIKeyUser.from_record(record), expires_at, now)
        if entry is not None:
            # The other sockets and requests of this key need not read it again (refused,
            # as a refresh is, if the key changed since ``epoch``).
            cache.replace_state(fresh, epoch=epoch)
        self._take(expires_at, now, epoch)
        return None

    def _take(self, expires_at: float | None, checked_at: float, epoch: int) -> None:
        self._expires_at = expires_at
        self._checked_at = checked_at
        self._epoch = epoch
        self._failed_at = float("-inf")


def guard_websocket(
    verifier: Verifier, user: APIKeyUser, receive: Receive, send: Send
) -> tuple[Receive, Send]:
    """``receive`` and ``send`` of a WebSocket opened with ``user``'s key, checking the
    key at each message and closing the socket once it is no longer valid."""
    watch = KeyWatch(verifier, user)
    closed: list[Message] = []

    async def close(refused: AuthenticationError) -> Message:
        """Close the socket once (a concurrent send and receive may both refuse)."""
        if not closed:
            verifier.counters.rejects[refused.reason] += 1
            unavailable = isinstance(refused, ServiceUnavailable)
            code = WEBSOCKET_TRY_AGAIN_LATER if unavailable else WEBSOCKET_POLICY_VIOLATION
            reason = error_code(refused)
            closed.append({"type": "websocket.disconnect", "code": code, "reason": reason})
            with contextlib.suppress(OSError):  # the client is gone already: closed all the same
                await send({"type": "websocket.close", "code": code, "reason": reason})
        return closed[0]

    async def guarded_receive() -> Message:
        if closed:
            return closed[0]
        message = await receive()
        if message["type"] == "websocket.receive" and not closed:
            refused = await watch.refusal()
            if refused is not None:
                return await close(refused)
        return closed[0] if closed else message

    async def guarded_send(message: Message) -> None:
        if not closed and message["type"] == "websocket.send":
            refused = await watch.refusal()
            if refused is not None:
                await close(refused)
        if closed:
            if message["type"] == "websocket.send":
                raise SocketClosedByKeystile("keystile closed this WebSocket: its key is not valid")
            return  # the app's own close, after keystile's
        await send(message)

    return guarded_receive, guarded_send
