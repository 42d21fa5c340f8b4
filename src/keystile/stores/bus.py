"""The in-process change bus: a store tells every listener of its database in this
process, at once, which key changed state."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from .protocol import ChangeListener

__all__ = ["LocalChangeBus"]


class LocalChangeBus:
    """Fan-out of key state changes to the listeners of one database in this process.

    Stores of the same database share one bus (by ``identity``), so a ``KeyManager`` and
    an ``APIKeyMiddleware`` built separately from the same URL still see each other's
    revocations at once. A listener is called on the thread and event loop it
    subscribed from.
    """

    _buses: dict[str, LocalChangeBus] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._listeners: dict[int, tuple[ChangeListener, asyncio.AbstractEventLoop | None]] = {}
        self._next = 0

    @classmethod
    def for_identity(cls, identity: str) -> LocalChangeBus:
        with cls._lock:
            bus = cls._buses.get(identity)
            if bus is None:
                bus = cls._buses[identity] = cls()
            return bus

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            token = self._next
            self._next += 1
            self._listeners[token] = (listener, loop)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(token, None)

        return unsubscribe

    def publish(self, key_id: str | None) -> None:
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        with self._lock:
            listeners = list(self._listeners.values())
        for listener, loop in listeners:
            # A loop that no longer runs (closed, or left behind by its runner) would never
            # deliver a queued revocation: call the listener here instead.
            if loop is None or loop is current or not loop.is_running():
                listener(key_id)
            else:
                loop.call_soon_threadsafe(listener, key_id)
