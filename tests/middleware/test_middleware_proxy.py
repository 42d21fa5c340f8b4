"""Which client address an IP allowlist sees: the server's ``scope["client"]``, set by the
server's own proxy-header handling, started here from its real command line.

uvicorn's defaults (``proxy_headers=True``, ``forwarded_allow_ips`` = loopback) take the
client address from ``X-Forwarded-For`` on every connection from loopback, so anything
on the same host (a TLS terminator, a tunnel, a sidecar that passes the header through)
can choose it. The deployment flags the docs give are checked here against a spoofed
header, with uvicorn's defaults as the control that shows the spoof getting through.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from keystile import CHEAPEST_PARAMETERS, CreatedKey, KeyManager
from keystile.stores import store_from_url

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
#: The address a client on this host claims to be, the only one the key allows.
SPOOFED = "203.0.113.7"
#: The client's real address, as a proxy in front would append it.
REAL_CLIENT = "198.51.100.2"


def create_app() -> Any:
    """The app the servers' command lines serve: ``servers.build_app`` on
    ``$KEYSTILE_DATABASE_URL`` (``GET /whoami``, exempt ``GET /stats``)."""
    from servers import build_app

    return build_app(os.environ["KEYSTILE_DATABASE_URL"], {})


@contextmanager
def server(argv: list[str], database_url: str, log: Path) -> Iterator[str]:
    """The server started by ``argv`` (``{fd}`` stands for a socket bound on 127.0.0.1);
    its base URL once it answers, killed on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    pythonpath = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "KEYSTILE_DATABASE_URL": database_url, "PYTHONPATH": pythonpath}
    env.pop("FORWARDED_ALLOW_IPS", None)
    argv = [part.replace("{fd}", str(sock.fileno())) for part in argv]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, pass_fds=[sock.fileno()], stdout=out, stderr=out, env=env, cwd=HERE
        )
    sock.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()}")
            try:
                httpx.get(f"{base}/stats", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=10)


def uvicorn_cli(*flags: str) -> list[str]:
    """``uvicorn`` as an operator runs it, with ``flags``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "test_middleware_proxy:create_app",
        "--factory",
        "--fd",
        "{fd}",
        "--log-level",
        "warning",
        *flags,
    ]


@pytest.fixture
def sqlite_key(sqlite_database_url: str) -> CreatedKey:
    """A key that may be used only from the spoofed address."""

    async def create() -> CreatedKey:
        store = store_from_url(sqlite_database_url)
        async with KeyManager(store, argon2=CHEAPEST_PARAMETERS) as keys:
            allowlist = [f"{SPOOFED}/32"]
            return await keys.create(owner="acme", name="allowlisted", ip_allowlist=allowlist)

    return anyio.run(create)


def whoami(base: str, key: CreatedKey, forwarded_for: str = SPOOFED) -> httpx.Response:
    headers = {"X-API-Key": key.key, "X-Forwarded-For": forwarded_for}
    return httpx.get(f"{base}/whoami", headers=headers, timeout=10)


def refused(response: httpx.Response) -> bool:
    return response.status_code == 403 and response.json()["error"] == "ip_not_allowed"


def test_uvicorn_defaults_take_the_address_from_x_forwarded_for(
    sqlite_database_url: str, sqlite_key: CreatedKey, tmp_path: Path
) -> None:
    """The control: plain ``uvicorn app`` lets a loopback client choose its address."""
    with server(uvicorn_cli(), sqlite_database_url, tmp_path / "log") as base:
        r = whoami(base, sqlite_key)
    assert r.status_code == 200, r.text
    assert r.json()["key_id"] == sqlite_key.id


def test_no_proxy_headers_refuses_a_spoofed_x_forwarded_for(
    sqlite_database_url: str, sqlite_key: CreatedKey, tmp_path: Path
) -> None:
    """``--no-proxy-headers`` (no proxy in front): the header is ignored, 403."""
    cli = uvicorn_cli("--no-proxy-headers")
    with server(cli, sqlite_database_url, tmp_path / "log") as base:
        assert refused(whoami(base, sqlite_key))


def test_forwarded_allow_ips_of_a_remote_proxy_ignores_local_clients(
    sqlite_database_url: str, sqlite_key: CreatedKey, tmp_path: Path
) -> None:
    """``--forwarded-allow-ips=<the proxy's address>``: a client that is not that proxy
    (here one on loopback) cannot set its address, 403."""
    cli = uvicorn_cli("--forwarded-allow-ips=10.0.0.5")
    with server(cli, sqlite_database_url, tmp_path / "log") as base:
        assert refused(whoami(base, sqlite_key))


def test_a_trusted_proxy_must_append_or_overwrite_the_header(
    sqlite_database_url: str, sqlite_key: CreatedKey, tmp_path: Path
) -> None:
    """Behind a trusted local proxy uvicorn reads the last address in ``X-Forwarded-For``:
    one appended by the proxy (the real client) wins over what the client sent, 403; a
    header passed through untouched is the client's choice, 200."""
    with server(uvicorn_cli(), sqlite_database_url, tmp_path / "log") as base:
        appended = whoami(base, sqlite_key, f"{SPOOFED}, {REAL_CLIENT}")
        overwritten = whoami(base, sqlite_key, REAL_CLIENT)
        passed_through = whoami(base, sqlite_key, SPOOFED)
    assert refused(appended)
    assert refused(overwritten)
    assert passed_through.status_code == 200


