"""Failures → RFC 6750 responses (``keystile.responses``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from keystile.credentials import extract_credential
from keystile.errors import (
    AuthenticationError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    IPNotAllowed,
    MissingCredentials,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
)
from keystile.responses import (
    KeystileHTTPException,
    error_codes,
    error_response,
    refusal_headers,
)
from openapi_conformance import error_codes as rendered_codes

GENERIC = "The API key is not valid."


def render(
    exc: AuthenticationError, *, realm: str = "api", header_name: str = "x-api-key"
) -> tuple[Response, dict[str, Any]]:
    response = error_response(exc, realm=realm, header_name=header_name)
    return response, json.loads(response.body)


EVERY_FAILURE: list[AuthenticationError] = [
    MissingCredentials(),
    InvalidToken("unknown"),
    InvalidRequest("empty_token"),
    InsufficientScope(("a", "b"), ("b",)),
    ServiceUnavailable("store_unavailable", retry_after=3),
]
FAILURE_IDS = ["missing", "invalid_token", "invalid_request", "insufficient_scope", "unavailable"]


def test_missing_credentials_bare_challenge() -> None:
    """Nothing presented: 401 with a bare ``Bearer realm`` challenge and no error code."""
    response, body = render(MissingCredentials())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    assert body["error"] == "unauthorized"


def test_invalid_token_challenge() -> None:
    """An invalid key: 401 with ``error="invalid_token"`` and the generic description."""
    response, body = render(InvalidToken("unknown"))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="api", error="invalid_token", error_description="{GENERIC}"'
    )
    assert body["error"] == "invalid_token"
    assert body["detail"] == GENERIC


def test_invalid_request_challenge() -> None:
    """A malformed request: 400 with ``error="invalid_request"``."""
    exc = InvalidRequest("conflicting_credentials", "Send exactly one key.")
    response, body = render(exc)
    assert response.status_code == 400
    assert response.headers["www-authenticate"] == (
        'Bearer realm="api", error="invalid_request", error_description="Send exactly one key."'
    )
    assert body["error"] == "invalid_request"


def test_insufficient_scope_challenge() -> None:
    """A missing scope: 403 with ``error="insufficient_scope"`` and every required scope."""
    response, body = render(InsufficientScope(("a", "b"), ("b",)))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == (
        'Bearer realm="api", error="insufficient_scope", '
        'error_description="Missing scope: b.", scope="a b"'
    )
    assert body["required_scopes"] == ["a", "b"]
    assert body["missing_scopes"] == ["b"]


def test_service_unavailable_has_retry_after_and_no_challenge() -> None:
    """503: ``Retry-After`` and no ``WWW-Authenticate`` (the key was not judged)."""
    response, body = render(ServiceUnavailable("store_unavailable", retry_after=7))
    assert response.status_code == 503
    assert "www-authenticate" not in response.headers
    assert response.headers["retry-after"] == "7"
    assert body["retry_after"] == 7
    assert body["error"] == "temporarily_unavailable"


@pytest.mark.parametrize("exc", EVERY_FAILURE, ids=FAILURE_IDS)
def test_every_failure_is_no_store(exc: AuthenticationError) -> None:
    """No failure response may be cached."""
    response, _ = render(exc)
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("exc", EVERY_FAILURE, ids=FAILURE_IDS)
def test_every_failure_is_json(exc: AuthenticationError) -> None:
    """Every failure body is JSON with an error code and a detail."""
    response, body = render(exc)
    assert response.headers["content-type"] == "application/json"
    assert body["error"] and body["detail"]


@pytest.mark.parametrize(
    "exc",
    [MissingCredentials(), InvalidToken("unknown"), InvalidRequest("empty_token")],
    ids=["401-missing", "401-invalid", "400"],
)
def test_hint_names_both_header_forms(exc: AuthenticationError) -> None:
    """401 and 400 bodies say how to send a key, naming both header forms."""
    _, body = render(exc)
    assert "Authorization: Bearer <key>" in body["hint"]
    assert "x-api-key: <key>" in body["hint"]


def test_hint_names_custom_header() -> None:
    """The hint names the configured header, not the default."""
    _, body = render(MissingCredentials(), header_name="x-my-key")
    assert "x-my-key: <key>" in body["hint"]
    assert "x-api-key" not in body["hint"]


@pytest.mark.parametrize("source", ["authorization", "x-api-key"])
def test_credential_source_included_when_set(source: str) -> None:
    """A presented key's response says which header it was read from."""
    _, body = render(InvalidToken("wrong_secret", source=source))
    assert body["credential_source"] == source


def test_credential_source_absent_when_unset() -> None:
    """With no known source, the body has no ``credential_source``."""
    _, body = render(MissingCredentials())
    assert "credential_source" not in body


def test_response_never_contains_token() -> None:
    """A conflict raised from real headers renders without either key."""
    first, second = b"ks_0123456789ab_firstkeyfirst", b"ks_ba9876543210_secondkeysecond"
    with pytest.raises(InvalidRequest) as info:
        extract_credential(
            [(b"authorization", b"Bearer " + first), (b"x-api-key", second)], b"x-api-key"
        )
    response, _ = render(info.value)
    rendered = response.body + b"".join(k + v for k, v in response.raw_headers)
    assert first not in rendered
    assert second not in rendered


