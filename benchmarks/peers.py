"""Peer libraries for keystile's benchmarks, each wired the way its own README does it.

Peers (all from PyPI, see the ``bench`` extra):

* ``keyshield`` with its cache: ``CachedApiKeyService`` (aiocache ``SimpleMemoryCache``)
  over ``InMemoryApiKeyRepository``, as in its canonical cache example.
* ``keyshield`` with the SQL repository of its README's FastAPI example: SQLAlchemy async
  engine on ``sqlite+aiosqlite``, one session per request, ``ensure_table`` per request,
  plain ``ApiKeyService`` (no cache).
* ``fastapi-keygate`` with its zero-setup SQLite default (``KeyGate(app, ...)``).

keyshield sleeps a random 0.1-0.3 s on *every* ``verify_key`` (success included) by
default; the ``*-nodelay`` variants set ``min_delay=max_delay=0`` (a documented constructor
argument) to expose what the rest of its verification path costs. They are not defaults.

This module never imports keystile. Run it directly::

    python benchmarks/peers.py --keys 1000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import pathlib
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx
from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message

__all__ = [
    "PEERS",
    "PeerApp",
    "build_baseline",
    "build_fastapi_keygate",
    "build_keyshield_cached",
    "build_keyshield_cached_nodelay",
    "build_keyshield_sql",
    "build_keyshield_sql_nodelay",
    "measure_asgi",
    "run_lifespan",
]

#: Pepper handed to keyshield's Argon2 hasher (its README reads it from ``SECRET_PEPPER``;
#: leaving it unset makes keyshield warn and fall back to a public default).
_PEPPER = "keystile-benchmark-pepper-" + secrets.token_hex(16)


@dataclass
class PeerApp:
    """One peer configuration, ready to be measured."""

    name: str
    description: str
    app: ASGIApp
    headers: dict[str, str]
    aclose: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)


Builder = Callable[[int, pathlib.Path], Awaitable[PeerApp]]


def _version(dist: str) -> str:
    return importlib.metadata.version(dist)


def _pick(keys: list[str]) -> str:
    """The key the benchmark presents: the middle one, not the first or last created."""
    if not keys:
        raise ValueError("n_keys must be at least 1")
    return keys[len(keys) // 2]


# --------------------------------------------------------------------------- baseline


async def build_baseline(n_keys: int, workdir: pathlib.Path) -> PeerApp:
    """Bare FastAPI app with the same route and no authentication."""
    del n_keys, workdir
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return PeerApp(
        name="fastapi-bare",
        description=f"fastapi {_version('fastapi')}, no auth (baseline)",
        app=app,
        headers={},
    )


# --------------------------------------------------------------------------- keyshield


class _Delay(TypedDict, total=False):
    min_delay: float
    max_delay: float


def _keyshield_delay_kwargs(delay: tuple[float, float] | None) -> _Delay:
    if delay is None:
        return {}  # keep keyshield's own defaults
    return {"min_delay": delay[0], "max_delay": delay[1]}


# Routes use ``param: T = Depends(dep)`` rather than ``Annotated[T, Depends(dep)]``: with
# ``from __future__ import annotations`` FastAPI resolves annotation strings in module globals,
# where the peers' lazily imported types are missing, and would turn the param into a query one.


def _keyshield_app(svc_dependency: Callable[..., Awaitable[Any]]) -> FastAPI:
    from keyshield import ApiKey
    from keyshield.api import create_depends_api_key

    security = create_depends_api_key(svc_dependency)  # default scheme: HTTPBearer
    app = FastAPI()

    @app.get("/ping")
    async def ping(api_key: ApiKey = Depends(security)) -> dict[str, bool]:  # noqa: B008
        return {"ok": True}

    return app


async def build_keyshield_cached(
    n_keys: int,
    workdir: pathlib.Path,
    *,
    delay: tuple[float, float] | None = None,
) -> PeerApp:
    """keyshield's cached service over its in-memory repository (its cache example)."""
    del workdir
    from keyshield.hasher.argon2 import Argon2ApiKeyHasher
    from keyshield.repositories.in_memory import InMemoryApiKeyRepository
    from keyshield.services.cached import CachedApiKeyService

    svc = CachedApiKeyService(
        repo=InMemoryApiKeyRepository(),
        hasher=Argon2ApiKeyHasher(pepper=_PEPPER),
        **_keyshield_delay_kwargs(delay),
    )
    keys = [(await svc.create(name=f"bench-{i}"))[1] for i in range(n_keys)]

    async def inject_svc_api_keys() -> CachedApiKeyService:
        return svc

    suffix = "" if delay is None else "-nodelay"
    return PeerApp(
        name=f"keyshield-cached{suffix}",
        description=(
            f"keyshield {_version('keyshield')}, CachedApiKeyService "
            f"(aiocache {_version('aiocache')} SimpleMemoryCache, ttl {svc.cache_ttl}s, "
            "key=sha256(api key)), InMemory repository, Argon2 (argon2-cffi defaults), "
            f"Bearer, delay {svc.min_delay}-{svc.max_delay}s"
            + ("" if delay is None else " (NOT default)")
        ),
        app=_keyshield_app(inject_svc_api_keys),
        headers={"Authorization": f"Bearer {_pick(keys)}"},
    )


