"""Reading the presented key out of the request headers, without decoding it.

``Authorization: Bearer <key>`` (scheme case-insensitive) and ``X-API-Key: <key>`` (the
header name is configurable). Other ``Authorization`` schemes are ignored, as if nothing
were sent. The same key in several places is one credential; two different keys, or
``Bearer`` with no token, are a malformed request. The same key in both headers is
reported as read from ``authorization``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import InvalidRequest

__all__ = ["Credential", "extract_credential"]

_AUTHORIZATION = b"authorization"


@dataclass(frozen=True, slots=True)
class Credential:
    token: bytes = field(repr=False)
    #: ``authorization`` or the API-key header's name: where the key was read from.
    source: str


def extract_credential(
    headers: Iterable[tuple[bytes, bytes]], header_name: bytes
) -> Credential | None:
    """The one credential in ``headers``, ``None`` if there is none.

    ``header_name`` must be lowercase, as ASGI servers lowercase header names.
    """
    found: Credential | None = None
    for name, value in headers:
        if name == _AUTHORIZATION:
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != b"bearer":
                continue
            token = parts[1].strip() if len(parts) == 2 else b""
            source = "authorization"
        elif name == header_name:
            token = value.strip()
            source = header_name.decode("latin-1")
        else:
            continue
        if not token:
            raise InvalidRequest(
                "empty_token", f"The {_label(source)} header carries no key.", source=source
            )
        if b" " in token or b"\t" in token:
            raise InvalidRequest(
                "malformed_header",
                f"The {_label(source)} header must carry exactly one key.",
                source=source,
            )
        if found is not None and found.token != token:
            raise InvalidRequest(
                "conflicting_credentials",
                "The request carries two different keys; send exactly one.",
            )
        if found is None or source == "authorization":
            found = Credential(token, source)
    return found


def _label(source: str) -> str:
    return "Authorization: Bearer" if source == "authorization" else source
