"""Failures → RFC 6750 responses. The one place an ``AuthenticationError`` becomes HTTP.

* nothing presented: 401 with a bare challenge ``WWW-Authenticate: Bearer realm="…"``;
* a key that is not valid: 401 ``error="invalid_token"``;
* a malformed request: 400 ``error="invalid_request"``;
* a missing scope: 403 ``error="insufficient_scope"`` with ``scope="…"``;
* a verified key used from outside its IP allowlist: 403 ``ip_not_allowed``, no challenge
  (the key is valid; another key would not help);
* the store down or the argon2 guard full: 503 with ``Retry-After``;
* a secret-scanning report not acted on (``ReportRefused``): its status, ``{"error":
  reason, "error_description": …}``;
* a verified key over its limits: 429 ``rate_limited`` (with ``Retry-After`` and the IETF
  ``RateLimit-Policy``/``RateLimit`` fields) or ``quota_exceeded`` (``Retry-After`` only
  when a refill is due). No challenge: the key is valid, so retrying it is right.

The JSON body says how to send a key, naming both header forms, and for a presented
key where it was read from, never its value.

The body (:func:`error_body`) and the headers (:func:`error_headers`) are built here and
nowhere else: the middleware and every framework adapter send them, so one failure gets
one body whoever refuses it. What the OpenAPI documents (:mod:`keystile.openapi`) is read
from here too: the codes (:func:`error_codes`) and the headers of each kind of refusal
(:func:`refusal_headers`).

Inside a Starlette or FastAPI app, the same responses travel as
:class:`KeystileHTTPException` (a refusal by a FastAPI dependency, a logout that could
not be recorded), so routes refuse exactly as the middleware does.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from .errors import (
    AuthenticationError,
    InsufficientScope,
    IPNotAllowed,
    QuotaExceeded,
    RateLimited,
    ReportRefused,
    RequestRefused,
    ServiceUnavailable,
    TooManyRequests,
)

__all__ = [
    "KeystileHTTPException",
    "challenges",
    "code_of",
    "error_body",
    "error_code",
    "error_codes",
    "error_headers",
    "error_response",
    "refusal_classes",
    "refusal_headers",
    "refusal_response",
    "report_refusal",
    "www_authenticate",
]

WEBSOCKET_POLICY_VIOLATION = 1008
#: "Try Again Later" (IANA WebSocket close codes): a WebSocket's 503.
WEBSOCKET_TRY_AGAIN_LATER = 1013


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenges(cls: type[AuthenticationError]) -> bool:
    """Whether a refusal of this class carries a ``WWW-Authenticate`` challenge: not when
    the key was not judged (503), nor when it is valid and another key would not help
    (429, an address outside its allowlist)."""
    return not issubclass(cls, (ServiceUnavailable, TooManyRequests, IPNotAllowed))


def www_authenticate(exc: AuthenticationError, realm: str) -> str | None:
    if not challenges(type(exc)):
        return None
    params = [f"realm={_quote(realm)}"]
    if exc.error is not None:
        params.append(f"error={_quote(exc.error)}")
        params.append(f"error_description={_quote(exc.description)}")
    if isinstance(exc, InsufficientScope):
        params.append(f"scope={_quote(' '.join(exc.required))}")
    return "Bearer " + ", ".join(params)


def code_of(cls: type[AuthenticationError]) -> str:
    """The ``error`` code of a refusal of this class: the RFC 6750 code, or
    ``unauthorized`` / ``temporarily_unavailable`` where it has none."""
    if cls.error is not None:
        return cls.error
    return "temporarily_unavailable" if cls.status_code == 503 else "unauthorized"


def error_code(exc: AuthenticationError) -> str:
    """The RFC 6750 code, or ``unauthorized`` / ``temporarily_unavailable`` where it has none."""
    return code_of(type(exc))


def refusal_classes() -> list[type[AuthenticationError]]:
    """Every class of refusal (``AuthenticationError`` and its subclasses), parents first."""
    found: list[type[AuthenticationError]] = []
    pending: list[type[AuthenticationError]] = [AuthenticationError]
    while pending:
        cls = pending.pop(0)
        if cls not in found:
            found.append(cls)
            pending += cls.__subclasses__()
    return found


def error_codes() -> list[str]:
    """Every ``error`` code a keystile body can carry, from the exception classes."""
    return sorted({code_of(cls) for cls in refusal_classes()})


def refusal_headers(cls: type[AuthenticationError]) -> dict[str, bool]:
    """The headers :func:`error_headers` sends on a refusal of this class, each with
    whether it is always there. ``RateLimit-Policy`` and ``RateLimit`` are the fields the
    limits put on a ``RateLimited`` (``keystile.limits``); a quota's ``Retry-After`` is
    only there when a refill is due."""
    headers = {"Cache-Control": True}
    if challenges(cls):
        headers["WWW-Authenticate"] = True
    if issubclass(cls, ServiceUnavailable):
        headers["Retry-After"] = True
    elif issubclass(cls, RateLimited):
        headers.update({"Retry-After": True, "RateLimit-Policy": True, "RateLimit": True})
    elif issubclass(cls, TooManyRequests):
        headers["Retry-After"] = False
    return headers


def error_body(exc: AuthenticationError, *, header_name: str) -> dict[str, object]:
    """The JSON body of a refusal, the same from the middleware and from every adapter."""
    body: dict[str, object] = {
        "error": error_code(exc),
        "detail": exc.description,
    }
    if exc.source is not None:
        body["credential_source"] = exc.source
    if isinstance(exc, InsufficientScope):
        body["required_scopes"] = list(exc.required)
        body["missing_scopes"] = list(exc.missing)
    elif isinstance(exc, ServiceUnavailable):
        body["retry_after"] = exc.retry_after
    elif isinstance(exc, TooManyRequests):
        if isinstance(exc, RateLimited):
            body["limit"] = exc.limit
            body["policy"] = exc.policy
        elif isinstance(exc, QuotaExceeded):
            body["quota"] = exc.quota
            body["policy"] = exc.policy
        if exc.retry_after is not None:
            body["retry_after"] = exc.retry_after
    elif not isinstance(exc, IPNotAllowed):  # the key was sent right; the address is refused
        body["hint"] = f"Send the key as 'Authorization: Bearer <key>' or '{header_name}: <key>'."
    return body


def error_headers(exc: AuthenticationError, *, realm: str) -> dict[str, str]:
    """The headers of a refusal (see :func:`refusal_headers` for which are sent when)."""
    headers = {"Cache-Control": "no-store"}
    if isinstance(exc, (ServiceUnavailable, TooManyRequests)):
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, TooManyRequests):
            headers.update(exc.headers)
    challenge = www_authenticate(exc, realm)
    if challenge is not None:
        headers["WWW-Authenticate"] = challenge
    return headers


def error_response(exc: AuthenticationError, *, realm: str, header_name: str) -> Response:
    return JSONResponse(
        error_body(exc, header_name=header_name),
        status_code=exc.status_code,
        headers=error_headers(exc, realm=realm),
    )


def refusal_response(exc: RequestRefused) -> Response:
    """A refused management request: the middleware's body shape (``error``, ``detail``),
    never cached."""
    return JSONResponse(
        {"error": exc.error, "detail": exc.description},
        status_code=exc.status_code,
        headers={"Cache-Control": "no-store"},
    )


def report_refusal(exc: ReportRefused) -> Response:
    """The secret-scanning endpoint's answer to a report it did not act on."""
    body = {"error": exc.reason, "error_description": str(exc)}
    headers = {"Allow": "POST"} if exc.status_code == 405 else None
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


