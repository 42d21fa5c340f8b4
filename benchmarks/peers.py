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

This module never imports keystile. Run it directly (``--quick``: 20 keys, 200 requests)::

    python benchmarks/peers.py --keys 1000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import pathlib
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from asgi import measure_asgi
from fastapi import Depends, FastAPI
from harness import Target, cli, median, p99, print_table
from starlette.types import ASGIApp

__all__ = [
    "PEERS",
    "PeerApp",
    "build_baseline",
    "build_fastapi_keygate",
    "build_keyshield_cached",
    "build_keyshield_sql",
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


def _delay(nodelay: bool) -> dict[str, float]:
    """keyshield's own delay defaults, or none at all (not a default)."""
    return {"min_delay": 0.0, "max_delay": 0.0} if nodelay else {}


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
    n_keys: int, workdir: pathlib.Path, *, nodelay: bool = False
) -> PeerApp:
    """keyshield's cached service over its in-memory repository (its cache example)."""
    del workdir
    from keyshield.hasher.argon2 import Argon2ApiKeyHasher
    from keyshield.repositories.in_memory import InMemoryApiKeyRepository
    from keyshield.services.cached import CachedApiKeyService

    svc = CachedApiKeyService(
        repo=InMemoryApiKeyRepository(),
        hasher=Argon2ApiKeyHasher(pepper=_PEPPER),
        **_delay(nodelay),
    )
    keys = [(await svc.create(name=f"bench-{i}"))[1] for i in range(n_keys)]

    async def inject_svc_api_keys() -> CachedApiKeyService:
        return svc

    suffix = "-nodelay" if nodelay else ""
    return PeerApp(
        name=f"keyshield-cached{suffix}",
        description=(
            f"keyshield {_version('keyshield')}, CachedApiKeyService "
            f"(aiocache {_version('aiocache')} SimpleMemoryCache, ttl {svc.cache_ttl}s, "
            "key=sha256(api key)), InMemory repository, Argon2 (argon2-cffi defaults), "
            f"Bearer, delay {svc.min_delay}-{svc.max_delay}s"
            + (" (NOT default)" if nodelay else "")
        ),
        app=_keyshield_app(inject_svc_api_keys),
        headers={"Authorization": f"Bearer {_pick(keys)}"},
    )


async def build_keyshield_sql(
    n_keys: int, workdir: pathlib.Path, *, nodelay: bool = False
) -> PeerApp:
    """keyshield as in its README's FastAPI example: SQLAlchemy + aiosqlite, no cache."""
    from keyshield import ApiKeyService
    from keyshield.hasher.argon2 import Argon2ApiKeyHasher
    from keyshield.repositories.sql import SqlAlchemyApiKeyRepository
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    suffix = "-nodelay" if nodelay else ""
    db_path = workdir / f"keyshield{suffix}.sqlite3"
    hasher = Argon2ApiKeyHasher(pepper=_PEPPER)
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{db_path}")
    async_session_maker = async_sessionmaker(
        async_engine, class_=AsyncSession, expire_on_commit=False
    )
    delay_kwargs = _delay(nodelay)

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
            + (" (NOT default)" if nodelay else "")
        ),
        app=_keyshield_app(inject_svc_api_keys),
        headers={"Authorization": f"Bearer {_pick(keys)}"},
        aclose=async_engine.dispose,
    )


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
    "keyshield-cached-nodelay": functools.partial(build_keyshield_cached, nodelay=True),
    "keyshield-sql-nodelay": functools.partial(build_keyshield_sql, nodelay=True),
}


# --------------------------------------------------------------------------- CLI


async def _run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    names: list[str] = args.only or list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; known: {list(PEERS)}")
    if "fastapi-bare" not in names:
        names.insert(0, "fastapi-bare")
    keys, requests = (20, 200) if args.quick else (args.keys, args.requests)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="keystile-peers-") as tmp:
        for name in names:
            print(f"[{name}] creating {keys} keys ...", flush=True)
            t0 = time.perf_counter()
            peer = await PEERS[name](keys, pathlib.Path(tmp))
            build_s = time.perf_counter() - t0
            try:
                latencies = await measure_asgi(
                    peer.app, peer.headers, requests=requests, warmup=args.warmup
                )
            finally:
                if peer.aclose is not None:
                    await peer.aclose()
            results[name] = {
                "description": peer.description,
                "requests": len(latencies),
                "median_us": median(latencies),
                "p99_us": p99(latencies),
                "build_s": build_s,
            }
    bare = results["fastapi-bare"]["median_us"]
    print_table(
        f"{keys} keys per peer, {requests} sequential requests each (after {args.warmup} "
        f"warm-up), httpx.ASGITransport, Python {sys.version.split()[0]}",
        ("peer", "median µs", "p99 µs", "x bare", "build s"),
        [
            (
                name,
                f"{r['median_us']:,.0f}",
                f"{r['p99_us']:,.0f}",
                f"{r['median_us'] / bare:,.1f}",
                f"{r['build_s']:.1f}",
            )
            for name, r in results.items()
        ],
    )
    for name, r in results.items():
        print(f"  - {name}: {r['description']}")
    return {"keys": keys, "requests": requests, "peers": results}, []


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1_000, help="keys created per peer")
    parser.add_argument("--requests", type=int, default=2_000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    parser.add_argument("--only", nargs="+", metavar="PEER", help=f"subset of {list(PEERS)}")


if __name__ == "__main__":
    raise SystemExit(
        cli("peers-alone", __doc__, lambda a: asyncio.run(_run(a)), configure=_options)
    )