async def build_keyshield_sql(
    n_keys: int,
    workdir: pathlib.Path,
    *,
    delay: tuple[float, float] | None = None,
) -> PeerApp:
    """keyshield as in its README's FastAPI example: SQLAlchemy + aiosqlite, no cache."""
    from keyshield import ApiKeyService
    from keyshield.hasher.argon2 import Argon2ApiKeyHasher
    from keyshield.repositories.sql import SqlAlchemyApiKeyRepository
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    suffix = "" if delay is None else "-nodelay"
    db_path = workdir / f"keyshield{suffix}.sqlite3"
    hasher = Argon2ApiKeyHasher(pepper=_PEPPER)
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{db_path}")
    async_session_maker = async_sessionmaker(
        async_engine, class_=AsyncSession, expire_on_commit=False
    )
    delay_kwargs = _keyshield_delay_kwargs(delay)

    async def inject_async_session() -> AsyncIterator[AsyncSession]:
        async with async_session_maker() as session, session.begin():
            yield session

    async def inject_svc_api_keys(
        async_session: AsyncSession = Depends(inject_async_session),  # noqa: B008
    ) -> ApiKeyService:
        repo = SqlAlchemyApiKeyRepository(async_session)
        await repo.ensure_table(async_engine=async_engine)  # per request, as in the README
        return ApiKeyService(repo=repo, hasher=hasher, **delay_kwargs)

    # Create the N keys through the service, in one transaction.
    async with async_session_maker() as session, session.begin():
        repo = SqlAlchemyApiKeyRepository(session)
        await repo.ensure_table(async_engine=async_engine)
        svc = ApiKeyService(repo=repo, hasher=hasher, **delay_kwargs)
        keys = [(await svc.create(name=f"bench-{i}"))[1] for i in range(n_keys)]

    return PeerApp(
        name=f"keyshield-sql{suffix}",
        description=(
            f"keyshield {_version('keyshield')}, ApiKeyService (no cache), "
            f"SqlAlchemyApiKeyRepository (SQLAlchemy {_version('sqlalchemy')} + aiosqlite "
            f"{_version('aiosqlite')}, session+ensure_table per request), Argon2 "
            f"(argon2-cffi defaults), Bearer, delay {svc.min_delay}-{svc.max_delay}s"
            + ("" if delay is None else " (NOT default)")
        ),
        app=_keyshield_app(inject_svc_api_keys),
        headers={"Authorization": f"Bearer {_pick(keys)}"},
        aclose=async_engine.dispose,
    )


