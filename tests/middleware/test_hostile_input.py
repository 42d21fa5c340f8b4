"""Hostile header bytes through the real ASGI middleware.

Hypothesis builds raw ASGI header lists, which no HTTP client would send: duplicated
``Authorization`` and ``X-API-Key`` headers, odd scheme casing, tabs, NUL and non-ASCII
bytes, 64 KB values, key-shaped tokens with bad checksums, good checksums with unknown
ids, real ids with wrong secrets, the real keys themselves. The invariants:

* never a 5xx and never an exception out of the middleware;
* the app is reached exactly when the one presented credential is the valid key, and
  then as that key's principal, with the credential headers stripped from its scope;
* the status and ``WWW-Authenticate`` are the RFC 6750 ones that ``expected`` names (the
  README's error table, written down independently of ``keystile.credentials``);
* only a caller holding the expired or revoked key's secret is told "expired"/"revoked";
* no secret or presented key-shaped token in any response or log record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyRecord, MemoryKeyStore
from keystile.hashing import SecretHasher
from keystile.tokens import generate_key

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
GENERIC = "The API key is not valid."
DISCLOSED = {"expired": "The API key has expired.", "revoked": "The API key has been revoked."}
WHITESPACE = b" \t\n\r\x0b\x0c"


# -- the world: real keys in a store, the middleware over a recording app --------------

# Minted at import, so that the strategies below can name them: Hypothesis draws
# arguments before the test runs, outside the event loop, as it must (a draw that runs
# out of data inside anyio's runner task would end the runner).
VALID, VALID_PARTS = generate_key()
EXPIRED, EXPIRED_PARTS = generate_key()
REVOKED, REVOKED_PARTS = generate_key()
REAL_IDS = [VALID_PARTS.key_id, EXPIRED_PARTS.key_id, REVOKED_PARTS.key_id]
#: The secret part of every real key: never to be echoed or logged.
SECRETS = [p.secret for p in (VALID_PARTS, EXPIRED_PARTS, REVOKED_PARTS)]


@dataclass
class Reached:
    users: list[Any] = field(default_factory=list)
    headers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)


@dataclass
class World:
    app: APIKeyMiddleware
    reached: Reached


@pytest.fixture
async def world(hit_path: str) -> AsyncIterator[World]:
    """The middleware on the compiled hit path and on the pure-Python one."""
    store = MemoryKeyStore()
    hasher = SecretHasher(CHEAPEST_PARAMETERS)
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    for name, parts, expires_at in (
        ("valid", VALID_PARTS, None),
        ("expired", EXPIRED_PARTS, past),
        ("revoked", REVOKED_PARTS, None),
    ):
        record = KeyRecord(
            id=parts.key_id,
            owner="acme",
            name=name,
            prefix=parts.prefix,
            secret_hash=hasher.hash(parts.secret),
            scopes=("read",),
            created_at=past - timedelta(hours=1),
            expires_at=expires_at,
        )
        await store.insert(record)
    assert await store.revoke(REVOKED_PARTS.key_id, "acme", at=past)
    reached = Reached()

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.users.append(scope["user"])
        reached.headers.append(list(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"reached"})

    app = APIKeyMiddleware(inner, store=store, argon2=CHEAPEST_PARAMETERS)
    assert app.verifier.cache.compiled == (hit_path == "compiled")
    yield World(app, reached)
    await app.aclose()


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    reached: bool

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


async def call(world: World, headers: list[tuple[bytes, bytes]]) -> Answer:
    """One raw HTTP request through the middleware; an exception counts as a 500."""
    before = len(world.reached.users)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/whoami",
        "raw_path": b"/whoami",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await world.app(scope, receive, send)
    except Exception as exc:  # a server would answer 500: a failed invariant
        return Answer(500, {}, repr(exc).encode(), len(world.reached.users) > before)
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return Answer(start["status"], dict(start["headers"]), body, len(world.reached.users) > before)


# -- the rules, written from the design (§5), not from the implementation --------------


def expected(headers: list[tuple[bytes, bytes]]) -> tuple[int, str | None]:
    """The status and RFC 6750 ``error`` the request must get (``None``: none/bare)."""
    tokens: list[bytes] = []
    for name, value in headers:
        if name == b"authorization":
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != b"bearer":
                continue  # another scheme: as if nothing were sent
            tokens.append(parts[1].strip() if len(parts) == 2 else b"")
        elif name == b"x-api-key" and value.strip():
            tokens.append(value.strip())  # an empty one is nothing sent
    if not tokens:
        return 401, None
    if any(not t or b" " in t or b"\t" in t for t in tokens) or len(set(tokens)) > 1:
        return 400, "invalid_request"
    if tokens[0] == VALID.encode():
        return 200, None
    return 401, "invalid_token"


def check(answer: Answer, headers: list[tuple[bytes, bytes]], world: World) -> None:
    status, error = expected(headers)
    event(f"status {answer.status}")
    assert answer.status < 500, answer.body
    assert answer.status == status, (headers, answer)
    assert answer.reached == (status == 200)
    if status == 200:
        user = world.reached.users[-1]
        assert user.key_id == VALID_PARTS.key_id
        # strip_credentials=True: the key is gone; another Authorization scheme stays.
        for name, value in world.reached.headers[-1]:
            assert name != b"x-api-key"
            if name == b"authorization":
                scheme = value.split(None, 1)[:1]
                assert not scheme or scheme[0].lower() != b"bearer"  # empty: no credential
        return
    challenge = answer.headers[b"www-authenticate"].decode("latin-1")
    body = answer.json()
    if error is None:
        assert challenge == 'Bearer realm="api"'
        assert body["error"] == "unauthorized"
    else:
        assert challenge.startswith(f'Bearer realm="api", error="{error}"')
        assert body["error"] == error
    if error == "invalid_token":
        presented = {v.strip() for _, v in headers}
        allowed = {GENERIC}
        for state, key in (("expired", EXPIRED), ("revoked", REVOKED)):
            if any(key.encode() in v for v in presented):
                allowed.add(DISCLOSED[state])
        assert body["detail"] in allowed
    assert_no_leak(answer.body + b"".join(answer.headers.values()), headers)


def assert_no_leak(text: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """No real secret, and no presented key-shaped token, appears in ``text``."""
    for secret in SECRETS:
        assert secret.encode() not in text
    for _, value in headers:
        for token in value.split():
            if len(token) >= 40:
                assert token not in text


# -- strategies ---------------------------------------------------------------------------

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@st.composite
def hostile_tokens(draw: st.DrawFn) -> bytes:
    """A key-shaped or random token: one of the ways a key can be wrong (or right)."""
    kind = draw(
        st.sampled_from(
            [
                *["valid"] * 4,  # so that a good share of requests should pass
                "expired",
                "revoked",
                "wrong_secret",
                "unknown_id",
                "bad_checksum",
                "mutated",
                "truncated",
                "other_prefix",
                "random_text",
                "random_bytes",
                "huge",
            ]
        )
    )
    if kind in ("valid", "expired", "revoked"):
        return {"valid": VALID, "expired": EXPIRED, "revoked": REVOKED}[kind].encode()
    if kind == "wrong_secret":  # a real id, a valid checksum, the wrong secret
        return generate_key(key_id=draw(st.sampled_from(REAL_IDS)))[0].encode()
    if kind == "unknown_id":
        return generate_key()[0].encode()
    if kind == "other_prefix":
        real = draw(st.sampled_from(REAL_IDS))
        return generate_key(prefix=draw(st.sampled_from(["zz", "k", "ksx"])), key_id=real)[
            0
        ].encode()
    base = draw(st.sampled_from([VALID, EXPIRED, REVOKED]))
    if kind in ("bad_checksum", "mutated"):
        lo = len(base) - 6 if kind == "bad_checksum" else 0
        i = draw(st.integers(lo, len(base) - 1))
        c = draw(st.sampled_from(ALPHABET).filter(lambda c: c != base[i]))
        return (base[:i] + c + base[i + 1 :]).encode()
    if kind == "truncated":
        return base[: draw(st.integers(1, len(base) - 1))].encode()
    if kind == "random_text":
        return draw(st.text(min_size=1, max_size=80)).encode("utf-8", "surrogatepass")
    if kind == "random_bytes":
        return draw(st.binary(min_size=1, max_size=80))
    unit = draw(st.binary(min_size=1, max_size=8))
    return (unit * (65536 // len(unit) + 1))[:65536]


@st.composite
def credential_headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    token = draw(hostile_tokens())
    pad = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t "])
    if draw(st.booleans()):
        return b"x-api-key", draw(pad) + token + draw(pad)
    scheme = draw(st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"bEaReR", b"Basic", b"Token"]))
    sep = draw(st.sampled_from([b" ", b"\t", b"   ", b" \t"]))
    return b"authorization", draw(pad) + scheme + sep + token + draw(pad)


NOISE = st.tuples(
    st.sampled_from([b"host", b"user-agent", b"x-api-keys", b"authorisation", b"cookie"]),
    st.binary(max_size=40),
)


@st.composite
def structured_requests(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """0-3 credential headers (often the same one twice) among noise, in any order."""
    creds = draw(st.lists(credential_headers(), max_size=3))
    if creds and draw(st.booleans()):
        creds.append(draw(st.sampled_from(creds)))  # the header repeated, same value
    headers = creds + draw(st.lists(NOISE, max_size=3))
    return draw(st.permutations(headers))


@st.composite
def raw_requests(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Arbitrary bytes under the credential header names (NUL, CR, LF, non-ASCII, ...)."""
    names = st.sampled_from([b"authorization", b"x-api-key", b"x-other"])
    value = st.one_of(
        st.binary(max_size=120),
        st.builds(lambda v: b"Bearer " + v, st.binary(max_size=120)),
        st.builds(lambda v: b"bearer\x00" + v, st.binary(max_size=40)),
        st.builds(lambda t: b"Bearer " + t, hostile_tokens()),
        st.builds(lambda t, b: t + b, hostile_tokens(), st.binary(min_size=1, max_size=4)),
    )
    return draw(st.lists(st.tuples(names, value), max_size=4))


