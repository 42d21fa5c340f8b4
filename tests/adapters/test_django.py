"""Django and DRF behind keystile: a real Django project served through APIKeyMiddleware.

The project (``django_settings``, ``django_views``) is configured in this process the
first time a test here needs it; nothing else in the suite configures Django. The
example, which configures Django its own way, runs in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from apps import EXAMPLES, client
from docblocks import INTEGRATION, block_under
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from keystile.django import KeystileUser, protect, require_scopes
from lifespans import lifespan

pytestmark = pytest.mark.anyio

EXEMPT = ["/drf/public", "/public", "/open/scoped"]


def django_application() -> Any:
    import django_settings

    django_settings.configure()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


async def make_key(database_url: str, *scopes: str) -> str:
    async with KeyManager.from_url(database_url, argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name="bot", scopes=list(scopes))
    return created.key


@pytest.fixture
async def app(sqlite_database_url: str) -> AsyncIterator[APIKeyMiddleware]:
    """The test project wrapped as the docs say: APIKeyMiddleware(get_asgi_application())."""
    middleware = APIKeyMiddleware(
        django_application(),
        database_url=sqlite_database_url,
        argon2=CHEAPEST_PARAMETERS,
        exempt_paths=EXEMPT,
    )
    yield middleware
    await middleware.aclose()


async def get(app: Any, path: str, key: str | None = None, **kwargs: Any) -> Any:
    headers = {"X-API-Key": key} if key else {}
    async with client(app) as c:
        return await c.request(kwargs.pop("method", "GET"), path, headers=headers, **kwargs)


# -- DRF ----------------------------------------------------------------------------------


async def test_drf_view_sees_the_key_as_request_user(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """A DRF APIView's request.user is the key: apikey:<name>, authenticated, pk its id."""
    key = await make_key(sqlite_database_url)
    answer = await get(app, "/drf/whoami", key)
    body = answer.json()
    assert answer.status_code == 200
    assert body["type"] == "KeystileUser"
    assert (body["display_name"], body["is_authenticated"]) == ("apikey:bot", True)
    assert body["pk"] == key.split("_")[1]