def test_realm_quotes_and_backslashes_are_escaped() -> None:
    """A realm containing ``"`` or ``\\`` is escaped as an RFC 7230 quoted-string."""
    response, _ = render(MissingCredentials(), realm='my "api" \\ v2')
    assert response.headers["www-authenticate"] == 'Bearer realm="my \\"api\\" \\\\ v2"'


def _public_view(exc: AuthenticationError) -> tuple[int, str, bytes]:
    response, _ = render(exc)
    return response.status_code, response.headers["www-authenticate"], response.body


def test_undisclosable_reasons_share_one_response() -> None:
    """unknown, wrong_secret, malformed and bad_checksum are indistinguishable to the client."""
    views = {
        _public_view(InvalidToken(reason))
        for reason in ("unknown", "wrong_secret", "malformed", "bad_checksum")
    }
    assert len(views) == 1
    assert GENERIC in views.pop()[1]


def test_expired_and_revoked_have_their_own_descriptions() -> None:
    """expired and revoked (secret proven) each get a description of their own."""
    generic = InvalidToken("unknown").description
    expired = InvalidToken("expired").description
    revoked = InvalidToken("revoked").description
    assert len({generic, expired, revoked}) == 3
    assert "expired" in render(InvalidToken("expired"))[1]["detail"]
    assert "revoked" in render(InvalidToken("revoked"))[1]["detail"]


def test_reason_code_is_not_in_body() -> None:
    """The internal reason (e.g. ``wrong_secret``) does not reach the client."""
    response, _ = render(InvalidToken("wrong_secret"))
    assert b"wrong_secret" not in response.body
    assert "wrong_secret" not in response.headers["www-authenticate"]


# -- KeystileHTTPException: the same responses, raised inside the app -------------------


def raising_app(exc: AuthenticationError, app_class: type[Starlette] = Starlette) -> Starlette:
    async def refuse(request: Request) -> Response:
        raise KeystileHTTPException(exc, realm="api", header_name="x-api-key")

    app = app_class()
    app.add_route("/refuse", refuse)
    return app


@pytest.mark.parametrize("exc", EVERY_FAILURE, ids=FAILURE_IDS)
def test_http_exception_in_starlette_sends_the_middleware_response(
    exc: AuthenticationError,
) -> None:
    """Starlette's default handler answers a KeystileHTTPException with exactly the status,
    headers and JSON body error_response builds."""
    expected, _ = render(exc)
    with TestClient(raising_app(exc)) as c:
        r = c.get("/refuse")
    assert r.status_code == expected.status_code
    assert r.content == expected.body
    assert r.headers["content-type"] == "application/json"
    for name, value in expected.headers.items():
        assert r.headers[name] == value


@pytest.mark.parametrize("exc", EVERY_FAILURE, ids=FAILURE_IDS)
def test_http_exception_in_fastapi_puts_the_body_under_detail(exc: AuthenticationError) -> None:
    """FastAPI's default handler answers it with the same body under "detail"."""
    from fastapi import FastAPI

    expected, body = render(exc)
    with TestClient(raising_app(exc, FastAPI)) as c:
        r = c.get("/refuse")
    assert r.status_code == expected.status_code
    assert r.json() == {"detail": body}
    for name in ("cache-control", "www-authenticate", "retry-after"):
        assert r.headers.get(name) == expected.headers.get(name)


def test_http_exception_carries_the_error() -> None:
    """detail is the body as a mapping and auth_error the keystile exception behind it."""
    exc = ServiceUnavailable("store_unavailable", "Try later.", retry_after=2)
    raised = KeystileHTTPException(exc, realm="api", header_name="x-api-key")
    assert raised.auth_error is exc
    assert raised.status_code == 503
    assert raised.detail == render(exc)[1]
    assert raised.headers is not None and raised.headers["retry-after"] == "2"


def test_http_exception_response_is_the_middlewares() -> None:
    """KeystileHTTPException.response() is error_response's status, headers and body."""
    exc = InsufficientScope(("a", "b"), ("b",))
    expected, _ = render(exc)
    answer = KeystileHTTPException(exc, realm="api", header_name="x-api-key").response()
    assert answer.status_code == expected.status_code
    assert answer.body == expected.body
    assert dict(answer.headers) == dict(expected.headers)


# -- what the OpenAPI documents is read from here ---------------------------------------

SAMPLES: list[AuthenticationError] = [
    *EVERY_FAILURE,
    IPNotAllowed(),
    RateLimited("1/second", retry_after=2, headers=(("RateLimit-Policy", "p"), ("RateLimit", "r"))),
    QuotaExceeded(5, retry_after=60),
    QuotaExceeded(5),
]


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda exc: type(exc).__name__)
def test_refusal_headers_are_the_headers_sent(exc: AuthenticationError) -> None:
    """refusal_headers() names every header error_response sends for a class; one it says
    is always sent is sent."""
    response, _ = render(exc)
    declared = refusal_headers(type(exc))
    sent = {name.lower() for name in response.headers} - {"content-length", "content-type"}
    assert sent <= {name.lower() for name in declared}
    assert {name.lower() for name, always in declared.items() if always} <= sent


def test_error_codes_are_every_code_a_body_carries() -> None:
    """error_codes() lists exactly the codes rendered bodies carry, one failure of each
    class."""
    assert set(error_codes()) == rendered_codes()
