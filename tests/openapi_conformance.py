"""What keystile sends, held against the OpenAPI document an adapter publishes.

Shared by the FastAPI and Litestar tests: the keys that make each refusal happen, one
check that a response's status, body and keystile headers are all documented (the
schemathesis response checks plus one for the headers keystile adds, which schemathesis
does not look for), and a bounded, deterministic schemathesis run over every operation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup

from apps import client
from keystile import AuthenticationError, KeyManager, MemoryKeyStore, StoreError

#: Every header keystile itself may put on a response.
KEYSTILE_HEADERS = (
    "www-authenticate",
    "retry-after",
    "ratelimit-policy",
    "ratelimit",
    "cache-control",
)
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
#: A well-formed key that no store holds: 401 invalid_token.
UNKNOWN_KEY = "ks_000000000000_" + "A" * 43


def keystile_headers_documented(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: each header keystile adds is declared for the status sent."""
    definition = case.operation.responses.find_by_status_code(response.status_code)
    declared = {name.lower() for name, _ in (definition.headers.items() if definition else ())}
    extra = [name for name in KEYSTILE_HEADERS if name in response.headers and name not in declared]
    if extra:
        raise AssertionError(
            f"{case.operation.label} {response.status_code}: undocumented header(s) {extra}"
        )
    return None


CHECKS = [
    status_code_conformance,
    response_headers_conformance,
    response_schema_conformance,
    content_type_conformance,
    keystile_headers_documented,
]


class DownStore(MemoryKeyStore):
    """A store that cannot be read: every key not yet cached gets 503."""

    async def get(self, key_id: str) -> None:
        raise StoreError("connection refused")


@dataclass(frozen=True)
class Keys:
    """One key per refusal a valid key can meet."""

    full: str  # every scope, no limits
    reader: str  # lacks items:write
    writer: str  # lacks items:read
    remote: str  # allowed only from 10.0.0.0/8 (the test client is 127.0.0.1)
    limited: str  # 1/minute: the second request is 429 rate_limited
    used_up: str  # a quota of 1 without refill: 429 quota_exceeded, no Retry-After
    refilling: str  # a quota of 1 refilled daily: 429 quota_exceeded with Retry-After


async def make_keys(manager: KeyManager) -> Keys:
    both = ["items:read", "items:write"]

    async def key(name: str, scopes: list[str] = both, **options: Any) -> str:
        return (await manager.create(owner="acme", name=name, scopes=scopes, **options)).key

    return Keys(
        full=await key("full"),
        reader=await key("reader", ["items:read"]),
        writer=await key("writer", ["items:write"]),
        remote=await key("remote", ip_allowlist=["10.0.0.0/8"]),
        limited=await key("limited", rate_limit="1/minute"),
        used_up=await key("used_up", quota=1),
        refilling=await key("refilling", quota=1, quota_refill="1d"),
    )


def error_codes() -> set[str]:
    """Every ``error`` code keystile's bodies carry, found by rendering one of each failure."""
    from keystile.errors import (
        InsufficientScope,
        InvalidRequest,
        InvalidToken,
        IPNotAllowed,
        MissingCredentials,
        QuotaExceeded,
        RateLimited,
        ServiceUnavailable,
        TooManyRequests,
    )
    from keystile.responses import error_response

    samples: dict[type[AuthenticationError], AuthenticationError] = {
        AuthenticationError: AuthenticationError("any"),
        MissingCredentials: MissingCredentials(),
        InvalidRequest: InvalidRequest("empty_token"),
        InvalidToken: InvalidToken("unknown"),
        InsufficientScope: InsufficientScope(("a",), ("a",)),
        IPNotAllowed: IPNotAllowed(),
        ServiceUnavailable: ServiceUnavailable("store_unavailable"),
        TooManyRequests: TooManyRequests("limited"),
        RateLimited: RateLimited("1/second", retry_after=1),
        QuotaExceeded: QuotaExceeded(1),
    }
    pending = [AuthenticationError]
    while pending:
        cls = pending.pop()
        assert cls in samples, f"no sample failure of {cls.__name__}"
        pending += cls.__subclasses__()
    codes = set()
    for exc in samples.values():
        response = error_response(exc, realm="api", header_name="X-API-Key")
        codes.add(httpx.Response(200, content=response.body).json()["error"])
    return codes


_loaded: dict[int, tuple[dict[str, Any], Any]] = {}


def load(document: dict[str, Any]) -> Any:
    """The document as a schemathesis schema, loaded once (loading takes most of a second)."""
    entry = _loaded.get(id(document))
    if entry is None or entry[0] is not document:
        entry = _loaded[id(document)] = (document, schemathesis.openapi.from_dict(document))
    return entry[1]


def failures(document: dict[str, Any], path: str, method: str, response: httpx.Response) -> str:
    """What in ``response`` (to ``method`` on the operation of route ``path``) the
    document does not say; empty when all of it is documented."""
    schema = load(document)
    sent = response.request.url.path.split("/")
    parameters = {
        part[1:-1]: value
        for part, value in zip(path.split("/"), sent, strict=False)
        if part.startswith("{") and part.endswith("}")
    }
    case = schema[path][method.upper()].Case(path_parameters=parameters)
    try:
        case.validate_response(response, checks=CHECKS)
    except (AssertionError, FailureGroup) as failed:
        return str(failed)
    return ""


def declared_headers(document: dict[str, Any], path: str, method: str, status: int) -> set[str]:
    response = document["paths"][path][method.lower()]["responses"].get(str(status), {})
    return {name.lower() for name in response.get("headers", {})}


