"""CSRF tokens of the admin page: bound to the actor, signed, short-lived.

A token is ``<issued>.<mac>``: ``issued`` the Unix time it was made, ``mac`` the
HMAC-SHA256, under a secret of the app's (or of this process), of the actor that
``authorize`` returned and that time. Every form carries one; a POST is done only when its
token is the actor's own (compared in constant time) and younger than ``ttl``. Another
site can make a browser send a POST with the operator's cookies, but cannot read a page
of the admin (the same-origin policy), so it has no token for that operator; a token
leaked from one operator's page is worthless to another, and ages out.

keystile keeps no session: nothing is stored, the token carries its time, and the actor
is asked of ``authorize`` on every request. With several processes, give each the same
``secret`` (a token made by one is checked by another).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

__all__ = ["DEFAULT_CSRF_TTL", "CSRFTokens"]

#: Seconds a form's token is good for: an operator filling in a form has an hour.
DEFAULT_CSRF_TTL = 3600.0


class CSRFTokens:
    """Make and check the tokens (see the module docstring)."""

    __slots__ = ("_clock", "_secret", "ttl")

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        ttl: float = DEFAULT_CSRF_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("the CSRF secret must be at least 16 bytes")
        self._secret = secret or secrets.token_bytes(32)
        self.ttl = ttl
        self._clock = clock

    def _mac(self, actor: str, issued: int) -> str:
        message = f"{issued}\x1f{actor}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def make(self, actor: str) -> str:
        issued = int(self._clock())
        return f"{issued}.{self._mac(actor, issued)}"

    def check(self, actor: str, token: str | None) -> bool:
        """Whether ``token`` was made for ``actor`` by this secret, less than ``ttl`` ago."""
        if not token or token.count(".") != 1:
            return False
        issued_text, mac = token.split(".")
        if not issued_text.isdigit() or len(issued_text) > 12:
            return False
        issued = int(issued_text)
        if not 0 <= self._clock() - issued <= self.ttl:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(actor, issued).encode())
