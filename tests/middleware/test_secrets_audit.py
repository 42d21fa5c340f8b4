"""Secrets audit: a key's secret never leaves the request.

Over every store, with logging at DEBUG: keys are created, used, refused, rotated,
revoked and reaped, through the middleware and the CLI, and every log record, exception
(message, repr, cause), object repr, response body and header, and the scope handed to
the app is searched for each plaintext key, its secret part and its stored hash. The
only allowed appearance is the one ``keystile create``/``rotate`` makes on purpose: the
new key, once, on stdout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from starlette.requests import HTTPConnection
from starlette.responses import Response

from apps import client, inner_app
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    AuthenticationError,
    KeyManager,
    KeyRecord,
    StoreError,
)
from keystile.cli import main as cli
from keystile.credentials import extract_credential
from keystile.responses import error_response
from keystile.stores import store_from_url
from keystile.tokens import generate_key, parse_key

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hit_path")]


def forbidden(plaintext: str) -> list[str]:
    """The plaintext, its secret and its secret-plus-checksum: none may show anywhere."""
    tail = plaintext.split("_")[2]
    return [plaintext, tail, tail[:43]]


def hits(texts: Iterable[str], needles: Iterable[str]) -> list[str]:
    texts = list(texts)
    return [
        f"{needle[:12]}… in {text[:120]!r}"
        for needle in needles
        for text in texts
        if needle in text
    ]


class FlakyStore:
    """A real store whose next ``get`` fails, to drive keystile's own error logging."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.fail_next: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get(self, key_id: str) -> KeyRecord | None:
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure
        record: KeyRecord | None = await self._store.get(key_id)
        return record


def log_texts(records: Iterable[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) + repr(r.args) for r in records]


def exception_texts(exc: BaseException) -> list[str]:
    texts = []
    while exc is not None:
        texts += [str(exc), repr(exc), repr(exc.args), repr(vars(exc))]
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return texts


