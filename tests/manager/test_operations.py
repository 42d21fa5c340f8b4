"""Key operations through real ASGI requests on every store: update reaches a running app,
disable/enable, IP allowlists (IPv4, IPv6, no client, exempt paths)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest

from apps import protect
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, KeyStore
from keystile.errors import DuplicateKeyName, KeyManagementError
from keystile.tokens import generate_key

pytestmark = pytest.mark.anyio

DISABLED = "The API key has been disabled."
GENERIC = "The API key is not valid."


def manager(store: KeyStore) -> KeyManager:
    return KeyManager(store, argon2=CHEAPEST_PARAMETERS, actor="tests")


async def mint(store: KeyStore, **options: Any) -> tuple[str, str]:
    created = await manager(store).create(owner="acme", name=f"k-{uuid.uuid4().hex[:8]}", **options)
    return created.key, created.id


def client(app: APIKeyMiddleware, client: tuple[str, int] = ("127.0.0.1", 123)) -> Any:
    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def get(app: APIKeyMiddleware, key: str, path: str = "/whoami", **kw: Any) -> httpx.Response:
    async with client(app, **kw) as http:
        return await http.get(path, headers={"X-API-Key": key})


async def test_update_scopes_reaches_a_running_app_at_once(store: KeyStore) -> None:
    """update(scopes=...) applies to the key's next request in a running app, TTL aside."""
    key, key_id = await mint(store, scopes=["read"])
    app = protect(store, cache_ttl=3600)
    assert (await get(app, key, "/write")).status_code == 403
    await manager(store).update(key_id, owner="acme", scopes=["read", "write"])
    assert (await get(app, key, "/write")).status_code == 200
    await manager(store).update(key_id, owner="acme", scopes=[])
    assert (await get(app, key, "/write")).status_code == 403
    await app.aclose()


async def test_disabled_key_is_refused_saying_so_and_enable_restores_it(store: KeyStore) -> None:
    """A cached key that gets disabled gets 401 "disabled" at once; enable gives 200 at once."""
    key, key_id = await mint(store)
    app = protect(store, cache_ttl=3600)
    assert (await get(app, key)).status_code == 200
    record = await manager(store).disable(key_id, owner="acme")
    assert record.status() == "disabled"
    for _ in range(2):  # the second answer comes from the negative cache
        refused = await get(app, key)
        assert refused.status_code == 401
        assert refused.json()["error"] == "invalid_token"
        assert refused.json()["detail"] == DISABLED
        assert DISABLED in refused.headers["www-authenticate"]
    await manager(store).enable(key_id, owner="acme")
    assert (await get(app, key)).status_code == 200
    await app.aclose()


async def test_disabled_is_told_only_to_the_holder_of_the_secret(store: KeyStore) -> None:
    """A wrong secret for a disabled key's id gets the generic 401, not "disabled"."""
    _, key_id = await mint(store)
    await manager(store).disable(key_id, owner="acme")
    wrong, _ = generate_key(key_id=key_id)
    app = protect(store)
    refused = await get(app, wrong)
    assert refused.status_code == 401
    assert refused.json()["detail"] == GENERIC
    assert "disabled" not in refused.text and "disabled" not in refused.headers["www-authenticate"]
    await app.aclose()


async def test_list_and_show_show_the_disabled_state(store: KeyStore) -> None:
    """list and get report a disabled key as disabled, with disabled_at."""
    _, key_id = await mint(store)
    keys = manager(store)
    await keys.disable(key_id, owner="acme")
    shown = await keys.get(key_id, owner="acme")
    assert shown.to_public_dict()["status"] == "disabled" and shown.disabled_at is not None
    assert [r.status() for r in await keys.list("acme")] == ["disabled"]


async def test_ipv4_allowlist_passes_inside_and_refuses_outside(store: KeyStore) -> None:
    """10.0.0.0/8: 10.1.2.3 passes; 192.168.1.1 gets 403 ip_not_allowed."""
    key, _ = await mint(store, ip_allowlist=["10.0.0.0/8"])
    app = protect(store)
    assert (await get(app, key, client=("10.1.2.3", 123))).status_code == 200
    refused = await get(app, key, client=("192.168.1.1", 123))
    assert refused.status_code == 403
    assert refused.json()["error"] == "ip_not_allowed"
    assert "www-authenticate" not in refused.headers
    assert app.stats().rejects["ip_not_allowed"] == 1
    await app.aclose()


