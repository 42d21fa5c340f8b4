"""A protected app under a real uvicorn in a child process, for load and fault tests.

The parent binds a socket on 127.0.0.1 (port 0: no race for a free port) and hands it
to the child (``pass_fds``), so the server is reachable the moment the child listens and
its pid is the one whose memory we measure and to which we send SIGTERM.

Run as a script, this module is the child: ``python tests/servers.py --fd N
--database-url URL --options JSON``. The app has ``GET /whoami`` (the key id and what the
app saw of the credential headers) and an exempt ``GET /stats`` (the middleware's
counters, plus the negative cache's size, which the counters do not show).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve()


class Server:
    """The parent's handle on a running child server."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.base_url}/stats", timeout=10)
        r.raise_for_status()
        stats: dict[str, Any] = r.json()
        return stats

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, as a process manager would; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@contextmanager
def uvicorn_server(
    database_url: str,
    log: Path,
    *,
    startup_timeout: float = 30.0,
    root_path: str = "",
    **options: Any,
) -> Iterator[Server]:
    """A child uvicorn serving the protected app; killed on exit if still running.

    ``root_path`` is uvicorn's ``--root-path``, as when the app is served behind a proxy
    under a path prefix."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    argv = [sys.executable, str(HERE), "--fd", str(sock.fileno()), "--database-url"]
    argv += [database_url, "--options", json.dumps(options), "--root-path", root_path]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, pass_fds=[sock.fileno()], stdout=out, stderr=out)
    sock.close()
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                server.stats()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- the child ----------------------------------------------------------------------------


def build_app(database_url: str, options: dict[str, Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "key_id": getattr(request.user, "key_id", None),
                "credential_headers": [
                    name
                    for name in request.headers
                    if name.lower() in ("authorization", "x-api-key")
                ],
            }
        )

    async def stats(request: Request) -> JSONResponse:
        middleware: APIKeyMiddleware = request.scope["keystile"]
        negative = middleware.verifier._negative
        return JSONResponse(
            {
                **middleware.stats().as_dict(),
                "negative_size": len(negative) if negative is not None else 0,
                "negative_max_size": negative.maxsize if negative is not None else 0,
            }
        )

    options = {"argon2": CHEAPEST_PARAMETERS, **options}
    inner = Starlette(routes=[Route("/whoami", whoami), Route("/stats", stats)])
    return APIKeyMiddleware(inner, database_url=database_url, exempt_paths=["/stats"], **options)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--root-path", default="")
    args = parser.parse_args()
    app = build_app(args.database_url, json.loads(args.options))
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=10,
        backlog=2048,
        root_path=args.root_path,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
