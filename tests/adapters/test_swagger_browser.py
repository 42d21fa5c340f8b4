"""Swagger UI in a real headless Chromium against a protect()ed FastAPI app under uvicorn.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``), driven by
playwright; no browser build is downloaded. Swagger UI's JavaScript and CSS are served
by the app itself from the ``swagger-ui-py`` package's copy of swagger-ui-dist (FastAPI's
self-hosting recipe), because the tests run without network access.

Without ``/usr/bin/chromium`` (or playwright) the tests skip, unless
``KEYSTILE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns the skip into a failure.

Run as a script, this module is the server: ``python tests/adapters/test_swagger_browser.py --fd N
--database-url URL``. The parent binds the socket (port 0) and passes it on, as
``tests/servers.py`` does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from browsers import STEP_TIMEOUT, child_server, chromium, require_browser, serve
from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.fastapi import CurrentKey, protect

HERE = Path(__file__).resolve()


def _require_browser() -> None:
    require_browser("the Swagger UI browser tests")


# -- the server (child process) -----------------------------------------------------------


def swagger_ui_assets() -> Path:
    """swagger-ui-dist's files, as the ``swagger-ui-py`` package ships them."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def build_app(database_url: str) -> FastAPI:
    """A FastAPI app protected in one line, with Swagger UI self-hosted."""
    app = FastAPI(title="keystile browser test", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=swagger_ui_assets()), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=app.title,
            swagger_js_url="/static/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui.css",
            swagger_favicon_url="/static/favicon-32x32.png",
        )

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, str]:
        return {"key": key.display_name}

    protect(
        app,
        database_url=database_url,
        exempt_paths=["/docs", "/static/*"],
        argon2=CHEAPEST_PARAMETERS,
    )
    return app


def main() -> None:
    serve(build_app)


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    database = tmp_path_factory.mktemp("browser") / "keystile.db"

    async def mint() -> dict[str, str]:
        async with KeyManager.from_url(
            f"sqlite:///{database}", argon2=CHEAPEST_PARAMETERS
        ) as manager:
            first = await manager.create(owner="acme", name="swagger")
            second = await manager.create(owner="acme", name="other")
        return {"url": f"sqlite:///{database}", "first": first.key, "second": second.key}

    return asyncio.run(mint())


@pytest.fixture(scope="module")
def server(keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app under uvicorn in a child process; its base URL."""
    _require_browser()
    log = tmp_path_factory.mktemp("browser-log") / "uvicorn.log"
    with child_server(HERE, ["--database-url", keys["url"]], log, "/docs") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[Any]:
    with chromium() as browser:
        yield browser


class Outcome(NamedTuple):
    """What Swagger UI shows after *Execute*: the status and the JSON response body."""

    status: int
    body: dict[str, Any]


def try_whoami(browser: Any, base_url: str, *, bearer: str = "", api_key: str = "") -> Outcome:
    """Open /docs, fill Swagger UI's *Authorize* dialog, execute ``GET /whoami``."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT)
        page.goto(f"{base_url}/docs")
        operation = page.locator(".opblock").filter(has_text="/whoami")
        operation.wait_for()
        # Swagger UI shows a padlock on every operation that declares security.
        assert operation.locator(".authorization__btn").count() == 1
        page.locator(".auth-wrapper button.authorize").click()
        for scheme, value in (("bearerAuth", bearer), ("apiKeyHeader", api_key)):
            if value:
                container = page.locator(".auth-container").filter(has_text=scheme)
                container.locator("input").fill(value)
                container.locator("button.authorize").click()
        page.locator(".auth-btn-wrapper button.btn-done").first.click()
        operation.locator(".opblock-summary").click()
        operation.locator("button.try-out__btn").click()
        operation.locator("button.execute").click()
        live = operation.locator(".live-responses-table .response")
        live.wait_for()
        status = live.locator(".response-col_status").inner_text().split()[0]
        body = live.locator(".response-col_description pre").first.inner_text()
        return Outcome(int(status), json.loads(body))
    finally:
        context.close()


def test_authorize_with_bearer(browser: Any, server: str, keys: dict[str, str]) -> None:
    """Authorize with the bearer scheme only: the protected operation answers 200."""
    outcome = try_whoami(browser, server, bearer=keys["first"])
    assert outcome == (200, {"key": "apikey:swagger"})


def test_authorize_with_api_key_header(browser: Any, server: str, keys: dict[str, str]) -> None:
    """Authorize with the X-API-Key scheme only: the protected operation answers 200."""
    outcome = try_whoami(browser, server, api_key=keys["first"])
    assert outcome == (200, {"key": "apikey:swagger"})


def test_authorize_both_with_the_same_key(browser: Any, server: str, keys: dict[str, str]) -> None:
    """Both *Authorize* fields filled with the same key: one credential, 200."""
    outcome = try_whoami(browser, server, bearer=keys["first"], api_key=keys["first"])
    assert outcome == (200, {"key": "apikey:swagger"})


def test_without_authorize_is_401(browser: Any, server: str) -> None:
    """Executing without authorizing gets the middleware's 401."""
    outcome = try_whoami(browser, server)
    assert outcome.status == 401
    assert outcome.body["error"] == "unauthorized"


@pytest.fixture(scope="module")
def different_keys(browser: Any, server: str, keys: dict[str, str]) -> Outcome:
    """Two different keys in the two fields: the page is driven once for both tests."""
    return try_whoami(browser, server, bearer=keys["first"], api_key=keys["second"])


def test_authorize_both_with_different_keys_is_400(different_keys: Outcome) -> None:
    """Two different keys in the two fields: 400 invalid_request."""
    outcome = different_keys
    assert outcome.status == 400
    assert outcome.body["error"] == "invalid_request"


def test_different_keys_400_names_both_sources(different_keys: Outcome) -> None:
    """The 400 for two different keys says which two headers disagreed."""
    outcome = different_keys
    assert outcome.status == 400
    detail = outcome.body["detail"].lower()
    assert "authorization" in detail, detail
    assert "x-api-key" in detail, detail


if __name__ == "__main__":
    main()