class _JSONBody(dict[str, Any]):
    """An ``HTTPException.detail`` that every stock handler renders as the JSON body.

    FastAPI's handler serialises it like any mapping, under ``"detail"``. Starlette's
    default handler passes ``detail`` to ``PlainTextResponse``, which renders content by
    calling ``encode(charset)``: this one returns the middleware's exact body bytes (the
    exception's headers carry the JSON content type).
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        super().__init__(json.loads(raw))
        self._raw = raw

    def encode(self, encoding: str = "utf-8") -> bytes:
        return self._raw


class KeystileHTTPException(HTTPException):
    """An ``AuthenticationError`` raised inside the app, answered as the middleware would.

    Status, headers (``WWW-Authenticate``, ``Retry-After``, ``Cache-Control``) and body
    come from :func:`error_response`. Starlette's default handler sends that body as is;
    FastAPI's puts it under ``"detail"``, as for its own ``HTTPException``. ``detail``
    is the body as a mapping and ``auth_error`` the keystile exception behind it, for an
    exception handler that wants another shape.
    """

    def __init__(self, auth_error: AuthenticationError, *, realm: str, header_name: str) -> None:
        response = error_response(auth_error, realm=realm, header_name=header_name)
        headers = {
            name: value for name, value in response.headers.items() if name != "content-length"
        }
        self._body = bytes(response.body)
        detail: Any = _JSONBody(self._body)
        super().__init__(response.status_code, detail=detail, headers=headers)
        self.auth_error = auth_error

    def response(self) -> Response:
        """The response the middleware would send: the body as is, not under ``"detail"``."""
        return Response(self._body, status_code=self.status_code, headers=self.headers)
