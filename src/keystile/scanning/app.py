"""``secret_scanning_app``: the ASGI endpoint GitHub's secret scanning partner program
posts leaked keys to.

::

    app.mount("/.well-known/secret-scanning",
              secret_scanning_app(database_url="postgresql://…", action="revoke"))

A POST is read up to ``max_body`` bytes (a longer body: 413, unread), its signature is
verified over the raw bytes before anything else is looked at (missing or wrong: 401),
then each reported token is acted on (:mod:`.reports`) and the answer is GitHub's
feedback format. A refusal changes nothing and is a JSON error with a reason code; an
unexpected failure (the store down) is a 503, never a 500.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..errors import ConfigurationError, ReportRefused
from ..manager import KeyManager
from ..responses import report_refusal
from .reports import ACTIONS, Action, act_on, parse_report
from .signatures import GITHUB_KEYS_URL, PublicKeys

__all__ = ["SecretScanningApp", "secret_scanning_app"]

logger = logging.getLogger("keystile.scanning")

Scope = dict[str, Any]
Receive = Any
Send = Any

#: A report body longer than this is refused unread (GitHub's reports are far smaller).
DEFAULT_MAX_BODY = 1024 * 1024
#: The most tokens one report may carry.
DEFAULT_MAX_TOKENS = 1000

_KEY_ID_HEADER = b"github-public-key-identifier"
_SIGNATURE_HEADER = b"github-public-key-signature"


@dataclass(eq=False)
class SecretScanningApp:
    """The endpoint; built by :func:`secret_scanning_app`. ``aclose()`` closes a manager
    it opened itself."""

    manager: KeyManager
    keys: PublicKeys
    action: Action
    owns_manager: bool
    max_body: int
    max_tokens: int
    _opened: bool = field(default=False, init=False)
    _open_lock: anyio.Lock = field(default_factory=anyio.Lock, init=False)

    def __post_init__(self) -> None:
        self._opened = not self.owns_manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            feedback = await self._handle(scope, receive)
        except ReportRefused as exc:
            logger.warning("secret-scanning report refused: %s", exc.reason)
            await report_refusal(exc)(scope, receive, send)
            return
        except Exception as exc:  # the store down, or a bug: GitHub retries a 503
            logger.error("secret-scanning report not processed: %s", type(exc).__name__)
            refusal = ReportRefused("unavailable", 503, "the key store could not be reached")
            await report_refusal(refusal)(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        await JSONResponse(feedback)(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive) -> list[dict[str, str]]:
        if scope["method"] != "POST":
            raise ReportRefused("method_not_allowed", 405, "reports are POSTed")
        headers = dict(scope["headers"])
        body = await self._body(headers, receive)
        key_id = headers.get(_KEY_ID_HEADER, b"").decode("latin-1") or None
        signature = headers.get(_SIGNATURE_HEADER, b"").decode("latin-1") or None
        await self.keys.verify(body, key_id, signature)
        findings = parse_report(body, self.max_tokens)
        await self._open()
        return await act_on(self.manager, findings, self.action)

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        too_large = ReportRefused("too_large", 413, f"a report is at most {self.max_body} bytes")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ReportRefused("malformed", 400, "the client went away")
            body += message.get("body", b"")
            if len(body) > self.max_body:
                raise too_large
            if not message.get("more_body", False):
                return bytes(body)

    async def _open(self) -> None:
        if self._opened:
            return
        async with self._open_lock:
            if not self._opened:
                await self.manager.open()
                self._opened = True

    async def aclose(self) -> None:
        if self.owns_manager and self._opened:
            self._opened = False
            await self.manager.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def secret_scanning_app(
    *,
    database_url: str | None = None,
    manager: KeyManager | None = None,
    action: Action = "revoke",
    public_keys: dict[str, str | bytes] | None = None,
    keys_url: str | None = GITHUB_KEYS_URL,
    max_body: int = DEFAULT_MAX_BODY,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    refetch_interval: float = 60.0,
) -> SecretScanningApp:
    """The endpoint for GitHub's secret-scanning reports, on the keys of ``manager`` (or a
    manager on ``database_url``; neither: ``KEYSTILE_DATABASE_URL`` or the default).

    ``action``: ``"revoke"`` (the default), ``"disable"`` or ``"report"`` (audit only).
    ``public_keys={identifier: pem}`` gives GitHub's keys instead of fetching them (then
    nothing is fetched unless ``keys_url`` is given too); ``keys_url`` is where they are
    read from, GitHub's by default. Needs the ``scanning`` extra (cryptography, httpx).
    """
    if action not in ACTIONS:
        raise ConfigurationError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if max_body < 1 or max_tokens < 1:
        raise ConfigurationError("max_body and max_tokens must be positive")
    if manager is not None and database_url is not None:
        raise ConfigurationError("give database_url or manager, not both")
    keys = PublicKeys(public_keys, keys_url=keys_url, refetch_interval=refetch_interval)
    owns = manager is None
    return SecretScanningApp(
        manager if manager is not None else KeyManager.from_url(database_url),
        keys,
        action,
        owns_manager=owns,
        max_body=max_body,
        max_tokens=max_tokens,
    )