async def build_keyshield_cached_nodelay(n_keys: int, workdir: pathlib.Path) -> PeerApp:
    """Like :func:`build_keyshield_cached` with keyshield's response delay set to 0."""
    return await build_keyshield_cached(n_keys, workdir, delay=(0.0, 0.0))


async def build_keyshield_sql_nodelay(n_keys: int, workdir: pathlib.Path) -> PeerApp:
    """Like :func:`build_keyshield_sql` with keyshield's response delay set to 0."""
    return await build_keyshield_sql(n_keys, workdir, delay=(0.0, 0.0))


# --------------------------------------------------------------------------- fastapi-keygate

#: keygate's default is 60 requests/minute per key; a benchmark of 429s is worthless, so keys
#: get a per-minute limit that cannot trip. The limiter still runs on every request.
KEYGATE_PER_MINUTE = 1_000_000_000


async def build_fastapi_keygate(n_keys: int, workdir: pathlib.Path) -> PeerApp:
    """fastapi-keygate's sync ``KeyGate`` with its SQLite default, as in its README."""
    from keygate import ApiKey, KeyGate

    app = FastAPI()
    # README: KeyGate(app, admin_secret="change-me"); default db_url is sqlite:///keygate.db
    # (relative to the cwd), here the same driver with the file in workdir.
    gate = KeyGate(
        app,
        db_url=f"sqlite:///{workdir / 'keygate.db'}",
        admin_secret=secrets.token_urlsafe(16),
    )

    @app.get("/ping")
    async def ping(key: ApiKey = Depends(gate.require)) -> dict[str, bool]:  # noqa: B008
        return {"ok": True}

    keys = [gate.create_key(f"owner-{i}", per_minute=KEYGATE_PER_MINUTE).key for i in range(n_keys)]
    return PeerApp(
        name="fastapi-keygate",
        description=(
            f"fastapi-keygate {_version('fastapi-keygate')}, KeyGate SQLite default "
            f"(sync SQLAlchemy {_version('sqlalchemy')}, lookup + usage-row commit per request), "
            f"SHA-256 + hmac.compare_digest, X-API-Key, limits {_version('limits')} "
            f"in-memory moving window at {KEYGATE_PER_MINUTE}/min"
        ),
        app=app,
        headers={"X-API-Key": _pick(keys)},
    )


PEERS: dict[str, Builder] = {
    "fastapi-bare": build_baseline,
    "keyshield-cached": build_keyshield_cached,
    "keyshield-sql": build_keyshield_sql,
    "fastapi-keygate": build_fastapi_keygate,
    "keyshield-cached-nodelay": build_keyshield_cached_nodelay,
    "keyshield-sql-nodelay": build_keyshield_sql_nodelay,
}


# --------------------------------------------------------------------------- measuring