def keystile_headers(response: httpx.Response) -> set[str]:
    return {name for name in KEYSTILE_HEADERS if name in response.headers}


def sent_against_declared(
    document: dict[str, Any], sent: Iterable[tuple[str, str, httpx.Response]]
) -> dict[tuple[str, str, int], tuple[set[str], set[str]]]:
    """For each (path, method, status) seen: (headers sent, headers declared), where
    they differ. Headers sent are the union over every response of that status."""
    union: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for path, method, response in sent:
        union[path, method, response.status_code] |= keystile_headers(response)
    differences = {}
    for (path, method, status), headers in union.items():
        declared = declared_headers(document, path, method, status)
        if headers != declared:
            differences[path, method, status] = (headers, declared)
    return differences


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


def scenarios(keys: Keys) -> list[tuple[str, str, str, str, dict[str, str], int, int, str]]:
    """Every refusal, on an app with ``GET /whoami`` (a key, no scope), ``GET
    /items/{item_id}`` (items:read), ``POST /items`` (items:write, a JSON ``name``) and
    ``GET /mine`` (exempt, but its dependency or guard needs items:read): ``(what,
    method, path template, path, credentials, times sent, status, error code)``."""
    return [
        ("no key", "GET", "/whoami", "/whoami", {}, 1, 401, "unauthorized"),
        ("unknown key", "GET", "/whoami", "/whoami", key(UNKNOWN_KEY), 1, 401, "invalid_token"),
        (
            "two keys",
            "GET",
            "/whoami",
            "/whoami",
            {"Authorization": f"Bearer {keys.full}", "X-API-Key": keys.reader},
            1,
            400,
            "invalid_request",
        ),
        (
            "outside allowlist",
            "GET",
            "/whoami",
            "/whoami",
            key(keys.remote),
            1,
            403,
            "ip_not_allowed",
        ),
        ("over rate", "GET", "/whoami", "/whoami", key(keys.limited), 2, 429, "rate_limited"),
        ("quota used", "GET", "/whoami", "/whoami", key(keys.used_up), 2, 429, "quota_exceeded"),
        ("quota due", "GET", "/whoami", "/whoami", key(keys.refilling), 2, 429, "quota_exceeded"),
        ("no key, scoped", "GET", "/items/{item_id}", "/items/1", {}, 1, 401, "unauthorized"),
        (
            "missing scope, read",
            "GET",
            "/items/{item_id}",
            "/items/1",
            key(keys.writer),
            1,
            403,
            "insufficient_scope",
        ),
        (
            "outside allowlist, scoped",
            "GET",
            "/items/{item_id}",
            "/items/1",
            key(keys.remote),
            1,
            403,
            "ip_not_allowed",
        ),
        (
            "missing scope",
            "POST",
            "/items",
            "/items",
            key(keys.reader),
            1,
            403,
            "insufficient_scope",
        ),
        (
            "outside allowlist, write",
            "POST",
            "/items",
            "/items",
            key(keys.remote),
            1,
            403,
            "ip_not_allowed",
        ),
        ("exempt, dependency", "GET", "/mine", "/mine", {}, 1, 401, "unauthorized"),
    ]


Sent = tuple[str, str, str, httpx.Response, int, str]


async def send_all(app: Any, down: Any, keys: Keys) -> list[Sent]:
    """Make every refusal happen, on ``app`` (the routes of :func:`scenarios`) and on
    ``down`` (the same over a store that cannot be read: 503). Returns, per refusal,
    ``(what, method, path template, response, status meant, error code meant)``."""
    sent = []
    async with client(app) as c:
        for what, method, template, path, headers, times, status, code in scenarios(keys):
            body = {"name": "tea"} if method == "POST" else None
            for _ in range(times):
                response = await c.request(method, path, headers=headers, json=body)
            sent.append((what, method, template, response, status, code))
    async with client(down) as c:
        response = await c.get("/whoami", headers=key(keys.full))
    sent.append(("store down", "GET", "/whoami", response, 503, "temporarily_unavailable"))
    return sent


def generated_cases(document: dict[str, Any], count: int) -> list[Any]:
    """``count`` schemathesis cases over every operation, the same on every run."""
    schema = load(document)
    cases: list[Any] = []

    @given(case=schema.as_strategy())
    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def collect(case: Any) -> None:
        cases.append(case)

    collect()
    return cases


async def fuzz(
    client: httpx.AsyncClient,
    document: dict[str, Any],
    credentials: Mapping[str, Mapping[str, str] | None],
    *,
    count: int = 25,
) -> tuple[list[str], dict[str, set[int]]]:
    """Send generated cases with each set of credentials: ``None`` keeps the ones
    schemathesis generated for the security schemes (random strings), a mapping replaces
    them. Returns what the checks found and the statuses each set of credentials met."""
    found: list[str] = []
    statuses: dict[str, set[int]] = defaultdict(set)
    cases = generated_cases(document, count)
    for name, headers in credentials.items():
        for case in cases:
            sent = case.as_transport_kwargs(base_url=str(client.base_url))
            request_headers = dict(sent.get("headers") or {})
            if headers is not None:
                request_headers = {
                    k: v for k, v in request_headers.items() if k.lower() not in CREDENTIAL_HEADERS
                }
                request_headers.update(headers)
            response = await client.request(
                sent["method"],
                sent["url"],
                headers=request_headers,
                params=sent.get("params"),
                json=sent.get("json"),
                content=sent.get("data"),
            )
            statuses[name].add(response.status_code)
            try:
                case.validate_response(response, checks=CHECKS)
            except (AssertionError, FailureGroup) as failed:
                found.append(f"[{name}] {failed}")
    return found, statuses
