"""The secret-scanning endpoint through real ASGI requests on every store: a signed report
revokes, disables or only reports a leaked key, always audited as ``leaked``; every forged,
replayed, oversized or malformed report is refused and changes nothing."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest

from github_signing import SigningKey, post, report
from keystile import CHEAPEST_PARAMETERS, KeyManager, KeyStore
from keystile.errors import ConfigurationError, StoreError
from keystile.scanning import SCANNING_ACTOR, secret_scanning_app
from keystile.stores import KeyRecord, MemoryKeyStore
from keystile.tokens import generate_key

pytestmark = pytest.mark.anyio

GITHUB = SigningKey.generate("github-key-1")


def manager(store: KeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS, actor="tests")


def endpoint(store: KeyStore, **options: Any) -> Any:
    return secret_scanning_app(
        manager=manager(store), public_keys={GITHUB.identifier: GITHUB.pem}, **options
    )


async def unchanged(store: KeyStore, *key_ids: str) -> bool:
    """No key revoked or disabled and no event beyond ``created``."""
    records = [await store.get(key_id) for key_id in key_ids]
    events = await store.list_events()
    return all(r is not None and r.is_active() for r in records) and {e.action for e in events} <= {
        "created"
    }


@pytest.mark.parametrize(
    ("action", "status", "outcome"),
    [
        ("revoke", "revoked", "revoked"),
        ("disable", "disabled", "disabled"),
        ("report", "active", "reported"),
    ],
)
async def test_a_leaked_key_is_acted_on_and_audited(
    store: KeyStore, action: str, status: str, outcome: str
) -> None:
    leaked = await manager(store).create(owner="acme", name="ci")
    bystander = await manager(store).create(owner="acme", name="laptop")
    body = report(leaked.key, url="https://github.com/octo/repo/blob/abc/.env")
    response = await post(endpoint(store, action=action), body, GITHUB.headers(body))
    assert response.status_code == 200
    assert response.json() == [
        {
            "token_hash": hashlib.sha256(leaked.key.encode()).hexdigest(),
            "token_type": "keystile_api_key",
            "label": "true_positive",
        }
    ]
    assert (await store.get(leaked.id)).status() == status  # type: ignore[union-attr]
    assert (await store.get(bystander.id)).is_active()  # type: ignore[union-attr]
    [event] = [e for e in await store.list_events(key_id=leaked.id) if e.action == "leaked"]
    assert event.actor == SCANNING_ACTOR and event.owner == "acme"
    assert event.detail["url"] == "https://github.com/octo/repo/blob/abc/.env"
    assert event.detail["source"] == "content"
    assert event.detail["action"] == outcome
    assert leaked.key not in json.dumps(event.to_dict())
    assert leaked.key not in response.text


async def test_unknown_and_forged_tokens_are_false_positives_and_change_nothing(
    store: KeyStore,
) -> None:
    """A token shaped like a key: unknown id, or a real id with a made-up secret (which
    anyone could commit to get someone's key revoked): reported false, nothing touched."""
    real = await manager(store).create(owner="acme", name="ci")
    other = await manager(store).create(owner="globex", name="ci")
    # A well-formed key (checksum and all) with another owner's real id and a made-up secret.
    grafted, _ = generate_key("ks", key_id=other.id)
    tokens = ["ghp_" + "a" * 36, "not a key", grafted]
    body = report(*tokens)
    response = await post(endpoint(store), body, GITHUB.headers(body))
    assert response.status_code == 200
    assert [item["label"] for item in response.json()] == ["false_positive"] * 3
    assert await unchanged(store, real.id, other.id)


async def test_the_same_token_twice_is_acted_on_once(store: KeyStore) -> None:
    leaked = await manager(store).create(owner="acme", name="ci")
    body = report(leaked.key, leaked.key)
    response = await post(endpoint(store), body, GITHUB.headers(body))
    assert [item["label"] for item in response.json()] == ["true_positive"] * 2
    leaks = [e for e in await store.list_events(key_id=leaked.id) if e.action == "leaked"]
    revokes = [e for e in await store.list_events(key_id=leaked.id) if e.action == "revoked"]
    assert len(leaks) == 1 and len(revokes) == 1


async def test_an_already_revoked_key_is_still_reported_true(store: KeyStore) -> None:
    leaked = await manager(store).create(owner="acme", name="ci")
    await manager(store).revoke(leaked.id, owner="acme")
    body = report(leaked.key)
    response = await post(endpoint(store, action="disable"), body, GITHUB.headers(body))
    assert response.json()[0]["label"] == "true_positive"
    [leak] = [e for e in await store.list_events(key_id=leaked.id) if e.action == "leaked"]
    assert leak.detail["action"] == "already revoked"


# -- refused, nothing changed ----------------------------------------------------------


async def refused(store: KeyStore, body: bytes, headers: dict[str, str], **options: Any) -> Any:
    key = await manager(store).create(owner="acme", name=f"victim-{uuid.uuid4().hex[:8]}")
    response = await post(endpoint(store, **options), body, headers)
    assert await unchanged(store, key.id), "a refused report changed something"
    assert response.status_code != 500
    return response.status_code, response.json()["error"]


async def victim_report(store: KeyStore) -> tuple[str, bytes]:
    key = await manager(store).create(owner="acme", name="target")
    return key.id, report(key.key)


async def test_missing_signature_is_401(store: KeyStore) -> None:
    key_id, body = await victim_report(store)
    assert await refused(store, body, {}) == (401, "missing_signature")
    headers = GITHUB.headers(body)
    del headers["Github-Public-Key-Signature"]
    assert await refused(store, body, headers) == (401, "missing_signature")
    assert await unchanged(store, key_id)


async def test_forged_signature_is_401(store: KeyStore) -> None:
    key_id, body = await victim_report(store)
    forger = SigningKey.generate(GITHUB.identifier)  # GitHub's id, someone else's key
    assert await refused(store, body, forger.headers(body)) == (401, "bad_signature")
    garbage = {**GITHUB.headers(body), "Github-Public-Key-Signature": "not base64!"}
    assert await refused(store, body, garbage) == (401, "bad_signature")
    tampered = body.replace(b"content", b"commits")
    assert await refused(store, tampered, GITHUB.headers(body)) == (401, "bad_signature")
    assert await unchanged(store, key_id)


async def test_a_signature_by_an_unknown_key_id_is_401(store: KeyStore) -> None:
    key_id, body = await victim_report(store)
    stranger = SigningKey.generate("not-githubs")
    assert await refused(store, body, stranger.headers(body)) == (401, "unknown_key_id")
    assert await unchanged(store, key_id)


async def test_a_replayed_body_with_another_keys_signature_is_401(store: KeyStore) -> None:
    """Two keys GitHub publishes: a body signed by one, sent naming the other, is refused."""
    second = SigningKey.generate("github-key-2")
    key_id, body = await victim_report(store)
    headers = {**GITHUB.headers(body), "Github-Public-Key-Identifier": second.identifier}
    keys = {GITHUB.identifier: GITHUB.pem, second.identifier: second.pem}
    app = secret_scanning_app(manager=manager(store), public_keys=keys)
    response = await post(app, body, headers)
    assert (response.status_code, response.json()["error"]) == (401, "bad_signature")
    # Another report's signature on this body fails too.
    other = report("ghp_" + "b" * 36)
    mixed = {**GITHUB.headers(other), "Content-Type": "application/json"}
    response = await post(app, body, mixed)
    assert response.status_code == 401
    assert await unchanged(store, key_id)


async def test_an_oversized_body_is_413_unread(store: KeyStore) -> None:
    key_id, body = await victim_report(store)
    padded = body[:-1] + b"," + b" " * 2000 + b"]"
    assert await refused(store, padded, GITHUB.headers(padded), max_body=1024) == (
        413,
        "too_large",
    )
    assert await unchanged(store, key_id)


async def test_too_many_tokens_is_413(store: KeyStore) -> None:
    key = await manager(store).create(owner="acme", name="target")
    body = report(key.key, *["ghp_" + "c" * 36] * 5)
    assert await refused(store, body, GITHUB.headers(body), max_tokens=5) == (
        413,
        "too_many_tokens",
    )
    assert await unchanged(store, key.id)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"token": "x"}',
        b"[1, 2]",
        b'[{"type": "x"}]',
        b'[{"token": 5}]',
        b'[{"token": "x", "url": 7}]',
        b"\xff\xfe",
    ],
)
async def test_malformed_json_is_400(store: KeyStore, body: bytes) -> None:
    assert await refused(store, body, GITHUB.headers(body)) == (400, "malformed")


