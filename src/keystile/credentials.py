"""Reading the presented key out of the request headers, without decoding it.

``Authorization: Bearer <key>`` (scheme case-insensitive) and ``X-API-Key: <key>`` (the
header name is configurable). Other ``Authorization`` schemes are ignored, as if nothing
were sent. The same key in several places is one credential; two different keys, or
``Bearer`` with no token, are a malformed request. The same key in both headers is
reported as read from ``authorization``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .errors import InvalidRequest

__all__ = ["Credential", "extract_credential", "split_credential"]

Headers = list[tuple[bytes, bytes]]


class Credential(NamedTuple):
    """The presented key and where it was read from. (A named tuple: cheaper to build on
    every request than a frozen dataclass, and as immutable.)"""

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
    return split_credential(headers, header_name)[0]


def split_credential(
    headers: Iterable[tuple[bytes, bytes]], header_name: bytes
) -> tuple[Credential | None, Headers | None]:
    """``extract_credential``, and in the same pass the headers without any
    ``Authorization`` or ``header_name`` header (``None`` when there is none to remove),
    for the middleware to hand the app a scope without the key."""
    if not isinstance(headers, list):
        headers = list(headers)
    token: bytes | None = None
    source = ""
    hits: list[int] = []
    i = -1
    for name, value in headers:
        i += 1
        if name == b"authorization":
            hits.append(i)
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != b"bearer":
                continue
            candidate = parts[1].strip() if len(parts) == 2 else b""
            where = "authorization"
        elif name == header_name:
            hits.append(i)
            candidate = value.strip()
            where = header_name.decode("latin-1")
        else:
            continue
        if not candidate:
            raise InvalidRequest(
                "empty_token", f"The {_label(where)} header carries no key.", source=where
            )
        if b" " in candidate or b"\t" in candidate:
            raise InvalidRequest(
                "malformed_header",
                f"The {_label(where)} header must carry exactly one key.",
                source=where,
            )
        if token is not None and token != candidate:
            raise InvalidRequest(
                "conflicting_credentials",
                "The request carries two different keys; send exactly one.",
            )
        if token is None or where == "authorization":
            token, source = candidate, where
    if not hits:
        return None, None
    if len(hits) == 1:
        kept = headers[: hits[0]] + headers[hits[0] + 1 :]
    else:
        drop = set(hits)
        kept = [h for j, h in enumerate(headers) if j not in drop]
    return (None if token is None else Credential(token, source)), kept


def _label(source: str) -> str:
    return "Authorization: Bearer" if source == "authorization" else source
