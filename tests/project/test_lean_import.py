"""What importing keystile loads: nothing heavy or optional until it is used.

Each case runs in a fresh interpreter (``sys.modules`` of this one already holds
everything the suite imported) and reports which of the watched packages it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

#: Never loaded by keystile's core: numpy (the pure scan needs none), the Postgres driver
#: (only with a Postgres URL), and the optional extras (Redis limits, Prometheus metrics,
#: the framework adapters).
OPTIONAL = ("numpy", "asyncpg", "redis", "prometheus_client", "fastapi", "litestar", "django")
WATCHED = (*OPTIONAL, "argon2")

PATHS = [pytest.param("", id="compiled"), pytest.param("1", id="pure")]


def loaded_after(code: str, pure: str = "") -> set[str]:
    """The watched top-level packages in ``sys.modules`` after ``code`` runs in a new
    interpreter (with the pure-Python hit path if ``pure`` is "1")."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        watched = {WATCHED!r}
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set(watched))))
        """
    )
    env = {**os.environ, "KEYSTILE_PURE_PYTHON": pure, "KEYSTILE_REQUIRE_SPEEDUPS": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("pure", PATHS)
def test_import_keystile_loads_nothing_optional(pure: str) -> None:
    """``import keystile`` loads no numpy, asyncpg, redis, prometheus_client, fastapi,
    litestar, django, nor argon2."""
    assert loaded_after("import keystile", pure) == set()


@pytest.mark.parametrize("pure", PATHS)
def test_an_app_serving_requests_loads_nothing_optional(pure: str) -> None:
    """An app behind the middleware (memory and SQLite stores), refusing and accepting
    requests on either hit path, has loaded none of the optional packages (of the watched
    ones, only argon2, which minted and verified the key)."""
    code = """
        import asyncio, tempfile
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route
        from starlette.testclient import TestClient
        from keystile import APIKeyMiddleware, CHEAPEST_PARAMETERS, KeyManager

        async def ping(request):
            return PlainTextResponse("pong")

        for url in ("memory://lean", f"sqlite:///{tempfile.mkdtemp()}/keys.db"):
            async def mint():
                async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
                    return (await manager.create(owner="o", name="n")).key
            token = asyncio.run(mint()) if url.startswith("sqlite") else None
            app = Starlette(routes=[Route("/ping", ping)])
            app.add_middleware(APIKeyMiddleware, database_url=url, argon2=CHEAPEST_PARAMETERS)
            with TestClient(app) as client:
                assert client.get("/ping").status_code == 401
                if token is not None:
                    for _ in range(3):
                        response = client.get("/ping", headers={"x-api-key": token})
                        assert response.status_code == 200, response.text
    """
    assert loaded_after(code, pure) == {"argon2"}


def test_the_middleware_import_does_not_load_argon2() -> None:
    """Importing the middleware leaves argon2 to the first hasher made."""
    assert loaded_after("from keystile import APIKeyMiddleware") == set()
    assert loaded_after("from keystile.hashing import SecretHasher; SecretHasher()") == {"argon2"}


def test_asyncpg_only_with_a_postgres_url() -> None:
    """Stores for memory and SQLite URLs leave asyncpg alone; a Postgres URL loads it."""
    code = """
        import tempfile
        from keystile import store_from_url
        store_from_url("memory://")
        store_from_url(f"sqlite:///{tempfile.mkdtemp()}/keys.db")
    """
    assert loaded_after(code) == set()
    postgres = 'from keystile import store_from_url; store_from_url("postgresql://u@127.0.0.1/db")'
    assert loaded_after(postgres) == {"asyncpg"}