async def test_only_post_is_answered(store: KeyStore) -> None:
    import httpx

    app = endpoint(store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


class DownStore(MemoryKeyStore):
    """A store that cannot be reached once keys are in it."""

    down = False

    async def get(self, key_id: str) -> KeyRecord | None:
        if self.down:
            raise StoreError("connection refused")
        return await super().get(key_id)


async def test_a_store_failure_is_503_never_500() -> None:
    store = DownStore()
    leaked = await manager(store).create(owner="acme", name="ci")
    store.down = True
    body = report(leaked.key)
    response = await post(endpoint(store), body, GITHUB.headers(body))
    assert (response.status_code, response.json()["error"]) == (503, "unavailable")
    assert leaked.key not in response.text
    store.down = False
    assert (await store.get(leaked.id)).is_active()  # type: ignore[union-attr]


def test_options_are_checked_when_built() -> None:
    with pytest.raises(ConfigurationError):
        secret_scanning_app(database_url="memory://", action="delete")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        secret_scanning_app(database_url="memory://", public_keys={"k": "not a pem"})
    with pytest.raises(ConfigurationError):
        secret_scanning_app(database_url="memory://", keys_url="http://example.com/keys")
    with pytest.raises(ConfigurationError):
        secret_scanning_app(database_url="memory://", keys_url="file:///etc/passwd")


async def test_an_endpoint_on_a_database_url_opens_and_closes_its_own_manager(
    sqlite_database_url: str,
) -> None:
    async with KeyManager.from_url(sqlite_database_url, argon2=CHEAPEST_PARAMETERS) as keys:
        leaked = await keys.create(owner="acme", name="ci")
    app = secret_scanning_app(
        database_url=sqlite_database_url, public_keys={GITHUB.identifier: GITHUB.pem}
    )
    body = report(leaked.key)
    response = await post(app, body, GITHUB.headers(body))
    assert response.json()[0]["label"] == "true_positive"
    await app.aclose()
    async with KeyManager.from_url(sqlite_database_url) as keys:
        assert (await keys.get(leaked.id, owner="acme")).revoked_at is not None
        [leak] = [e for e in await keys.events(key_id=leaked.id) if e.action == "leaked"]
    assert leak.actor == SCANNING_ACTOR
