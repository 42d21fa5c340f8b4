"""keystile in OpenAPI, for :mod:`keystile.fastapi` and :mod:`keystile.litestar` alike.

An operation's document must hold every response keystile can send on it, with the body
and the headers it really carries, so that a client generated from it (or a conformance
fuzzer run against it) meets nothing undocumented. What can be sent is read from the
exception classes of :mod:`keystile.errors` and from :mod:`keystile.responses`, never
copied here: the codes of the error body, the status of each refusal and the headers
each one carries.

The middleware can refuse any operation it protects with every refusal but a missing
scope: 400 ``invalid_request``; 401 ``unauthorized`` (no key; not with ``required=False``)
and ``invalid_token``; 403 ``ip_not_allowed`` (any key may carry an allowlist); 429
``rate_limited`` and ``quota_exceeded``; 503 ``temporarily_unavailable``. The app's own
keystile dependencies or guards add 403 ``insufficient_scope`` where scopes are required,
and 401 where a request without a key can reach them (an exempt path, ``required=False``).
Both send the same body (:func:`keystile.responses.error_body`) and headers
(:func:`keystile.responses.error_headers`), unless the app replaced them (``on_error``, its
own exception handler): then a response is documented without a body and its headers
as optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

from .errors import AuthenticationError, InsufficientScope, MissingCredentials
from .responses import code_of, error_codes, refusal_classes, refusal_headers

__all__ = [
    "DEFAULT_BEARER_SCHEME_NAME",
    "DEFAULT_HEADER_SCHEME_NAME",
    "ERROR_SCHEMA_NAME",
    "IMPLICIT_SCOPE",
    "add_rate_limit_headers",
    "document_operation",
    "document_refusals",
    "error_schema",
    "fully_exempt",
    "merge_responses",
    "refusal_responses",
    "refusals",
    "security_schemes",
]

DEFAULT_BEARER_SCHEME_NAME = "bearerAuth"
DEFAULT_HEADER_SCHEME_NAME = "apiKeyHeader"
#: The JSON body of every keystile refusal, in ``components.schemas`` where it can be.
ERROR_SCHEMA_NAME = "KeystileError"
#: The scope every verified key holds without being granted it: ``request.auth.scopes``
#: lists it, as Starlette's own backends do, so ``require_scopes("authenticated")``
#: agrees with ``@requires("authenticated")``; it never causes a 403.
IMPLICIT_SCOPE = "authenticated"

_STRING: dict[str, Any] = {"type": "string"}
_HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    "Cache-Control": ({"type": "string", "enum": ["no-store"]}, "A refusal is never cached."),
    "WWW-Authenticate": (
        _STRING,
        'The RFC 6750 challenge: `Bearer realm="..."`, with the error code when there is one.',
    ),
    "Retry-After": ({"type": "integer", "minimum": 0}, "Seconds to wait before trying again."),
    "RateLimit-Policy": (_STRING, "The key's rate limit (IETF RateLimit header fields)."),
    "RateLimit": (_STRING, "What is left of the key's rate limit, and when it resets."),
}


def security_schemes(
    header_name: str,
    *,
    bearer_scheme_name: str = DEFAULT_BEARER_SCHEME_NAME,
    header_scheme_name: str = DEFAULT_HEADER_SCHEME_NAME,
) -> dict[str, dict[str, Any]]:
    """The two ways to send a key, as ``components.securitySchemes`` entries."""
    return {
        bearer_scheme_name: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key as a bearer token: `Authorization: Bearer <key>`.",
        },
        header_scheme_name: {
            "type": "apiKey",
            "in": "header",
            "name": header_name,
            "description": f"An API key in the `{header_name}` header.",
        },
    }


def error_schema() -> dict[str, Any]:
    """The error body (:func:`keystile.responses.error_body`): every field it may have,
    and every code keystile sends, so a body with anything else is not keystile's."""
    strings = {"type": "array", "items": _STRING}
    return {
        "title": ERROR_SCHEMA_NAME,
        "type": "object",
        "description": "Why keystile refused the request (RFC 6750). Never contains the key.",
        "properties": {
            "error": {
                "type": "string",
                "enum": error_codes(),
                "description": "The error code: RFC 6750's where there is one, "
                "`unauthorized` when no key was sent, `temporarily_unavailable` on a 503.",
            },
            "detail": _field("string", "What went wrong, for a person."),
            "hint": _field("string", "How to send a key (400 and 401)."),
            "credential_source": _field(
                "string",
                "Where the refused key was read from: `authorization` or the API-key header's"
                " name.",
            ),
            "required_scopes": strings,
            "missing_scopes": strings,
            "retry_after": _field("integer", "Seconds to wait (429, 503)."),
            "limit": _field("string", "The rate limit exceeded (429)."),
            "quota": _field("integer", "The quota used up (429)."),
            "policy": _field(
                "string",
                "The name of the limit or quota that refused (429): default, a named limit,"
                " quota, or owner.NAME / owner.quota for the owner's.",
            ),
        },
        "required": ["error", "detail"],
        "additionalProperties": False,
    }