async def test_ipv6_allowlist_passes_inside_and_refuses_outside(store: KeyStore) -> None:
    """2001:db8::/32: 2001:db8::1 passes; 2001:db9::1 and an IPv4 client get 403."""
    key, _ = await mint(store, ip_allowlist=["2001:db8::/32"])
    app = protect(store)
    assert (await get(app, key, client=("2001:db8::1", 123))).status_code == 200
    assert (await get(app, key, client=("2001:db9::1", 123))).status_code == 403
    assert (await get(app, key, client=("10.1.2.3", 123))).status_code == 403
    await app.aclose()


async def test_ip_allowlist_refuses_a_request_without_a_client_address(store: KeyStore) -> None:
    """No scope["client"] (or one that is not an IP address): refused with 403."""
    key, _ = await mint(store, ip_allowlist=["10.0.0.0/8"])
    app = protect(store)
    answers = []
    for client_field in (None, ("unix-socket", 0)):
        scope: dict[str, Any] = {
            "type": "http",
            "method": "GET",
            "path": "/whoami",
            "raw_path": b"/whoami",
            "root_path": "",
            "scheme": "http",
            "query_string": b"",
            "headers": [(b"host", b"test"), (b"x-api-key", key.encode())],
            "client": client_field,
            "server": ("test", 80),
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        await app(scope, receive, send)
        answers.append(sent[0]["status"])
    assert answers == [403, 403]
    await app.aclose()


async def test_update_of_the_allowlist_reaches_a_running_app(store: KeyStore) -> None:
    """Setting and removing an allowlist applies to a cached key's next request."""
    key, key_id = await mint(store)
    app = protect(store, cache_ttl=3600)
    outside = {"client": ("192.168.1.1", 123)}
    assert (await get(app, key, **outside)).status_code == 200
    await manager(store).update(key_id, owner="acme", ip_allowlist=["10.0.0.0/8"])
    assert (await get(app, key, **outside)).status_code == 403
    await manager(store).update(key_id, owner="acme", ip_allowlist=None)
    assert (await get(app, key, **outside)).status_code == 200
    await app.aclose()


async def test_exempt_path_lets_a_key_from_outside_its_allowlist_pass_anonymous(
    store: KeyStore,
) -> None:
    """On an exempt path a key used from outside its allowlist is dropped, never refused."""
    key, key_id = await mint(store, ip_allowlist=["10.0.0.0/8"])
    app = protect(store, exempt_paths=["/public"])
    outside = await get(app, key, "/public", client=("192.168.1.1", 123))
    inside = await get(app, key, "/public", client=("10.0.0.1", 123))
    assert outside.status_code == 200 and outside.json()["key_id"] is None
    assert inside.status_code == 200 and inside.json()["key_id"] == key_id
    await app.aclose()


async def test_ip_allowlist_is_validated_when_set(store: KeyStore) -> None:
    """Bad CIDRs (garbage, host bits set, one string) are refused; good ones normalised."""
    keys = manager(store)
    for bad in (["10.0.0.0/33"], ["nonsense"], ["10.1.2.3/8"], "10.0.0.0/8"):
        with pytest.raises(KeyManagementError):
            await keys.create(owner="acme", name="bad", ip_allowlist=bad)  # type: ignore[arg-type]
    _, key_id = await mint(store, ip_allowlist=["10.0.0.0/8", "2001:DB8::/32", "10.0.0.0/8"])
    record = await keys.get(key_id, owner="acme")
    assert record.ip_allowlist == ("10.0.0.0/8", "2001:db8::/32")


async def test_update_covers_name_metadata_and_expiry(store: KeyStore) -> None:
    """name, metadata, expires_in and expires_at=None change on the stored key."""
    _, key_id = await mint(store)
    keys = manager(store)
    updated = await keys.update(
        key_id, owner="acme", name="ci deploy", metadata={"team": "infra"},
        expires_in=timedelta(days=30),
    )  # fmt: skip
    assert (updated.name, dict(updated.metadata)) == ("ci deploy", {"team": "infra"})
    assert updated.expires_at is not None
    cleared = await keys.update(key_id, owner="acme", expires_at=None)
    assert cleared.expires_at is None
    with pytest.raises(KeyManagementError):
        await keys.update(key_id, owner="acme", metadata={"bad": "\x00"})


async def test_rename_onto_a_held_name_is_refused(store: KeyStore) -> None:
    """Renaming a key to the name of another active key of the owner is DuplicateKeyName."""
    keys = manager(store)
    await keys.create(owner="acme", name="taken")
    _, key_id = await mint(store)
    with pytest.raises(DuplicateKeyName):
        await keys.update(key_id, owner="acme", name="taken")
    other = await keys.create(owner="globex", name="taken")
    assert other.record.name == "taken"


async def test_reaper_leaves_disabled_keys_alone_unless_asked(store: KeyStore) -> None:
    """reap skips disabled keys; reap(include_disabled=True) revokes them."""
    keys = manager(store)
    _, key_id = await mint(store)
    await keys.disable(key_id, owner="acme")
    assert await keys.reap(unused_for=timedelta(0)) == []
    reaped = await keys.reap(unused_for=timedelta(0), include_disabled=True)
    assert [r.id for r in reaped] == [key_id]
    assert (await keys.get(key_id, owner="acme")).status() == "revoked"


async def test_update_and_disable_are_owner_scoped(store: KeyStore) -> None:
    """Another owner's key id behaves as unknown for update, disable and enable."""
    from keystile.errors import KeyNotFound

    keys = manager(store)
    _, key_id = await mint(store)
    for call in (
        keys.update(key_id, owner="globex", scopes=["x"]),
        keys.disable(key_id, owner="globex"),
        keys.enable(key_id, owner="globex"),
    ):
        with pytest.raises(KeyNotFound):
            await call
    assert (await keys.get(key_id, owner="acme")).status() == "active"


# -- allowlist limits, IPv6-only networks and IPv4-mapped clients ------------------------


def networks(n: int) -> list[str]:
    """``n`` distinct IPv4 /32 networks."""
    return [f"10.{i // 256}.{i % 256}.1/32" for i in range(n)]


async def test_ip_allowlist_holds_at_most_256_networks(store: KeyStore) -> None:
    """256 networks are accepted; 257 are refused on create and on update, naming the cap."""
    keys = manager(store)
    _, key_id = await mint(store, ip_allowlist=networks(256))
    assert len((await keys.get(key_id, owner="acme")).ip_allowlist) == 256
    with pytest.raises(KeyManagementError, match="at most 256"):
        await keys.create(owner="acme", name="too-many", ip_allowlist=networks(257))
    with pytest.raises(KeyManagementError, match="at most 256"):
        await keys.update(key_id, owner="acme", ip_allowlist=networks(257))
    assert len((await keys.get(key_id, owner="acme")).ip_allowlist) == 256
    assert "too-many" not in [r.name for r in await keys.list("acme")]


async def test_all_ipv6_admits_ipv6_clients_only(store: KeyStore) -> None:
    """::/0 admits 2001:db8::1; an IPv4 client and an IPv4-mapped one get 403."""
    key, _ = await mint(store, ip_allowlist=["::/0"])
    app = protect(store)
    assert (await get(app, key, client=("2001:db8::1", 123))).status_code == 200
    for outside in ("10.1.2.3", "::ffff:10.1.2.3", "::FFFF:0a01:0203"):
        refused = await get(app, key, client=(outside, 123))
        assert refused.status_code == 403, outside
        assert refused.json()["error"] == "ip_not_allowed"
    await app.aclose()


async def test_ipv4_mapped_client_is_matched_as_its_ipv4_address(store: KeyStore) -> None:
    """::ffff:10.1.2.3 passes 10.0.0.0/8 as 10.1.2.3 does; ::ffff:192.168.1.1 gets 403."""
    key, _ = await mint(store, ip_allowlist=["10.0.0.0/8", "2001:db8::/32"])
    app = protect(store)
    assert (await get(app, key, client=("::ffff:10.1.2.3", 123))).status_code == 200
    assert (await get(app, key, client=("::ffff:192.168.1.1", 123))).status_code == 403
    await app.aclose()


async def test_ip_allowlist_refuses_zone_ids_and_ipv4_mapped_networks(store: KeyStore) -> None:
    """fe80::%eth0/64 (a zone id) and ::ffff:10.0.0.0/104 are refused with the reason."""
    keys = manager(store)
    _, key_id = await mint(store, ip_allowlist=["10.0.0.0/8"])
    for bad, reason in (
        (["fe80::%eth0/64"], "zone"),
        (["fe80::1%2"], "zone"),
        (["::ffff:10.0.0.0/104"], "IPv4-mapped"),
    ):
        with pytest.raises(KeyManagementError, match=reason):
            await keys.create(owner="acme", name="bad", ip_allowlist=bad)
        with pytest.raises(KeyManagementError, match=reason):
            await keys.update(key_id, owner="acme", ip_allowlist=bad)
    assert (await keys.get(key_id, owner="acme")).ip_allowlist == ("10.0.0.0/8",)
    assert [e.action for e in await keys.events(key_id=key_id)] == ["created"]
