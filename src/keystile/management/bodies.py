"""Reading what a management request sends: its JSON body, its query and its key id.

Everything is checked before anything changes, and each fault is a ``RequestRefused``
with its own code: a body that is not ``application/json`` (415; a cross-site HTML form
cannot send that type, so no state-changing request can be forged from another site
without a CORS preflight the app would have to allow), larger than the cap (413), not
JSON (400), not an object, with an unknown field or a field of the wrong type (422). A key
id that is not of the key-id form is 404, as an unknown one is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request

from ..durations import parse_duration
from ..errors import RequestRefused
from ..tokens import KEY_ID_LENGTH

__all__ = [
    "DEFAULT_MAX_BODY",
    "duration",
    "key_id_of",
    "moment",
    "query_value",
    "read_fields",
]

#: The largest request body read, in bytes: a key's fields, with room for its metadata.
DEFAULT_MAX_BODY = 16 * 1024
_KEY_ID = re.compile(rf"[0-9A-Za-z]{{{KEY_ID_LENGTH}}}")


def invalid(field: str, why: str) -> RequestRefused:
    return RequestRefused(422, "invalid_field", f"{field}: {why}")


def key_id_of(request: Request) -> str:
    """The ``{id}`` of the path; 404 for one that cannot be a key id."""
    key_id = str(request.path_params.get("key_id", ""))
    if not _KEY_ID.fullmatch(key_id):
        raise RequestRefused(404, "not_found", "No such key.")
    return key_id


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestRefused(413, "body_too_large", f"The body may be at most {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRefused(413, "body_too_large", f"The body may be at most {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_fields(
    request: Request, allowed: Mapping[str, Callable[[str, Any], Any]], *, limit: int
) -> dict[str, Any]:
    """The body's fields, each converted by its checker in ``allowed``; an empty body is
    an empty object. The content type must be ``application/json``."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RequestRefused(
            415, "unsupported_media_type", "Send the body as 'Content-Type: application/json'."
        )
    raw = await _body(request, limit)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise RequestRefused(400, "malformed_json", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestRefused(422, "invalid_body", "The body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestRefused(
            422,
            "unknown_field",
            f"Unknown fields: {', '.join(map(repr, unknown))[:200]}; known: {', '.join(allowed)}.",
        )
    return {name: allowed[name](name, value) for name, value in body.items()}


# -- field checkers: (field, value) -> the value keystile takes --------------------------


def text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid(field, "a string is expected")
    return value


def text_list(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid(field, "a list of strings is expected")
    return value


def optional_text_list(field: str, value: Any) -> list[str] | None:
    return None if value is None else text_list(field, value)


def flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(field, "true or false is expected")
    return value


def mapping(field: str, value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise invalid(field, "an object is expected")
    return value


def duration(field: str, value: Any) -> timedelta:
    """A duration: ``"90d"``, ``"1h30m"`` or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise invalid(field, "a duration ('90d', '1h') or a number of seconds is expected")
    try:
        delta = parse_duration(str(value))
    except ValueError as exc:
        raise invalid(field, str(exc)) from None
    return delta


def moment(field: str, value: Any) -> datetime | None:
    """An ISO 8601 moment with its offset, or ``null``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(field, "an ISO 8601 time with its offset is expected")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(field, "an ISO 8601 time with its offset is expected") from None
    if parsed.tzinfo is None:
        raise invalid(field, "the time needs its offset ('Z' or '+02:00')")
    return parsed.astimezone(timezone.utc)


def query_value(request: Request, name: str, convert: Callable[[str, Any], Any]) -> Any:
    """The query parameter ``name`` converted, ``None`` when absent; 422 when malformed."""
    values = request.query_params.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise invalid(name, "give it once")
    return convert(name, values[0])
