"""``keystile demo``: one public route and one protected by a key, served on 127.0.0.1
with a freshly minted key, and the ``curl`` lines to try it.

Without ``--database-url`` (or ``KEYSTILE_DATABASE_URL``) the demo keeps its SQLite
database in a temporary directory of its own and deletes it when it ends, however it
ends (Ctrl+C, an error, the self-test's last check): a demo leaves nothing behind.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import KeystileError
from .manager import CreatedKey, KeyManager
from .middleware import APIKeyMiddleware

__all__ = ["create_demo_app", "run_demo"]

#: The folders of the demo's own databases start with this (in the temporary directory).
TEMP_PREFIX = "keystile-demo-"


async def index(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "service": "keystile demo",
            "try": "GET /whoami with 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        }
    )


async def whoami(request: Request) -> JSONResponse:
    user = request.user
    return JSONResponse(
        {
            "key_id": user.identity,
            "display_name": user.display_name,
            "owner": getattr(user, "owner", None),
            "scopes": request.auth.scopes,
        }
    )


def create_demo_app(database_url: str, **options: Any) -> Starlette:
    app = Starlette(routes=[Route("/", index), Route("/whoami", whoami)])
    app.add_middleware(APIKeyMiddleware, database_url=database_url, exempt_paths=["/"], **options)
    return app


@contextmanager
def demo_database(database_url: str | None) -> Iterator[str]:
    """``database_url`` if one was given; else a SQLite file in a temporary directory that
    is deleted on the way out, whether the demo ends normally, on Ctrl+C or on an error."""
    if database_url is not None:
        yield database_url
        return
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, ignore_cleanup_errors=True) as folder:
        yield f"sqlite:///{Path(folder) / 'demo.db'}"


def run_demo(database_url: str | None, *, host: str, port: int, self_test: bool) -> int:
    """Mint a key, serve the demo app until Ctrl+C (or, with ``self_test``, send the
    ``curl`` requests itself); 0 if every answer was the expected one."""
    try:
        import uvicorn
    except ImportError:
        raise KeystileError(
            "keystile demo needs uvicorn: python -m pip install 'keystile[demo]'"
        ) from None
    with demo_database(database_url) as url:
        created = anyio.run(_mint, url)
        bound = _free_port(host, port)
        base = f"http://{host}:{bound}"
        kept = "" if database_url else " (deleted when the demo ends)"
        _print(f"keystile demo: database {url}{kept}")
        _print(f"Minted key {created.record.id} (owner 'demo', scope demo:read), shown once:\n")
        _print(f"    {created.key}\n")
        _print("Try it:\n")
        _print(f'    curl -i {base}/whoami -H "Authorization: Bearer {created.key}"   # 200')
        _print(f'    curl -i {base}/whoami -H "X-API-Key: {created.key}"   # 200')
        _print(f"    curl -i {base}/whoami   # 401, no key\n")
        config = uvicorn.Config(
            create_demo_app(url), host=host, port=bound, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        if not self_test:
            _print("Press Ctrl+C to stop.\n")
            server.run()
            return 0
        return _self_test(server, base, created.key)


async def _mint(url: str) -> CreatedKey:
    async with KeyManager.from_url(url) as manager:
        return await manager.create(
            owner="demo", name="demo key", scopes=["demo:read"], replace=True
        )


def _print(text: str) -> None:
    print(text, flush=True)


def _free_port(host: str, preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise KeystileError(f"no free port on {host}")


def _self_test(server: Any, base: str, key: str) -> int:
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.02)
        checks = [
            ("with Authorization: Bearer", {"Authorization": f"Bearer {key}"}, 200),
            ("with X-API-Key", {"X-API-Key": key}, 200),
            ("without a key", {}, 401),
        ]
        ok = True
        for label, headers, expected in checks:
            status = _get(f"{base}/whoami", headers)
            ok &= status == expected
            _print(f"GET /whoami {label}: {status} (expected {expected})")
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    return 0 if ok else 1


def _get(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
