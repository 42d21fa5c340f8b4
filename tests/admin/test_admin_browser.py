"""The admin page in a real headless Chromium (``browsers.py``), against an app under
uvicorn: create a key and read it from the page, use it, revoke it from the page; markup
in a name stays text; a form without its CSRF token is refused; an operator ``authorize``
refuses is turned away.

With ``KEYSTILE_SCREENSHOTS=<dir>`` the tests also save the screenshots the docs show
(``docs/admin-*.png``): ``KEYSTILE_SCREENSHOTS=docs pytest tests/admin/test_admin_browser.py``.

Run as a script, this module is the server: ``python tests/admin/test_admin_browser.py
--fd N --database-url URL``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from browsers import STEP_TIMEOUT, child_server, chromium, require_browser, serve
from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from keystile.admin import admin_app

HERE = Path(__file__).resolve()
STAFF_HEADER = "x-staff"
SCREENSHOTS = os.environ.get("KEYSTILE_SCREENSHOTS")


# -- the server (child process) -----------------------------------------------------------


def build_app(database_url: str) -> Starlette:
    """An app with the admin page at /admin/keys (staff: the ``x-staff`` header, standing
    in for the app's own sign-in) and a protected route."""

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"key": request.user.display_name})

    def staff(request: Request) -> str | None:
        return request.headers.get(STAFF_HEADER)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    admin = admin_app(database_url=database_url, authorize=staff, argon2=CHEAPEST_PARAMETERS)
    routes = [Mount("/admin/keys", admin), Route("/whoami", whoami), Route("/health", health)]
    app = Starlette(routes=routes)
    app.add_middleware(
        APIKeyMiddleware,
        database_url=database_url,
        exempt_paths=["/admin/*", "/health"],
        argon2=CHEAPEST_PARAMETERS,
        flush_interval=0.2,
    )
    return app


def main() -> None:
    serve(build_app)


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with a few keys, so the list has something to show."""
    url = f"sqlite:///{tmp_path_factory.mktemp('admin-browser') / 'keystile.db'}"

    async def seed() -> None:
        async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
            await manager.create(owner="acme", name="deploy", scopes=["items:write"])
            await manager.create(
                owner="acme", name="reports", scopes=["items:read"], expires_in=timedelta(days=5)
            )
            old = await manager.create(owner="globex", name="laptop")
            await manager.revoke(old.id, owner="globex", actor="ops@example.com")

    asyncio.run(seed())
    return url


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_browser("the admin page browser tests")
    log = tmp_path_factory.mktemp("admin-browser-log") / "uvicorn.log"
    args = ["--database-url", database_url]
    with child_server(HERE, args, log, "/health") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[Any]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def staff_page(browser: Any, server: str) -> Iterator[Any]:
    """A page signed in as staff; every dialog it opens is recorded in ``page.dialogs``."""
    context = browser.new_context(
        extra_http_headers={STAFF_HEADER: "ada@example.com"},
        viewport={"width": 1200, "height": 900},
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT)
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    try:
        yield page
    finally:
        context.close()


def screenshot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / f"admin-{name}.png"), full_page=True)


def create_key(page: Any, server: str, name: str, scopes: str = "items:read") -> str:
    """Fill and send the create form; the secret as the page shows it."""
    page.goto(f"{server}/admin/keys/new")
    page.fill("input[name=owner]", "acme")
    page.fill("input[name=name]", name)
    page.fill("input[name=scopes]", scopes)
    page.fill("input[name=expires]", "90d")
    page.click("button[type=submit]")
    secret: str = page.locator("#secret").inner_text().strip()
    return secret


def whoami(server: str, key: str) -> int:
    return httpx.get(f"{server}/whoami", headers={"x-api-key": key}, timeout=10).status_code


def test_create_use_and_revoke_from_the_page(staff_page: Any, server: str) -> None:
    """Create a key on the page and read it there (the copy button copies it); it works
    (200); revoke it on the page after confirming; it is refused (401)."""
    page = staff_page
    key = create_key(page, server, "browser-ci")
    assert re.fullmatch(r"ks_[0-9A-Za-z]{12}_[0-9A-Za-z]+", key)
    copy = page.locator("button[data-copy=secret]")
    copy.click()
    # The button says so once the clipboard write it awaits has resolved.
    page.wait_for_function(
        "() => document.querySelector('button[data-copy=secret]').textContent !== 'Copy'",
        timeout=STEP_TIMEOUT,
    )
    assert copy.inner_text() == "Copied"
    assert page.evaluate("navigator.clipboard.readText()") == key
    screenshot(page, "created")
    assert whoami(server, key) == 200
    for _ in range(20):
        assert whoami(server, key) == 200
    page.click("text=Go to the key")
    chart = page.locator(".chart svg rect[fill='#1f5fbf']")
    deadline = time.monotonic() + 20
    while chart.count() == 0 and time.monotonic() < deadline:
        page.reload()  # the uses reach the store with the next flush (0.2 s)
    assert chart.count() >= 1
    screenshot(page, "key")
    page.click("text=Revoke…")
    page.fill("input[name=confirm]", key.split("_")[1])
    page.click("button.danger")
    assert page.locator("h1 .state").inner_text() == "revoked"
    assert whoami(server, key) == 401
    page.goto(f"{server}/admin/keys/")
    screenshot(page, "keys")


def test_markup_in_a_name_is_text(staff_page: Any, server: str) -> None:
    """A key named <script>alert(1)</script> shows as that text, and no dialog opens."""
    page = staff_page
    name = "<script>alert(1)</script>"
    create_key(page, server, name)
    page.click("text=Go to the key")
    assert page.locator("h1 .name").inner_text() == name
    page.goto(f"{server}/admin/keys/?name=alert")
    assert page.locator("td.name").all_inner_texts() == [name]
    page.wait_for_load_state("load")
    assert page.dialogs == []


def test_post_without_csrf_token_is_refused(staff_page: Any, server: str) -> None:
    """The revoke form with its token taken out, and the same form posted from another
    origin: both 403, and the key keeps working."""
    page = staff_page
    key = create_key(page, server, "csrf-target")
    key_id = key.split("_")[1]
    page.goto(f"{server}/admin/keys/{key_id}/revoke")
    page.fill("input[name=confirm]", key_id)
    page.evaluate("document.querySelector('input[name=csrf]').remove()")
    with page.expect_navigation() as sent:
        page.click("button.danger")
    assert sent.value.status == 403
    assert "csrf_failed" in page.content()
    page.set_content(
        f'<form method="post" action="{server}/admin/keys/{key_id}/revoke">'
        f'<input name="confirm" value="{key_id}"></form>'
    )
    with page.expect_navigation() as forged:
        page.evaluate("document.forms[0].submit()")
    assert forged.value.status == 403
    assert whoami(server, key) == 200


def test_operator_authorize_refuses(browser: Any, server: str) -> None:
    """An operator that ``authorize`` turns away (no staff sign-in) gets 403 on every page."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT)
        for path in ("/admin/keys/", "/admin/keys/new"):
            response = page.goto(f"{server}{path}")
            assert response.status == 403
            assert "You may not use this page." in page.content()
            assert "deploy" not in page.content()
    finally:
        context.close()


if __name__ == "__main__":
    main()
