"""keystile as the sections set it up: the minimal apps, bare and protected, cached keys
without argon2, keys minted through ``KeyManager``, and Postgres schemas of their own.

Protected apps are ``APIKeyMiddleware(app, store=MemoryKeyStore(), ...)`` with N keys put
straight into the verified-key cache (``fill_cache``: no store rows, no argon2), so every
measured request is a cache hit. ``cache_ttl`` and ``cache_idle`` are an hour, so no state
refresh (which would not find these synthetic keys in the store) happens mid-run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager, MemoryKeyStore
from keystile.cache import CachedKey, VerifiedKeyCache, auth_scopes
from keystile.hashing import Argon2Parameters
from keystile.limits import LimitPolicy
from keystile.manager import CreatedKey
from keystile.principal import APIKeyUser
from keystile.tokens import generate_key

__all__ = [
    "FloorMiddleware",
    "close_checked",
    "count_statements",
    "counted",
    "fastapi_app",
    "fill_cache",
    "mint",
    "postgres_schema",
    "protect",
    "starlette_app",
]


async def _ping(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/ping", _ping)])


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


def fill_cache(
    cache: VerifiedKeyCache, n: int, limits: LimitPolicy | None = None, *, keep_tokens: bool = True
) -> list[bytes]:
    """Insert ``n`` freshly generated keys straight into ``cache`` (no store, no argon2).

    Returns the tokens in slot order: ``tokens[0]`` sits in the first slot of the scan,
    ``tokens[-1]`` in the last. With ``keep_tokens=False`` none are kept (and none
    returned): each key's token and other passing objects are freed before the next key
    is made, as when a server proves its keys one request at a time.
    """
    now = time.monotonic()
    tokens: list[bytes] = []
    for _ in range(n):
        plaintext, parsed = generate_key()
        token = plaintext.encode()
        user = APIKeyUser(
            key_id=parsed.key_id,
            owner="bench",
            name=f"k-{parsed.key_id}",
            scopes=("read",),
            limits=limits,
        )
        if not cache.insert(
            cache.digest(token), CachedKey(user, None, now), now=now, epoch=cache.epoch
        ):
            raise RuntimeError("cache refused an insert")
        if keep_tokens:
            tokens.append(token)
    if len(cache) != n:
        raise RuntimeError(f"cache holds {len(cache)} keys, expected {n} (max_size too small?)")
    return tokens


def protect(
    app: ASGIApp, n_keys: int, limits: LimitPolicy | None = None
) -> tuple[APIKeyMiddleware, bytes]:
    """``app`` behind keystile with ``n_keys`` cached keys (each with ``limits``); returns it
    and the middle token."""
    middleware = APIKeyMiddleware(
        app,
        store=MemoryKeyStore(),
        argon2=CHEAPEST_PARAMETERS,
        cache_ttl=3600.0,
        cache_idle=3600.0,
        cache_max_size=max(n_keys, 1),
    )
    tokens = fill_cache(middleware.verifier.cache, n_keys, limits)
    return middleware, tokens[len(tokens) // 2]


class FloorMiddleware:
    """The least any middleware with keystile's cache can do on a hit, as a yardstick:
    find the ``Authorization`` header, digest + constant-time scan, set the user. No
    validation, no failure handling, no usage recording, no header stripping: not a
    usable middleware, only the floor under keystile's overhead."""

    def __init__(self, app: ASGIApp, cache: VerifiedKeyCache) -> None:
        self.app = app
        self.cache = cache
        #: The table's own lookup: the state of the slot found, no wrapper around it.
        self.lookup = cache.table.lookup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    token = value[7:]
            found = self.lookup(self.cache.digest(token), 0.0)
            if found is None:
                raise RuntimeError("the floor middleware only measures hits")
            user = scope["user"] = found[0]
            scope["auth"] = AuthCredentials(auth_scopes(user.scopes))
        await self.app(scope, receive, send)


async def mint(
    url: str,
    n: int,
    *,
    argon2: Argon2Parameters = CHEAPEST_PARAMETERS,
    pairs: bool = False,
    **fields: Any,
) -> list[CreatedKey]:
    """``n`` keys minted by ``KeyManager`` in the store at ``url``; ``pairs``: two hashes at
    a time (argon2 at real parameters on 2 cores)."""
    async with KeyManager.from_url(url, argon2=argon2) as manager:
        keys: list[CreatedKey] = []
        step = 2 if pairs else 1
        for start in range(0, n, step):
            batch = [
                manager.create(owner="bench", name=f"k{i}-{uuid.uuid4().hex[:8]}", **fields)
                for i in range(start, min(n, start + step))
            ]
            keys.extend(await asyncio.gather(*batch))
    return keys


# -- Postgres ---------------------------------------------------------------------------


@asynccontextmanager
async def postgres_schema(url: str) -> AsyncIterator[tuple[str, str]]:
    """A store URL in a schema of its own, and the schema's name; dropped afterwards."""
    import asyncpg

    schema = f"keystile_bench_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in url else "?"
    conn = await asyncpg.connect(url)
    try:
        yield f"{url}{sep}schema={schema}", schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def count_statements(conn: Any, schema: str, triggers: dict[str, str]) -> None:
    """Statement-level triggers counting what Postgres itself runs: ``{kind: "UPDATE ON
    keystile_keys"}`` counts the UPDATE statements of that table under ``kind``."""
    q = f'"{schema}"'
    sql = [f"CREATE TABLE {q}.statements (kind text PRIMARY KEY, n bigint NOT NULL);"]
    for kind, event in triggers.items():
        action, table = event.split(" ON ")
        sql.append(
            f"""INSERT INTO {q}.statements VALUES ('{kind}', 0);
            CREATE FUNCTION {q}.count_{kind}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN UPDATE {q}.statements SET n = n + 1 WHERE kind = '{kind}'; RETURN NULL; END $$;
            CREATE TRIGGER count_{kind} AFTER {action} ON {q}.{table}
                FOR EACH STATEMENT EXECUTE FUNCTION {q}.count_{kind}();"""
        )
    await conn.execute("\n".join(sql))


async def counted(conn: Any, schema: str) -> dict[str, int]:
    """The statements counted since the last call, per kind (and the counters reset)."""
    rows = await conn.fetch(f'SELECT kind, n FROM "{schema}".statements')
    await conn.execute(f'UPDATE "{schema}".statements SET n = 0')
    return {row["kind"]: row["n"] for row in rows}


async def close_checked(middlewares: Iterable[APIKeyMiddleware], *, refusals: bool = False) -> None:
    """Close the middlewares; a cache miss (or, unless ``refusals``, a refused request)
    during a run of hits means the run measured something else."""
    for middleware in middlewares:
        await middleware.aclose()
        stats = middleware.stats()
        if stats.cache_misses or (stats.rejects and not refusals):
            raise AssertionError(f"misses or refusals during the run: {stats.as_dict()}")
