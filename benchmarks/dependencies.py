"""What keystile's FastAPI dependencies add to a protected route, next to FastAPI's floor.

Every arm is the same FastAPI app (``GET /ping`` answering ``{"ok": true}``) behind its
own ``APIKeyMiddleware`` with 1 000 cached keys, called directly through ASGI (scope,
receive and send built here: no HTTP client in the timing). The arms differ only in what
the route asks for:

* ``bare``: nothing (the protected route of ``overhead.py``);
* ``minimal``: the cheapest dependency FastAPI has, the reference:
  ``async def minimal(request: Request): return request.scope["user"]``;
* ``CurrentKey``, ``OptionalKey``, ``require_scopes("read")``: keystile's, as a parameter;
* ``Security(current_key, scopes=["read"])``: FastAPI's own scopes on ``current_key``;
* ``request.user``: the route reads ``request.user`` itself (a ``Request`` parameter).

Arms are interleaved round by round, ABBA; each sample times a batch of calls, and every
arm yields to the event loop once between batches so the middleware's background work
runs outside the timed window. Ratios are of medians of one interleaved run; the target is each keystile
dependency at most 5 % above ``minimal``.

    python benchmarks/dependencies.py                # about 20 s (--quick: 4 s)
    python benchmarks/dependencies.py --budget 60 --keys 1000
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from asgi import check_arms, http_scope, timed_arms
from fastapi import Depends, FastAPI, Request, Security
from harness import Target, cli, compare, fmt_us, interleave_async, print_table, rounds_for
from starlette.types import ASGIApp

from apps import close_checked, protect
from keystile.fastapi import APIKey, CurrentKey, OptionalKey, current_key, require_scopes

__all__ = ["DEPENDENCY_TARGET", "run_dependencies"]

#: Each keystile dependency's median over the minimal dependency's, at most.
DEPENDENCY_TARGET = 1.05
CALLS_PER_SAMPLE = 50
#: The arms the target applies to.
TARGETED = ("CurrentKey", "OptionalKey", "require_scopes")


async def minimal(request: Request) -> Any:
    """FastAPI's cheapest dependency that gives the route the key: the reference."""
    return request.scope["user"]


# At module level: FastAPI evaluates the (postponed) annotations in this module's globals.
MinimalKey = Annotated[Any, Depends(minimal)]
ScopedKey = Annotated[APIKey, Depends(require_scopes("read"))]
SecurityKey = Annotated[APIKey, Security(current_key, scopes=["read"])]


async def _bare() -> dict[str, bool]:
    return {"ok": True}


async def _minimal(key: MinimalKey) -> dict[str, bool]:
    return {"ok": key is not None}


async def _current_key(key: CurrentKey) -> dict[str, bool]:
    return {"ok": key is not None}


async def _optional_key(key: OptionalKey) -> dict[str, bool]:
    return {"ok": key is not None}


async def _require_scopes(key: ScopedKey) -> dict[str, bool]:
    return {"ok": key is not None}


async def _security(key: SecurityKey) -> dict[str, bool]:
    return {"ok": key is not None}


async def _request_user(request: Request) -> dict[str, bool]:
    return {"ok": request.user.is_authenticated}


#: name -> (the route, what it asks for).
ARMS: dict[str, tuple[Callable[..., Awaitable[dict[str, bool]]], str]] = {
    "bare": (_bare, "no dependency"),
    "minimal": (_minimal, 'async def minimal(request): return request.scope["user"]'),
    "CurrentKey": (_current_key, "key: CurrentKey"),
    "OptionalKey": (_optional_key, "key: OptionalKey"),
    "require_scopes": (_require_scopes, 'Depends(require_scopes("read"))'),
    "Security scopes": (_security, 'Security(current_key, scopes=["read"])'),
    "request.user": (_request_user, "request: Request; request.user"),
}


def _app(route: Callable[..., Awaitable[dict[str, bool]]]) -> FastAPI:
    app = FastAPI()
    app.get("/ping")(route)
    return app


async def _measure(n_keys: int, budget: float, rounds: int | None) -> dict[str, Any]:
    arms: dict[str, tuple[ASGIApp, dict[str, Any]]] = {}
    middlewares = []
    for name, (route, _) in ARMS.items():
        middleware, token = protect(_app(route), n_keys)
        middlewares.append(middleware)
        arms[name] = (middleware, http_scope("/ping", token))
    await check_arms(arms, body=b'{"ok":true}')
    sample = timed_arms(arms, CALLS_PER_SAMPLE)
    if rounds is None:
        rounds = rounds_for(budget, await sample["minimal"]() * CALLS_PER_SAMPLE, len(arms))
    samples = await interleave_async(sample, rounds)
    await close_checked(middlewares)
    bare = compare(samples, "bare")
    return {
        "cached_keys": n_keys,
        "rounds": rounds,
        "calls_per_sample": CALLS_PER_SAMPLE,
        "arms": {
            name: {
                "route": ARMS[name][1],
                **arm,
                "added_over_bare_us": bare[name]["added_us"],
            }
            for name, arm in compare(samples, "minimal").items()
        },
    }


def run_dependencies(
    n_keys: int, budget: float, rounds: int | None = None
) -> tuple[dict[str, Any], list[Target]]:
    """``budget``: rough seconds of measuring (unless ``rounds`` is given)."""
    print(f"  dependencies (direct ASGI, FastAPI, {n_keys:,} cached keys) ...", flush=True)
    results = asyncio.run(_measure(n_keys, budget, rounds))
    rows = [
        (
            name,
            arm["route"],
            fmt_us(arm["median_us"]),
            fmt_us(arm["p99_us"]),
            f"{arm['ratio']:.3f}x",
            "-" if name == "bare" else f"{arm['added_over_bare_us']:+.2f}",
        )
        for name, arm in results["arms"].items()
    ]
    print_table(
        f"FastAPI dependencies on a protected route, {n_keys:,} cached keys, direct ASGI "
        f"(µs, median of batches of {CALLS_PER_SAMPLE}; {results['rounds']} interleaved rounds)",
        ("arm", "route", "median µs", "p99 µs", "vs minimal", "added over bare µs"),
        rows,
    )
    targets = [
        Target(
            "dependencies",
            f"{name} / minimal dependency at {n_keys:,} keys",
            results["arms"][name]["ratio"],
            DEPENDENCY_TARGET,
            "x",
        )
        for name in TARGETED
    ]
    return results, targets


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=1_000, help="cached keys (default 1000)")
    parser.add_argument("--budget", type=float, help="seconds of measuring (default 20; --quick 4)")


def _measure_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[Target]]:
    budget = args.budget or (4.0 if args.quick else 20.0)
    return run_dependencies(args.keys, budget, args.rounds)


if __name__ == "__main__":
    raise SystemExit(cli("dependencies", __doc__, _measure_args, configure=_options))
