"""What the browser tests share: Debian's Chromium driven by playwright, and an app under
uvicorn in a child process.

The browser is Debian's ``chromium`` package (``/usr/bin/chromium``), driven by
playwright through ``executable_path``; no browser build is downloaded. Without it (or
without playwright) the browser tests skip, unless ``KEYSTILE_REQUIRE_BROWSER=1`` (set by
``.ci/run``) turns the skip into a failure.

The app runs as a script in a child process: the parent binds the socket (port 0: no race
for a free port) and passes it on (``--fd N``), as ``servers.py`` does.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

TESTS = Path(__file__).resolve().parent
CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("KEYSTILE_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: How long one step in the page may take (ms).
STEP_TIMEOUT = 20_000


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


def require_browser(what: str) -> None:
    """Skip (or fail, with ``KEYSTILE_REQUIRE_BROWSER=1``) when there is no browser."""
    missing = browser_missing()
    if missing is None:
        return
    if REQUIRE_BROWSER:
        pytest.fail(f"KEYSTILE_REQUIRE_BROWSER=1 but {missing}")
    pytest.skip(f"{what} need Chromium: {missing}")


@contextmanager
def child_server(script: Path, args: list[str], log: Path, ready_path: str) -> Iterator[str]:
    """``script --fd N *args`` serving on 127.0.0.1; its base URL once ``ready_path``
    answers 200; terminated on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    argv = [sys.executable, str(script), "--fd", str(sock.fileno()), *args]
    # The script imports the shared helpers (this module) by their plain names, as a test does.
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            pass_fds=[sock.fileno()],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONPATH": path},
        )
    sock.close()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base_url}{ready_path}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_path} did not answer 200:\n{log.read_text()}")
            time.sleep(0.05)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


def serve(build_app: Callable[[str], Any]) -> None:
    """The child's side: ``--fd N --database-url URL``, ``build_app(URL)`` under uvicorn on
    the socket the parent passed."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    args = parser.parse_args()
    app = build_app(args.database_url)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
