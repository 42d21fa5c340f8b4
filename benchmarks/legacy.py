"""Imported keys: what an unknown legacy token costs, and what a key's first use costs.

Drives ``APIKeyMiddleware`` in-process over raw ASGI with the production argon2
parameters, a memory store and ``legacy_formats=["drf-api-key", "keygate"]``:

* ``unknown``: a fresh, well-formed token whose key does not exist, new every request (so
  the negative cache cannot answer): a keystile key against a djangorestframework-api-key
  key (``<prefix>.<secret>``), interleaved. Both should cost one store read and no
  hashing: the ratio should be about 1.
* ``first use``: the first request of a key (a fresh key every request): a keystile key
  (one argon2id verification) against imported keys hashed with SHA-512
  (djangorestframework-api-key 2.x/3.x), SHA-256 (fastapi-keygate) and Django's PBKDF2
  at its default 1 000 000 iterations (djangorestframework-api-key 1.x). An imported
  key's first use is its old hash plus one argon2id hash (the rehash) and its write.

    python benchmarks/legacy.py             # 2 000 unknown tokens, 20 first uses per kind
    python benchmarks/legacy.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgi import call_once, http_scope, ok_app
from harness import Target, cli, compare, fmt_us, interleave_async, print_table

from keystile import DEFAULT_PARAMETERS, APIKeyMiddleware, KeyManager, MemoryKeyStore
from keystile.importers import SourceKey, import_keys
from keystile.legacy.formats import FORMATS
from keystile.tokens import generate_key

_ALPHANUMERIC = string.ascii_letters + string.digits
#: Django's PBKDF2 iterations since 5.0 (what djangorestframework-api-key 1.x keys carry).
DJANGO_PBKDF2_ITERATIONS = 1_000_000


def _text(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def _dotted() -> tuple[str, str]:
    prefix = _text(8)
    return prefix, f"{prefix}.{_text(32)}"


def _hashed(algorithm: str, key: str) -> str:
    if algorithm == "sha512":
        return hashlib.sha512(key.encode()).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(key.encode()).hexdigest()
    salt = _text(22)
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), salt.encode(), DJANGO_PBKDF2_ITERATIONS)
    return f"pbkdf2_sha256${DJANGO_PBKDF2_ITERATIONS}${salt}${base64.b64encode(digest).decode()}"


async def _timed(app: APIKeyMiddleware, token: str, expected: int) -> float:
    """One request's time in microseconds (the token made before the clock starts)."""
    scope = http_scope("/", headers=[(b"x-api-key", token.encode())])
    started = time.perf_counter()
    status, _ = await call_once(app, scope)
    elapsed = (time.perf_counter() - started) * 1e6
    if status != expected:
        raise RuntimeError(f"expected {expected}, got {status}")
    return elapsed


async def _fresh_keys(store: MemoryKeyStore, samples: int) -> dict[str, list[str]]:
    """``samples`` unused keys of each kind: keystile's, and imported ones by algorithm."""
    keys: dict[str, list[str]] = {"keystile": []}
    async with KeyManager(store) as manager:
        for i in range(samples):
            keys["keystile"].append((await manager.create(owner="bench", name=f"k{i}")).key)
    for algorithm in ("sha512", "sha256", "pbkdf2_sha256"):
        pairs = [_dotted() for _ in range(samples)]
        rows: list[Any] = [
            SourceKey(p, p, algorithm, _hashed(algorithm, key), name=f"{algorithm} {p}")
            for p, key in pairs
        ]
        await import_keys(
            store, rows, source="bench", key_format=FORMATS["drf-api-key"], owner="bench"
        )
        keys[algorithm] = [key for _, key in pairs]
    return keys


async def _measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    unknown_n = args.unknown or (300 if args.quick else 2000)
    first_n = args.first or (6 if args.quick else 20)
    store = MemoryKeyStore()
    app = APIKeyMiddleware(
        ok_app,
        store=store,
        argon2=DEFAULT_PARAMETERS,
        legacy_formats=["drf-api-key", "keygate"],
    )

    def refused(make: Callable[[], str]) -> Callable[[], Awaitable[float]]:
        async def one() -> float:
            return await _timed(app, make(), 401)

        return one

    unknown = await interleave_async(
        {
            "keystile key": refused(lambda: generate_key()[0]),
            "drf-api-key token": refused(lambda: _dotted()[1]),
        },
        unknown_n,
    )
    fresh = await _fresh_keys(store, first_n)

    def first_use(kind: str) -> Callable[[], Awaitable[float]]:
        async def one() -> float:
            return await _timed(app, fresh[kind].pop(), 200)

        return one

    first = await interleave_async({kind: first_use(kind) for kind in fresh}, first_n)
    unknown_stats = compare(unknown, "keystile key")
    first_stats = compare(first, "keystile")
    for title, stats in (("An unknown token", unknown_stats), ("A key's first use", first_stats)):
        print_table(
            title,
            ("kind", "median", "p99", "vs keystile"),
            (
                (k, fmt_us(s["median_us"]), fmt_us(s["p99_us"]), f"{s['ratio']:.2f}x")
                for k, s in stats.items()
            ),
        )
    ratio = unknown_stats["drf-api-key token"]["ratio"]
    targets = [Target("legacy", "unknown legacy token / unknown keystile key", ratio, 1.25, "x")]
    counters = app.verifier.counters
    return (
        {
            "unknown": unknown_stats,
            "first_use": first_stats,
            "argon2_verifications": counters.argon2_verifications,
        },
        targets,
    )


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unknown", type=int, metavar="N", help="unknown tokens per kind")
    parser.add_argument("--first", type=int, metavar="N", help="first uses per kind")


if __name__ == "__main__":
    raise SystemExit(
        cli("legacy", __doc__, lambda args: asyncio.run(_measure(args)), configure=_options)
    )