@contextlib.asynccontextmanager
async def run_lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan (startup before, shutdown after) around the block.

    httpx's ASGITransport sends no lifespan events. An app that does not speak the
    lifespan protocol (raises or returns at once) is used as is, as servers do.
    """
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def receive() -> Message:
        return await to_app.get()

    async def send(message: Message) -> None:
        await from_app.put(message)

    async def call_app() -> None:
        await app(scope, receive, send)

    task = asyncio.create_task(call_app())

    async def next_message() -> Message | None:
        getter = asyncio.ensure_future(from_app.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        with contextlib.suppress(Exception):
            task.result()  # lifespan unsupported: the app raised or returned
        return None

    await to_app.put({"type": "lifespan.startup"})
    started = await next_message()
    if started is not None and started["type"] == "lifespan.startup.failed":
        raise RuntimeError(f"lifespan startup failed: {started.get('message', '')}")
    try:
        yield
    finally:
        if started is not None:
            await to_app.put({"type": "lifespan.shutdown"})
            stopped = await next_message()
            if stopped is not None and stopped["type"] == "lifespan.shutdown.failed":
                raise RuntimeError(f"lifespan shutdown failed: {stopped.get('message', '')}")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)


async def measure_asgi(
    app: ASGIApp,
    headers: dict[str, str],
    *,
    requests: int,
    warmup: int = 50,
    path: str = "/ping",
) -> list[float]:
    """Per-request latency in µs of ``requests`` sequential GETs, after ``warmup`` ones.

    Requests go through httpx's ASGITransport (full HTTP request/response cycle, no
    socket). Raises ``AssertionError`` unless every response is 200 ``{"ok": true}``.
    """
    latencies: list[float] = []
    bad: list[tuple[int, str]] = []
    transport = httpx.ASGITransport(app=app)
    async with (
        run_lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        for _ in range(warmup):
            response = await client.get(path, headers=headers)
            if response.status_code != 200 or response.json() != {"ok": True}:
                bad.append((response.status_code, response.text[:200]))
                break
        if bad:
            raise AssertionError(f"warm-up got {bad[0][0]}: {bad[0][1]}")
        perf = time.perf_counter_ns
        for _ in range(requests):
            start = perf()
            response = await client.get(path, headers=headers)
            elapsed = perf() - start
            if response.status_code != 200:
                bad.append((response.status_code, response.text[:200]))
            latencies.append(elapsed / 1_000)
    if bad:
        raise AssertionError(f"{len(bad)}/{requests} responses were not 200, first: {bad[0]}")
    return latencies


# --------------------------------------------------------------------------- CLI


@dataclass
class Result:
    name: str
    description: str
    requests: int
    median_us: float
    p99_us: float
    build_s: float


def _summarize(peer: PeerApp, latencies: list[float], build_s: float) -> Result:
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
    return Result(
        name=peer.name,
        description=peer.description,
        requests=len(latencies),
        median_us=statistics.median(latencies),
        p99_us=p99,
        build_s=build_s,
    )


def _print_table(results: list[Result], baseline: Result | None) -> None:
    rows = [("peer", "median µs", "p99 µs", "x bare", "build s", "description")]
    for r in results:
        ratio = f"{r.median_us / baseline.median_us:,.1f}" if baseline else "-"
        rows.append(
            (
                r.name,
                f"{r.median_us:,.0f}",
                f"{r.p99_us:,.0f}",
                ratio,
                f"{r.build_s:.1f}",
                r.description,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:5], widths[1:], strict=True)
        ]
        print(" | ".join([*cells, row[5]]))
        if i == 0:
            print("-+-".join("-" * w for w in widths) + "-+-" + "-" * 11)


async def _run(args: argparse.Namespace) -> list[Result]:
    names: list[str] = args.only or list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; known: {list(PEERS)}")
    if "fastapi-bare" not in names:
        names.insert(0, "fastapi-bare")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="keystile-peers-") as tmp:
        workdir = pathlib.Path(tmp)
        for name in names:
            print(f"[{name}] creating {args.keys} keys ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            peer = await PEERS[name](args.keys, workdir)
            build_s = time.perf_counter() - t0
            print(
                f"[{name}] built in {build_s:.1f}s; measuring {args.requests} requests ...",
                file=sys.stderr,
                flush=True,
            )
            try:
                latencies = await measure_asgi(
                    peer.app, peer.headers, requests=args.requests, warmup=args.warmup
                )
            finally:
                if peer.aclose is not None:
                    await peer.aclose()
            result = _summarize(peer, latencies, build_s)
            print(
                f"[{name}] median {result.median_us:,.0f} µs, p99 {result.p99_us:,.0f} µs",
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=1_000, help="keys created per peer")
    parser.add_argument("--requests", type=int, default=2_000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    parser.add_argument("--only", nargs="+", metavar="PEER", help=f"subset of {list(PEERS)}")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)

    results = asyncio.run(_run(args))
    baseline = next((r for r in results if r.name == "fastapi-bare"), None)
    print(
        f"\n{args.keys} keys per peer, {args.requests} sequential requests each "
        f"(after {args.warmup} warm-up), httpx.ASGITransport, Python {sys.version.split()[0]}\n"
    )
    _print_table(results, baseline)
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
