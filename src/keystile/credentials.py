"""Reading the presented key out of the request headers, without decoding it.

``Authorization: Bearer <key>`` (scheme case-insensitive) and ``X-API-Key: <key>`` (the
header name is configurable). Other ``Authorization`` schemes are ignored, as if nothing
were sent, and so is an empty or blank API-key header (as FastAPI's ``APIKeyHeader`` and
Kong read one: a client that always sends the header, empty when it has no key, is
sending nothing; the header is still removed with the credential). The same key in
several places is one credential; two different keys, or ``Bearer`` with no token, are
a malformed request. The same key in both headers is reported as read from
``authorization``.

This runs on every request, so the middleware uses :func:`split_credential`, which
finds the credential and the headers without it in one pass and leaves the whitespace
check (:func:`check_single_token`) to the cache-miss path: a token that hit the cache
equals a verified key, which never contains whitespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from .errors import InvalidRequest

__all__ = [
    "Credential",
    "check_single_token",
    "extract_credential",
    "split_credential",
    "without_credentials",
]

Headers = list[tuple[bytes, bytes]]


class Credential(NamedTuple):
    """The presented key and where it was read from. Its repr never shows the key."""

    token: bytes
    #: ``authorization`` or the API-key header's name: where the key was read from.
    source: str

    def __repr__(self) -> str:
        return f"Credential(source={self.source!r})"


def extract_credential(
    headers: Iterable[tuple[bytes, bytes]], header_name: bytes
) -> Credential | None:
    """The one credential in ``headers``, ``None`` if there is none.

    ``header_name`` must be lowercase, as ASGI servers lowercase header names.
    """
    token, source, _ = split_credential(list(headers), header_name)
    if token is None:
        return None
    check_single_token(token, source)
    return Credential(token, source)


def split_credential(
    headers: Headers,
    header_name: bytes,
    is_ours: Callable[[bytes], bool] | None = None,
) -> tuple[bytes | None, str, Headers | None]:
    """``(token, source, headers_without_credentials)`` in one pass over ``headers``.

    ``token`` is ``None`` when no credential was sent; the header list is ``None`` when
    there was no credential header to remove. Only credentials are removed (and empty
    API-key headers, which count as none): an ``Authorization`` header of another
    scheme stays, and so does a bearer token that ``is_ours`` (when given) says is not
    a keystile key, which then counts as no credential at all (an OAuth token for the
    app's own layer). Raises ``InvalidRequest`` for ``Bearer`` without a token or two
    different tokens. Does not check the token for inner whitespace: see
    :func:`check_single_token`.
    """
    token: bytes | None = None
    source = ""
    first = -1
    hits: list[int] | None = None
    index = -1
    for name, value in headers:
        index += 1
        if name == b"authorization":
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != b"bearer":
                continue
            candidate = parts[1].strip() if len(parts) == 2 else b""
            if is_ours is not None and candidate and not is_ours(candidate):
                continue
            where = "authorization"
        elif name == header_name:
            candidate = value.strip()
            where = header_name.decode("latin-1")
        else:
            continue
        if first < 0:
            first = index
        else:
            hits = [*(hits or [first]), index]
        if not candidate:
            if where != "authorization":
                continue
            raise InvalidRequest(
                "empty_token", f"The {_label(where)} header carries no key.", source=where
            )
        if token is None or where == "authorization":
            if token is not None and token != candidate:
                raise _conflict(source, where)
            token, source = candidate, where
        elif token != candidate:
            raise _conflict(source, where)
    if first < 0:
        return None, "", None
    if hits is None:
        return token, source, headers[:first] + headers[first + 1 :]
    drop = set(hits)
    return token, source, [h for i, h in enumerate(headers) if i not in drop]


def without_credentials(
    headers: Headers, header_name: bytes, is_ours: Callable[[bytes], bool]
) -> Headers | None:
    """``headers`` without keystile's credentials, ``None`` if there were none; never raises.

    For paths that need no key: the API-key header goes whatever it holds, a bearer
    token only when ``is_ours``; every other header, other credentials included, stays.
    """
    kept: Headers = []
    for name, value in headers:
        if name == header_name:
            continue
        if name == b"authorization":
            parts = value.split(None, 1)
            if len(parts) == 2 and parts[0].lower() == b"bearer" and is_ours(parts[1].strip()):
                continue
        kept.append((name, value))
    return kept if len(kept) != len(headers) else None


def check_single_token(token: bytes, source: str) -> None:
    """Refuse a header value that carries more than one word (``Bearer a b``)."""
    if b" " in token or b"\t" in token:
        raise InvalidRequest(
            "malformed_header",
            f"The {_label(source)} header must carry exactly one key.",
            source=source,
        )


def _conflict(first: str, second: str) -> InvalidRequest:
    """Two different keys: the description names where each was read, so a client with
    two credentials configured (Swagger UI's two Authorize fields) sees which disagree."""
    if first == second:
        where = f"The {_label(first)} header is sent twice with two different keys"
    else:
        where = f"The {_label(first)} and {_label(second)} headers carry two different keys"
    return InvalidRequest("conflicting_credentials", f"{where}; send exactly one.")


def _label(source: str) -> str:
    return "Authorization: Bearer" if source == "authorization" else source