def _field(json_type: str, description: str) -> dict[str, Any]:
    """A field of the error body: its JSON type and what it holds."""
    return {"type": json_type, "description": description}


def _keystile_classes() -> list[type[AuthenticationError]]:
    """The refusals keystile raises: the leaves of its exception tree."""
    module = AuthenticationError.__module__
    return [
        cls
        for cls in refusal_classes()
        if cls.__module__ == module
        and not any(sub.__module__ == module for sub in cls.__subclasses__())
    ]


def refusals(
    *, middleware: bool, required: bool, key_needed: bool, scopes: Iterable[str]
) -> tuple[list[type[AuthenticationError]], list[type[AuthenticationError]]]:
    """The classes of refusal an operation can meet: ``(from the middleware, from the
    app's keystile dependencies or guards)``.

    ``middleware``: the middleware protects the operation's path; ``key_needed``: a
    dependency or guard needs a key; ``scopes``: the scopes they require.
    """
    from_middleware = (
        [
            cls
            for cls in _keystile_classes()
            if cls is not InsufficientScope and (required or cls is not MissingCredentials)
        ]
        if middleware
        else []
    )
    from_app: list[type[AuthenticationError]] = []
    if key_needed and not (middleware and required):
        from_app.append(MissingCredentials)
    if any(scope != IMPLICIT_SCOPE for scope in scopes):
        from_app.append(InsufficientScope)
    return from_middleware, from_app


def refusal_responses(
    from_middleware: Iterable[type[AuthenticationError]],
    from_app: Iterable[type[AuthenticationError]],
    *,
    body_schema: Callable[[list[str]], dict[str, Any]],
    middleware_known: bool = True,
    app_known: bool = True,
) -> dict[str, dict[str, Any]]:
    """The OpenAPI responses of these refusals, one per status.

    ``body_schema(codes)`` is the schema of a body carrying one of ``codes``. A source
    whose responses the app replaced (``*_known=False``) leaves the status without a
    body and its headers optional. A header is required when every refusal of the status
    always sends it.
    """
    by_status: dict[int, list[tuple[type[AuthenticationError], bool]]] = {}
    for classes, known in ((from_middleware, middleware_known), (from_app, app_known)):
        for cls in classes:
            by_status.setdefault(cls.status_code, []).append((cls, known))
    responses: dict[str, dict[str, Any]] = {}
    for status in sorted(by_status):
        sources = by_status[status]
        known = all(is_known for _, is_known in sources)
        classes = list(dict.fromkeys(cls for cls, _ in sources))
        codes = list(dict.fromkeys(code_of(cls) for cls in classes))
        sent = [refusal_headers(cls) for cls, is_known in sources if is_known]
        names = list(dict.fromkeys(name for headers in sent for name in headers))
        response: dict[str, Any] = {
            "description": _describe(classes),
            "headers": {
                name: _header(name, required=known and all(h.get(name, False) for h in sent))
                for name in names
            },
        }
        if known:
            response["content"] = {"application/json": {"schema": body_schema(codes)}}
        responses[str(status)] = response
    return responses


def _describe(classes: list[type[AuthenticationError]]) -> str:
    lines: dict[str, list[str]] = {}
    for cls in classes:
        codes = lines.setdefault(cls.default_description, [])
        if code_of(cls) not in codes:
            codes.append(code_of(cls))
    return " ".join(
        f"{', '.join(f'`{code}`' for code in codes)}: {text}" for text, codes in lines.items()
    )


def _header(name: str, *, required: bool) -> dict[str, Any]:
    schema, description = _HEADERS.get(name, (_STRING, ""))
    return {"description": description, "required": required, "schema": deepcopy(schema)}


