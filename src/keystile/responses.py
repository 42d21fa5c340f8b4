"""Failures → RFC 6750 responses. The one place an ``AuthenticationError`` becomes HTTP.

* nothing presented: 401 with a bare challenge ``WWW-Authenticate: Bearer realm="…"``;
* a key that is not valid: 401 ``error="invalid_token"``;
* a malformed request: 400 ``error="invalid_request"``;
* a missing scope: 403 ``error="insufficient_scope"`` with ``scope="…"``;
* the store down or the argon2 guard full: 503 with ``Retry-After``.

The JSON body says how to send a key, naming both header forms, and for a presented
key where it was read from, never its value.
"""

from __future__ import annotations

from starlette.responses import JSONResponse, Response

from .errors import AuthenticationError, InsufficientScope, ServiceUnavailable

__all__ = ["error_code", "error_response", "www_authenticate"]

WEBSOCKET_POLICY_VIOLATION = 1008


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def www_authenticate(exc: AuthenticationError, realm: str) -> str | None:
    if isinstance(exc, ServiceUnavailable):
        return None
    params = [f"realm={_quote(realm)}"]
    if exc.error is not None:
        params.append(f"error={_quote(exc.error)}")
        params.append(f"error_description={_quote(exc.description)}")
    if isinstance(exc, InsufficientScope):
        params.append(f"scope={_quote(' '.join(exc.required))}")
    return "Bearer " + ", ".join(params)


def error_code(exc: AuthenticationError) -> str:
    """The RFC 6750 code, or ``unauthorized`` / ``temporarily_unavailable`` where it has none."""
    if exc.error is not None:
        return exc.error
    return "temporarily_unavailable" if exc.status_code == 503 else "unauthorized"


def error_response(exc: AuthenticationError, *, realm: str, header_name: str) -> Response:
    body: dict[str, object] = {
        "error": error_code(exc),
        "detail": exc.description,
    }
    headers = {"Cache-Control": "no-store"}
    if exc.source is not None:
        body["credential_source"] = exc.source
    if isinstance(exc, InsufficientScope):
        body["required_scopes"] = list(exc.required)
        body["missing_scopes"] = list(exc.missing)
    elif isinstance(exc, ServiceUnavailable):
        body["retry_after"] = exc.retry_after
        headers["Retry-After"] = str(exc.retry_after)
    else:
        body["hint"] = f"Send the key as 'Authorization: Bearer <key>' or '{header_name}: <key>'."
    challenge = www_authenticate(exc, realm)
    if challenge is not None:
        headers["WWW-Authenticate"] = challenge
    return JSONResponse(body, status_code=exc.status_code, headers=headers)