async def test_drf_request_auth_carries_the_scopes(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """request.auth is the key's credentials: "authenticated" and the key's scopes."""
    key = await make_key(sqlite_database_url, "items:read", "items:write")
    answer = await get(app, "/drf/whoami", key)
    assert answer.json()["auth_scopes"] == ["authenticated", "items:read", "items:write"]


async def test_has_scopes_admits_a_key_with_the_declared_scopes(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """HasScopes lets a key holding the view's required_scopes through."""
    key = await make_key(sqlite_database_url, "items:read")
    answer = await get(app, "/drf/items", key)
    assert (answer.status_code, answer.json()) == (200, ["a", "b"])


async def test_has_scopes_refuses_a_key_without_them(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """A key lacking a declared scope gets 403 with the insufficient_scope challenge and
    the middleware's body."""
    key = await make_key(sqlite_database_url, "items:write")
    answer = await get(app, "/drf/items", key)
    assert answer.status_code == 403
    assert answer.json() == {
        "error": "insufficient_scope",
        "detail": "Missing scope: items:read.",
        "required_scopes": ["items:read"],
        "missing_scopes": ["items:read"],
    }
    assert answer.headers["cache-control"] == "no-store"
    assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
    assert 'scope="items:read"' in answer.headers["www-authenticate"]
    assert app.stats().rejects["insufficient_scope"] == 1


async def test_require_scopes_guards_a_function_view(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """require_scopes(...) on an @api_view admits the scope, and DRF asks no CSRF token."""
    key = await make_key(sqlite_database_url, "items:write")
    answer = await get(app, "/drf/create", key, method="POST", json={"name": "tea"})
    assert (answer.status_code, answer.json()) == (201, {"created": "tea"})


async def test_drf_view_without_a_key_on_an_exempt_path_is_401(app: APIKeyMiddleware) -> None:
    """Reached without a key, DRF answers 401 with keystile's bare Bearer challenge and,
    through keystile's exception handler, keystile's body."""
    answer = await get(app, "/drf/public")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer realm="api"'
    assert answer.json()["error"] == "unauthorized"


async def test_has_scopes_without_keystiles_handler_keeps_body_and_challenge(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """With DRF's own exception handler, HasScopes still sends keystile's status, body and
    challenge (only the extra headers need keystile's handler)."""
    from django.test import override_settings

    import django_settings

    drf = {**django_settings.SETTINGS["REST_FRAMEWORK"]}
    del drf["EXCEPTION_HANDLER"]
    key = await make_key(sqlite_database_url, "items:write")
    with override_settings(REST_FRAMEWORK=drf):
        answer = await get(app, "/drf/items", key)
        anonymous = await get(app, "/open/scoped")
    assert answer.status_code == 403
    assert answer.json()["missing_scopes"] == ["items:read"]
    assert 'scope="items:read"' in answer.headers["www-authenticate"]
    assert "cache-control" not in answer.headers
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthorized")
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="api"'


async def test_has_scopes_without_declared_scopes_fails_closed(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """A view using HasScopes without required_scopes is a 500, never an open door."""
    key = await make_key(sqlite_database_url, "items:read")
    answer = await get(app, "/drf/undeclared", key)
    assert answer.status_code == 500


def test_require_scopes_needs_a_scope() -> None:
    """A permission that requires nothing is a mistake, refused when the view is written."""
    with pytest.raises(ValueError, match="at least one scope"):
        require_scopes()


# -- plain Django -----------------------------------------------------------------------


async def test_plain_view_sees_the_key_through_the_django_middleware(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """KeystileUserMiddleware makes request.user the key in a plain Django view."""
    key = await make_key(sqlite_database_url, "items:read")
    answer = await get(app, "/plain", key)
    assert answer.json() == {
        "type": "KeystileUser",
        "user": "apikey:bot",
        "is_authenticated": True,
        "scopes": ["items:read"],
    }


async def test_plain_view_without_a_key_is_anonymous(app: APIKeyMiddleware) -> None:
    """On an exempt path without a key, a plain view sees Django's AnonymousUser."""
    answer = await get(app, "/public")
    assert answer.json()["type"] == "AnonymousUser"
    assert answer.json()["is_authenticated"] is False


async def test_a_key_authenticated_post_needs_no_csrf_token(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """CsrfViewMiddleware lets a POST made with a key through: keys are not cookies."""
    key = await make_key(sqlite_database_url)
    answer = await get(app, "/plain/post", key, method="POST")
    assert (answer.status_code, answer.json()) == (200, {"posted_by": "apikey:bot"})


# -- the ASGI middleware in front --------------------------------------------------------


async def test_no_key_is_refused_before_django_runs(app: APIKeyMiddleware) -> None:
    """Without a key keystile answers 401 and Django never starts the request."""
    from django.core.signals import request_started

    started: list[object] = []

    def count(sender: object, **kwargs: object) -> None:
        started.append(sender)

    request_started.connect(count)
    try:
        answer = await get(app, "/drf/whoami")
    finally:
        request_started.disconnect(count)
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert started == []


async def test_django_and_drf_never_verify_again(
    app: APIKeyMiddleware, sqlite_database_url: str
) -> None:
    """Four requests through DRF and plain views: four lookups, one argon2 verification."""
    key = await make_key(sqlite_database_url, "items:read")
    for path in ["/drf/whoami", "/drf/items", "/plain", "/drf/whoami"]:
        assert (await get(app, path, key)).status_code == 200
    stats = app.stats()
    assert (stats.cache_misses, stats.cache_hits, stats.argon2_verifications) == (1, 3, 1)


async def test_without_the_asgi_middleware_django_fails_closed(sqlite_database_url: str) -> None:
    """Django served without APIKeyMiddleware in front answers 500, not anonymous 200s."""
    answer = await get(django_application(), "/plain")
    assert answer.status_code == 500


async def test_protect_flushes_last_used_at_at_shutdown(sqlite_database_url: str) -> None:
    """protect() answers the lifespan Django refuses, so shutdown writes last_used_at."""
    key = await make_key(sqlite_database_url)
    app = protect(
        django_application(),
        database_url=sqlite_database_url,
        argon2=CHEAPEST_PARAMETERS,
        flush_interval=3600,
    )
    async with lifespan(app):
        answered = await get(app, "/plain", key)
        pending = app.stats().pending_touches
    async with KeyManager.from_url(sqlite_database_url) as keys:
        record = (await keys.list("acme"))[0]
    assert (answered.status_code, pending) == (200, 1)
    assert record.last_used_at is not None


def test_keystile_user_has_no_django_permissions() -> None:
    """A key holds scopes, not Django permissions: the admin and model permissions refuse it."""
    from keystile import APIKeyUser

    user = KeystileUser(APIKeyUser(key_id="AbC123def456", owner="acme", name="bot"))
    assert (user.is_staff, user.is_superuser) == (False, False)
    assert user.has_perm("app.view_item") is False
    assert user.has_module_perms("app") is False
    assert user.get_all_permissions() == set()


# -- the example and the extra --------------------------------------------------------------

EXAMPLE_DRIVER = """
import asyncio, json, sys
import httpx
sys.path.insert(0, sys.argv[1])
from keystile import CHEAPEST_PARAMETERS, KeyManager

async def main():
    async with KeyManager.from_url(argon2=CHEAPEST_PARAMETERS) as keys:
        key = (await keys.create(owner="acme", name="laptop", scopes=["items:read"])).key
    import django_app
    app = django_app.application
    out = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        for path in ["/health", "/whoami", "/items", "/items/new"]:
            method = "POST" if path == "/items/new" else "GET"
            r = await c.request(method, path, headers={"X-API-Key": key})
            out[path] = [r.status_code, r.json()]
        r = await c.get("/whoami")
        out["anonymous"] = [r.status_code, r.json()["error"]]
    await app.aclose()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_example_django_app_serves_drf_and_plain_views(tmp_path: Path) -> None:
    """examples/django_app.py, in a process of its own: health, whoami, scopes, 401."""
    env = {k: v for k, v in os.environ.items() if k != "KEYSTILE_DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", EXAMPLE_DRIVER, str(EXAMPLES)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert answers["/health"] == [200, {"status": "ok", "user": "apikey:laptop"}]
    assert answers["/whoami"] == [200, {"key": "apikey:laptop", "scopes": ["items:read"]}]
    assert answers["/items"] == [200, ["a", "b"]]
    assert answers["/items/new"] == [
        403,
        {
            "error": "insufficient_scope",
            "detail": "Missing scope: items:write.",
            "required_scopes": ["items:write"],
            "missing_scopes": ["items:write"],
        },
    ]
    assert answers["anonymous"] == [401, "unauthorized"]


def test_docs_django_block_is_the_example() -> None:
    """The one-file project in the docs' Django section is the example file, verbatim."""
    example = (EXAMPLES / "django_app.py").read_text(encoding="utf-8")
    block = block_under(
        INTEGRATION, "Django and Django REST framework", containing="settings.configure("
    )
    assert "settings.configure(" in block.code
    assert block.code in example


def test_import_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing keystile.django without DRF says which extra to install."""
    monkeypatch.setitem(sys.modules, "rest_framework", None)
    monkeypatch.setitem(sys.modules, "rest_framework.authentication", None)
    monkeypatch.delitem(sys.modules, "keystile.django")
    with pytest.raises(ImportError, match=r'pip install "keystile\[django\]"'):
        importlib.import_module("keystile.django")