async def test_lifecycle_through_the_middleware_leaks_no_secret(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Create, authenticate, fail, rotate, revoke, reap at DEBUG: zero hits anywhere."""
    caplog.set_level(logging.DEBUG)
    refusals: list[AuthenticationError] = []
    downstream: list[str] = []
    texts: list[str] = []

    def on_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
        refusals.append(exc)
        return error_response(exc, realm="api", header_name="X-API-Key")

    inner = inner_app()

    async def recording_app(scope: Any, receive: Any, send: Any) -> None:
        downstream.append(repr(scope))
        await inner(scope, receive, send)

    manager = KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS)
    store = FlakyStore(store_from_url(database_url))
    app = APIKeyMiddleware(
        recording_app, store=store, argon2=CHEAPEST_PARAMETERS, on_error=on_error
    )
    async with manager, client(app) as c:
        a = await manager.create(owner="acme", name="a", scopes=["read"])
        b = await manager.create(owner="acme", name="b")
        wrong = generate_key(key_id=a.id)[0]

        async def send(**headers: str) -> int:
            named = {k.replace("_", "-"): v for k, v in headers.items()}
            r = await c.get("/whoami", headers=named)
            texts.extend([r.text, repr(dict(r.headers))])
            return r.status_code

        statuses = [
            await send(authorization=f"Bearer {a.key}"),
            await send(x_api_key=a.key),
            await send(x_api_key=wrong),
            await send(x_api_key=a.key[:-1] + ("A" if a.key[-1] != "A" else "B")),
            await send(x_api_key=a.key[:30]),
            await send(authorization=f"Bearer {a.key}", x_api_key=b.key),
            await send(authorization=f"Bearer {wrong}", x_api_key=wrong),
        ]
        for failure in (StoreError("connection refused"), RuntimeError("a bug in a store")):
            store.fail_next = failure  # logged by keystile: a warning, then a traceback
            statuses.append(await send(x_api_key=b.key))
        a2 = await manager.rotate(a.id, owner="acme", grace=timedelta(hours=1))
        statuses += [await send(x_api_key=a.key), await send(x_api_key=a2.key)]
        assert await manager.revoke(b.id, owner="acme")
        statuses.append(await send(x_api_key=b.key))
        await app.recorder.flush()
        reaped = await manager.reap(unused_for=timedelta(0))
        statuses.append(await send(authorization=f"Bearer {a2.key}"))
        records = await manager.list("acme")

        parsed = parse_key(a2.key)
        credential = extract_credential([(b"x-api-key", a2.key.encode())], b"x-api-key")
        texts += [repr(x) for x in (a, a2, b, parsed, credential, app, store, manager)]
        texts += [repr(r) for r in [*records, *reaped]]
        texts += [json.dumps(r.to_public_dict()) for r in records]
        texts.append(json.dumps(app.stats().as_dict()))
    await app.aclose()
    await store.close()

    assert statuses == [200, 200, 401, 401, 401, 400, 401, 503, 503, 200, 200, 401, 401]
    assert {e.reason for e in refusals} >= {"wrong_secret", "bad_checksum", "revoked"}
    for exc in refusals:
        texts += exception_texts(exc)
    texts += downstream + log_texts(caplog.records)
    assert sum(r.name.startswith("keystile") for r in caplog.records) >= 2
    secrets = [s for key in (a.key, a2.key, b.key, wrong) for s in forbidden(key)]
    hashes = [r.secret_hash for r in records]
    assert len(hashes) == 3
    assert hits(texts, secrets + hashes) == []
    assert all("x-api-key" not in s.lower() and "authorization" not in s for s in downstream)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    """The CLI as a user runs it: in a thread of its own, outside the test runner's event
    loop context (the async Postgres fixture leaves it marked as running asyncio)."""
    with ThreadPoolExecutor(1) as thread:
        assert thread.submit(cli, list(argv)).result() == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_cli_shows_each_key_once_on_stdout_and_nowhere_else(
    anyio_backend: str,  # the Postgres fixture is async; the CLI runs its own event loop
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """create and rotate print the new key once on stdout; no other output shows a secret."""
    caplog.set_level(logging.DEBUG)
    url = ["--database-url", database_url]
    keys: list[str] = []
    outputs: list[tuple[str, str]] = []

    def minted(out: str, err: str, *, as_json: bool) -> str:
        key: str = json.loads(out)["key"] if as_json else out.strip()
        parse_key(key)
        for secret in forbidden(key):
            assert secret not in err
        assert out.count(key) == 1
        keys.append(key)
        return key

    minted(*run(capsys, *url, "create", "--owner", "acme", "--name", "a"), as_json=False)
    first = parse_key(keys[0]).key_id
    minted(*run(capsys, *url, "create", "--owner", "acme", "--name", "b", "--json"), as_json=True)
    minted(*run(capsys, *url, "rotate", first, "--owner", "acme"), as_json=False)
    outputs.append(run(capsys, *url, "list", "--owner", "acme"))
    outputs.append(run(capsys, *url, "list", "--owner", "acme", "--json"))
    outputs.append(run(capsys, *url, "show", first, "--owner", "acme", "--json"))
    outputs.append(run(capsys, *url, "revoke", first, "--owner", "acme"))
    outputs.append(run(capsys, *url, "reap", "--unused-for", "0s", "--dry-run", "--json"))
    outputs.append(run(capsys, *url, "reap", "--unused-for", "0s"))

    records = [json.loads(line) for line in outputs[1][0].splitlines()]  # JSON Lines
    assert len(records) == 3
    secrets = [s for key in keys for s in forbidden(key)]
    texts = [text for pair in outputs for text in pair] + log_texts(caplog.records)
    assert hits(texts, secrets) == []
    assert all("secret_hash" not in r and "hash" not in json.dumps(r) for r in records)


def test_reprs_of_key_objects_show_no_secret() -> None:
    """repr of a parsed key, a credential, a record and a created key: no secret, no hash."""
    from keystile.manager import CreatedKey

    key, parts = generate_key()
    record = KeyRecord(
        id=parts.key_id, owner="o", name="n", prefix="ks", secret_hash="$argon2id$hash"
    )
    credential = extract_credential([(b"authorization", f"Bearer {key}".encode())], b"x-api-key")
    objects = [parts, credential, record, CreatedKey(key, record)]
    assert hits([repr(o) for o in objects], [*forbidden(key), "$argon2id$hash"]) == []
    assert parts.key_id in repr(CreatedKey(key, record))  # the public id is what shows
