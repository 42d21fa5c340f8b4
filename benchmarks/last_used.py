"""last_used_at: keystile's batched writer vs one UPDATE per request, on one Postgres.

Sends ``--requests`` authenticated requests spread over ``--keys`` keys through
``APIKeyMiddleware`` (over ASGI, no network), lets its ``UsageRecorder`` flush every
``--flush-interval`` seconds plus once at shutdown, and counts the UPDATE statements
Postgres itself saw with a statement-level trigger on ``keystile_keys``. The DB time of
the batched writer is the sum of its ``touch_many`` calls. Then it replays the same
(key, time) sequence as one autocommit ``UPDATE keystile_keys SET last_used_at = $1
WHERE id = $2`` per request on one connection, once with the counting trigger (to count)
and once without it (to time, so the trigger's own cost does not inflate the naive side).

Everything runs in a schema of its own, dropped at the end::

    python benchmarks/last_used.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from urllib.parse import urlsplit

import asyncpg
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware, KeyManager
from keystile.stores.postgres import PostgresKeyStore


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def install_counter(conn: asyncpg.Connection, q: str) -> None:
    await conn.execute(
        f"""
        CREATE TABLE {q}.update_statements (n bigint NOT NULL);
        INSERT INTO {q}.update_statements VALUES (0);
        CREATE FUNCTION {q}.count_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN UPDATE {q}.update_statements SET n = n + 1; RETURN NULL; END $$;
        CREATE TRIGGER count_updates AFTER UPDATE ON {q}.keystile_keys
            FOR EACH STATEMENT EXECUTE FUNCTION {q}.count_update();
        """
    )


async def counted(conn: asyncpg.Connection, q: str) -> int:
    n: int = await conn.fetchval(f"SELECT n FROM {q}.update_statements")
    await conn.execute(f"UPDATE {q}.update_statements SET n = 0")
    return n


async def run(args: argparse.Namespace) -> None:
    schema = f"keystile_bench_{uuid.uuid4().hex[:10]}"
    q = f'"{schema}"'
    sep = "&" if urlsplit(args.postgres_url).query else "?"
    url = f"{args.postgres_url}{sep}schema={schema}"
    raw = await asyncpg.connect(args.postgres_url)
    try:
        # Keys minted and verified with the same (cheap) argon2 parameters, so no hash
        # upgrade (an UPDATE of its own) muddies the count.
        async with KeyManager.from_url(url, argon2=CHEAPEST_PARAMETERS) as manager:
            keys = [await manager.create(owner="bench", name=f"k{i}") for i in range(args.keys)]
        await install_counter(raw, q)

        # -- batched: through the middleware ------------------------------------------
        store = PostgresKeyStore(url)
        flush_seconds: list[float] = []
        touch_many = store.touch_many

        async def timed_touch_many(touches: Mapping[str, datetime]) -> None:
            started = time.perf_counter()
            try:
                await touch_many(touches)
            finally:
                flush_seconds.append(time.perf_counter() - started)

        store.touch_many = timed_touch_many  # type: ignore[method-assign]
        app = APIKeyMiddleware(
            Starlette(routes=[Route("/", ok)]),
            store=store,
            argon2=CHEAPEST_PARAMETERS,
            flush_interval=args.flush_interval,
        )
        rng = random.Random(args.seed)
        order = [keys[i % len(keys)] for i in range(args.requests)]
        rng.shuffle(order)
        sequence: list[tuple[str, datetime]] = []
        latest_start: dict[str, float] = {}
        transport = httpx.ASGITransport(app=app)
        started = time.perf_counter()
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for key in order:
                latest_start[key.id] = time.time()
                r = await client.get("/", headers={"Authorization": f"Bearer {key.key}"})
                if r.status_code != 200:
                    raise SystemExit(f"unexpected {r.status_code}: {r.text}")
                sequence.append((key.id, datetime.now(timezone.utc)))
                # A real server yields to the event loop between requests (socket reads);
                # a cache hit over ASGITransport never does, which would starve the
                # recorder's timer until shutdown.
                await asyncio.sleep(0)
        request_seconds = time.perf_counter() - started
        await app.aclose()  # the final flush
        stats = app.stats()
        await store.close()
        batched_statements = await counted(raw, q)
        rows = await raw.fetch(f"SELECT id, last_used_at FROM {q}.keystile_keys")
        latest_ok = all(
            row["last_used_at"] is not None
            and row["last_used_at"].timestamp() >= latest_start[row["id"]] - 1e-6
            for row in rows
        )

        # -- naive: one autocommit UPDATE per request -----------------------------------
        await raw.execute(f"UPDATE {q}.keystile_keys SET last_used_at = NULL")
        await counted(raw, q)
        sql = f"UPDATE {q}.keystile_keys SET last_used_at = $1 WHERE id = $2"
        naive = await asyncpg.connect(args.postgres_url)
        try:
            t0 = time.perf_counter()
            for key_id, at in sequence:
                await naive.execute(sql, at, key_id)
            naive_counted_seconds = time.perf_counter() - t0
            naive_statements = await counted(raw, q)
            await raw.execute(f"ALTER TABLE {q}.keystile_keys DISABLE TRIGGER count_updates")
            t0 = time.perf_counter()
            for key_id, at in sequence:
                await naive.execute(sql, at, key_id)
            naive_seconds = time.perf_counter() - t0
        finally:
            await naive.close()
    finally:
        await raw.execute(f"DROP SCHEMA IF EXISTS {q} CASCADE")
        await raw.close()

    batched_seconds = sum(flush_seconds)
    n = args.requests
    print(
        f"last_used_at writes: {n} requests over {args.keys} keys, "
        f"flush_interval={args.flush_interval}s, Postgres at {store.display_url.split('?')[0]}"
    )
    print(
        f"requests took {request_seconds:.2f} s ({n / request_seconds:,.0f}/s over ASGI); "
        f"recorder: {stats.flushes} flushes, {stats.touches_written} rows written, "
        f"{stats.flush_failures} failures; final last_used_at >= latest request start "
        f"for every key: {'yes' if latest_ok else 'NO'}"
    )
    print()
    header = ("approach", "UPDATE statements", "total DB seconds", "per request")
    table = [
        header,
        (
            f"keystile batched ({stats.flushes} flushes)",
            f"{batched_statements}",
            f"{batched_seconds:.4f}",
            f"{batched_seconds / n * 1e6:.2f} us",
        ),
        (
            "one UPDATE per request",
            f"{naive_statements}",
            f"{naive_seconds:.4f}",
            f"{naive_seconds / n * 1e6:.2f} us",
        ),
        (
            "ratio (naive / batched)",
            f"{naive_statements / max(batched_statements, 1):,.0f}x",
            f"{naive_seconds / batched_seconds:,.0f}x" if batched_seconds else "-",
            "",
        ),
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    print(
        f"(naive statements counted in a pass with the counting trigger, "
        f"{naive_counted_seconds:.4f} s; timed in a second pass without it)"
    )
    if batched_statements > stats.flushes:
        raise SystemExit("FAIL: more UPDATE statements than flushes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test", help="libpq URL"
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument(
        "--flush-interval", type=float, default=1.0, help="seconds between flushes (default 1)"
    )
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