def test_hypercorn_defaults_ignore_x_forwarded_for(
    sqlite_database_url: str, sqlite_key: CreatedKey, tmp_path: Path
) -> None:
    """Hypercorn reads no proxy header unless told to: the spoof gets 403."""
    cli = [sys.executable, "-m", "hypercorn", "test_middleware_proxy:create_app()"]
    cli += ["--bind", "fd://{fd}", "--log-level", "warning"]
    with server(cli, sqlite_database_url, tmp_path / "log") as base:
        assert refused(whoami(base, sqlite_key))


# -- the docs say so ------------------------------------------------------------------------

DOCS = ["README.md", "docs/security.md", "docs/operations.md"]


def proxy_section(path: str) -> str:
    """The part of ``path`` about client addresses behind proxies: operations.md's section
    on it; elsewhere each paragraph, list item or table row naming ``X-Forwarded-For``."""
    text = (ROOT / path).read_text()
    if path == "docs/operations.md":
        section = text[text.index("### IP allowlists and proxies") :]
        following = re.search(r"\n#+ ", section)
        return section[: following.start()] if following else section
    blocks = re.split(r"\n\s*\n|\n(?=[-|] )", text)
    return "\n".join(b for b in blocks if "X-Forwarded-For" in b)


@pytest.mark.parametrize("path", DOCS)
def test_docs_say_what_uvicorns_defaults_trust_and_give_the_flags(path: str) -> None:
    """README, security.md and operations.md say that uvicorn's defaults trust
    ``X-Forwarded-For`` from loopback and give the flags tested above."""
    section = proxy_section(path)
    for needed in (
        "proxy_headers=True",
        "127.0.0.1",
        "--no-proxy-headers",
        "--forwarded-allow-ips=",
    ):
        assert needed in section, f"{path} does not say {needed!r} where it speaks of proxies"


def test_operations_gives_the_flags_of_each_deployment() -> None:
    """operations.md names, per deployment, the flags the tests above run, and
    gunicorn's and hypercorn's."""
    section = proxy_section("docs/operations.md")
    for needed in (
        "--no-proxy-headers",
        "--forwarded-allow-ips=",
        "FORWARDED_ALLOW_IPS",
        "gunicorn",
        "hypercorn",
        "append",
        "overwrite",
    ):
        assert needed in section, f"operations.md does not say {needed!r}"


def test_the_defaults_the_docs_state_are_uvicorns(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's own defaults are what the docs say: proxy headers on, loopback trusted."""
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    config = uvicorn.Config(create_app)
    assert config.proxy_headers is True
    trusted = config.forwarded_allow_ips
    assert "127.0.0.1" in (trusted if isinstance(trusted, list) else trusted.split(","))