def merge_responses(responses: dict[str, Any], refusals: dict[str, dict[str, Any]]) -> None:
    """Add ``refusals`` to an operation's ``responses``. A status the operation documents
    already keeps its description; it gains keystile's headers (optional, since its other
    responses lack them) and keystile's body as an alternative to its own."""
    for status, ours in refusals.items():
        theirs = responses.get(status)
        if theirs is None:
            responses[status] = ours
            continue
        if not isinstance(theirs, dict) or "$ref" in theirs:
            continue
        headers = theirs.setdefault("headers", {})
        for name, header in ours["headers"].items():
            headers.setdefault(name, {**header, "required": False})
        body = ours.get("content", {}).get("application/json")
        if body is None:
            continue
        media = theirs.setdefault("content", {}).setdefault("application/json", {})
        if "schema" in media:
            media["schema"] = {"anyOf": [media["schema"], body["schema"]]}
        else:
            media["schema"] = body["schema"]


def add_rate_limit_headers(responses: dict[str, Any], *, except_statuses: Iterable[str]) -> None:
    """With ``rate_limit_headers=True`` the middleware adds ``RateLimit-Policy`` and
    ``RateLimit`` to whatever the app answers a key with a rate limit: optional headers on
    every response but the middleware's own refusals."""
    skipped = set(except_statuses)
    for status, response in responses.items():
        if status in skipped or not isinstance(response, dict) or "$ref" in response:
            continue
        headers = response.setdefault("headers", {})
        for name in ("RateLimit-Policy", "RateLimit"):
            headers.setdefault(name, _header(name, required=False))


def document_operation(
    operation: dict[str, Any],
    *,
    exempt: bool,
    required: bool,
    key_needed: bool,
    scopes: list[str],
    **options: Any,
) -> bool:
    """Document keystile on an operation of an OpenAPI document (a dict): its security
    requirements (either scheme, with ``scopes``; ``{}`` where a request without a key is
    let through; requirements of other schemes kept) and its refusals
    (:func:`document_refusals`, which takes ``options``). An operation keystile never
    refuses gets ``security: []``. Returns whether a response names the error body."""
    from_middleware, from_app = refusals(
        middleware=not exempt, required=required, key_needed=key_needed, scopes=scopes
    )
    if not from_middleware and not from_app:
        operation["security"] = []
        return False
    bearer, header = DEFAULT_BEARER_SCHEME_NAME, DEFAULT_HEADER_SCHEME_NAME
    others = [
        requirement
        for requirement in operation.get("security", ())
        if requirement and not {bearer, header} & set(requirement)
    ]
    anonymous = not key_needed and (exempt or not required)
    operation["security"] = [{bearer: scopes}, {header: list(scopes)}, *others]
    operation["security"] += [{}] if anonymous else []
    responses = operation.setdefault("responses", {})
    return document_refusals(responses, from_middleware, from_app, **options)


def document_refusals(
    responses: dict[str, Any],
    from_middleware: list[type[AuthenticationError]],
    from_app: list[type[AuthenticationError]],
    *,
    body_schema: Callable[[list[str]], dict[str, Any]],
    middleware_known: bool = True,
    app_known: bool = True,
    rate_limit_headers: bool = False,
) -> bool:
    """Add to an operation's ``responses`` the refusals it can meet (:func:`refusals`),
    and with ``rate_limit_headers`` the fields the middleware adds to what the app sends.
    Returns whether a response names the error body."""
    ours = refusal_responses(
        from_middleware,
        from_app,
        body_schema=body_schema,
        middleware_known=middleware_known,
        app_known=app_known,
    )
    merge_responses(responses, ours)
    if rate_limit_headers and from_middleware:
        app_statuses = {str(cls.status_code) for cls in from_app}
        add_rate_limit_headers(
            responses,
            except_statuses={str(c.status_code) for c in from_middleware} - app_statuses,
        )
    return any("content" in response for response in ours.values())


def fully_exempt(path: str, exact: frozenset[str], prefixes: tuple[str, ...]) -> bool:
    """Whether the middleware exempts every request path ``path`` (an OpenAPI route path,
    maybe with ``{parameters}``) routes: the middleware's rules (an exact path, or a
    ``prefix*``) applied to the part before the first parameter."""
    brace = path.find("{")
    if brace < 0:
        return path in exact or path.startswith(prefixes)
    return path[:brace].startswith(prefixes)
