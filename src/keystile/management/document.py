"""The management API's OpenAPI 3.1 document, and each operation's part of it (which
``keystile.fastapi.key_management_router`` hands to FastAPI, so the endpoints show in the
app's own ``/docs``)."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["OPERATIONS", "SCHEMAS", "management_document", "operation"]

_TIME = {"type": ["string", "null"], "format": "date-time"}
_TEXTS = {"type": "array", "items": {"type": "string"}}
_DURATION = {
    "type": ["string", "number"],
    "description": "A duration: '90d', '1h30m', or a number of seconds.",
}

SCHEMAS: dict[str, Any] = {
    "KeystileError": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    },
    "Key": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "owner": {"type": "string"},
            "name": {"type": "string"},
            "prefix": {"type": "string"},
            "redacted": {"type": "string"},
            "scopes": _TEXTS,
            "metadata": {"type": "object"},
            "status": {"enum": ["active", "disabled", "expired", "revoked"]},
            "created_at": _TIME,
            "expires_at": _TIME,
            "last_used_at": _TIME,
            "revoked_at": _TIME,
            "disabled_at": _TIME,
            "replaces": {"type": ["string", "null"]},
            "replaced_by": {"type": ["string", "null"]},
            "rate_limit": {"type": ["string", "null"]},
            "quota": {"type": ["integer", "null"]},
            "quota_remaining": {"type": ["integer", "null"]},
            "quota_refill": {"type": ["number", "null"]},
            "quota_next_refill": _TIME,
            "ip_allowlist": _TEXTS,
        },
    },
    "NewKey": {
        "description": "A key with its secret, shown this once (Cache-Control: no-store).",
        "allOf": [
            {"$ref": "#/components/schemas/Key"},
            {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}},
        ],
    },
    "KeyCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "scopes": {**_TEXTS, "description": "Only scopes the policy grants."},
            "metadata": {"type": ["object", "null"]},
            "expires_in": _DURATION,
            "expires_at": _TIME,
            "ip_allowlist": {"type": ["array", "null"], "items": {"type": "string"}},
            "replace": {"type": "boolean", "description": "Revoke the live key of this name."},
        },
    },
    "KeyUpdate": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "scopes": _TEXTS,
            "metadata": {"type": ["object", "null"]},
            "expires_in": _DURATION,
            "expires_at": _TIME,
            "ip_allowlist": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "Rotation": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"grace": _DURATION},
    },
    "KeyList": {
        "type": "object",
        "properties": {"keys": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}}},
    },
    "Usage": {
        "type": "object",
        "properties": {
            "key_id": {"type": "string"},
            "by": {"enum": ["minute", "hour", "day"]},
            "buckets": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Events": {
        "type": "object",
        "properties": {"events": {"type": "array", "items": {"type": "object"}}},
    },
}

_REFUSALS = {
    "400": "Malformed JSON.",
    "401": "Nobody signed in (the app's owner callable returned None).",
    "403": "The policy refuses it (a scope not grantable, too many keys, too long a life).",
    "404": "No such key of yours (another owner's key is answered the same way).",
    "409": "A live key has this name, or the key was already rotated, revoked or expired.",
    "413": "The body is too large.",
    "415": "The body is not sent as application/json.",
    "422": "An unknown field, or a field of the wrong form.",
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}

#: (method, path) -> (summary, body schema or None, success status, success schema, query)
OPERATIONS: dict[tuple[str, str], tuple[str, str | None, str, str, list[dict[str, Any]]]] = {
    ("get", "/"): (
        "List your keys",
        None,
        "200",
        "KeyList",
        [
            _query("state", {"enum": ["active", "disabled", "expired", "revoked"]}, "Only these."),
            _query("name_prefix", {"type": "string"}, "Names starting with this."),
            _query("expiring_within", {"type": "string"}, "Active keys expiring within ('7d')."),
        ],
    ),
    ("post", "/"): ("Create a key", "KeyCreate", "201", "NewKey", []),
    ("get", "/{key_id}"): ("One of your keys", None, "200", "Key", []),
    ("patch", "/{key_id}"): ("Change a key", "KeyUpdate", "200", "Key", []),
    ("delete", "/{key_id}"): ("Revoke a key", None, "200", "Key", []),
    ("post", "/{key_id}/rotate"): ("Rotate a key", "Rotation", "201", "NewKey", []),
    ("get", "/{key_id}/usage"): (
        "A key's usage",
        None,
        "200",
        "Usage",
        [
            _query("since", {"type": "string"}, "How far back ('24h', at most '90d')."),
            _query("by", {"enum": ["minute", "hour", "day"]}, "The period of a bucket."),
        ],
    ),
    ("get", "/{key_id}/events"): (
        "A key's audit log",
        None,
        "200",
        "Events",
        [_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "The newest N.")],
    ),
}


def _inlined(node: Any) -> Any:
    """``node`` with every ``$ref`` to a schema here replaced by the schema itself."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inlined(SCHEMAS[ref.rsplit("/", 1)[1]])
        return {key: _inlined(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_inlined(item) for item in node]
    return node


def operation(method: str, path: str, *, inline: bool = False) -> dict[str, Any]:
    """The OpenAPI operation object of one endpoint (its refusals in the error body);
    ``inline``: its schemas written out, for a document whose components are not these."""
    summary, body, status, schema, query = OPERATIONS[(method, path)]
    responses: dict[str, Any] = {status: {"description": summary, "content": _json(schema)}}
    for code, description in _REFUSALS.items():
        responses[code] = {"description": description, "content": _json("KeystileError")}
    name = path.replace("{key_id}", "key").strip("/").replace("/", "_") or "keys"
    result: dict[str, Any] = {
        "summary": summary,
        "operationId": f"{method}_{name}",
        "parameters": ([_ID] if "{key_id}" in path else []) + query,
        "responses": responses,
    }
    if body is not None:
        result["requestBody"] = {"required": body == "KeyCreate", "content": _json(body)}
    return _inlined(result) if inline else copy.deepcopy(result)


def management_document(*, server: str = "/") -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, served at ``openapi.json`` beside the endpoints."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path in OPERATIONS:
        paths.setdefault(path, {})[method] = operation(method, path)
    return {
        "openapi": "3.1.0",
        "info": {"title": "API keys", "version": "1"},
        "servers": [{"url": server}],
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS)},
    }