# -- the properties -------------------------------------------------------------------------


@SETTINGS
@given(headers=structured_requests())
async def test_structured_credentials_get_the_rfc6750_answer(
    world: World, headers: list[tuple[bytes, bytes]]
) -> None:
    """Key-shaped, duplicated and oddly formatted credentials: the right status, no pass."""
    check(await call(world, headers), headers, world)


@SETTINGS
@given(headers=raw_requests())
async def test_arbitrary_header_bytes_never_pass_or_fail_open(
    world: World, headers: list[tuple[bytes, bytes]]
) -> None:
    """Raw bytes under the credential headers: never a 5xx, never the app without the key."""
    check(await call(world, headers), headers, world)


@settings(SETTINGS, max_examples=60)
@given(
    real_id=st.sampled_from(REAL_IDS),
    header=st.sampled_from([(b"x-api-key", b""), (b"authorization", b"Bearer ")]),
)
async def test_wrong_secrets_for_real_ids_look_like_unknown_ids(
    world: World, real_id: str, header: tuple[bytes, bytes]
) -> None:
    """A real id with a wrong secret gets the byte-identical answer an unknown id gets."""
    name, scheme = header
    wrong, unknown = generate_key(key_id=real_id)[0], generate_key()[0]
    answers = [await call(world, [(name, scheme + t.encode())]) for t in (wrong, unknown)]
    assert answers[0].status == answers[1].status == 401
    assert answers[0].body == answers[1].body
    assert answers[0].headers == answers[1].headers
    assert not answers[0].reached


@settings(SETTINGS, max_examples=150)
@given(headers=structured_requests())
async def test_no_secret_or_presented_key_in_any_log_record(
    world: World, headers: list[tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG logging, no log record carries a real secret or a presented key."""
    caplog.set_level(logging.DEBUG)
    await call(world, headers)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = "\n".join(formatter.format(r) + repr(r.args) for r in caplog.records)
    assert_no_leak(logged.encode("utf-8", "surrogateescape"), headers)
