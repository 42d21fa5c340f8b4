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

Arms are interleaved round by round, the order reversed every other round; each sample
times a batch of calls with ``time.perf_counter_ns``, and every arm yields to the event
loop once between batches so the middleware's background work runs outside the timed
window. Ratios are of medians of one interleaved run; the target is each keystile
dependency at most 5 % above ``minimal``.

    python benchmarks/dependencies.py                # about 20 s
    python benchmarks/dependencies.py --budget 60 --keys 1000
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import Target, fmt_us, median, p99, print_table
from fastapi import Depends, FastAPI, Request, Security
from starlette.types import ASGIApp, Message

from apps import call_once, http_scope, protect
from keystile.fastapi import (
    APIKey,
    CurrentKey,
    OptionalKey,
    current_key,
    require_scopes,
)

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


def _app_bare() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


def _app_minimal() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping(key: MinimalKey) -> dict[str, bool]:
        return {"ok": key is not None}

    return app


def _app_current_key() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping(key: CurrentKey) -> dict[str, bool]:
        return {"ok": key is not None}

    return app


def _app_optional_key() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping(key: OptionalKey) -> dict[str, bool]:
        return {"ok": key is not None}

    return app


def _app_require_scopes() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping(key: ScopedKey) -> dict[str, bool]:
        return {"ok": key is not None}

    return app


def _app_security() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping(key: SecurityKey) -> dict[str, bool]:
        return {"ok": key is not None}

    return app


def _app_request_user() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping(request: Request) -> dict[str, bool]:
        return {"ok": request.user.is_authenticated}

    return app


#: name -> (app factory, what the route asks for).
ARMS: dict[str, tuple[Callable[[], FastAPI], str]] = {
    "bare": (_app_bare, "no dependency"),
    "minimal": (_app_minimal, 'async def minimal(request): return request.scope["user"]'),
    "CurrentKey": (_app_current_key, "key: CurrentKey"),
    "OptionalKey": (_app_optional_key, "key: OptionalKey"),
    "require_scopes": (_app_require_scopes, 'Depends(require_scopes("read"))'),
    "Security scopes": (_app_security, 'Security(current_key, scopes=["read"])'),
    "request.user": (_app_request_user, "request: Request; request.user"),
}


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


async def _batch(app: ASGIApp, scope: dict[str, Any], calls: int) -> float:
    perf = time.perf_counter_ns
    receive, send = _receive, _send
    t0 = perf()
    for _ in range(calls):
        await app(scope.copy(), receive, send)
    return (perf() - t0) / calls / 1_000


async def _measure(n_keys: int, budget: float) -> dict[str, Any]:
    arms: dict[str, tuple[ASGIApp, dict[str, Any]]] = {}
    middlewares = []
    for name, (factory, _) in ARMS.items():
        middleware, token = protect(factory(), n_keys)
        middlewares.append(middleware)
        arms[name] = (middleware, http_scope("/ping", token))
    for name, (app, scope) in arms.items():
        for _ in range(20):  # warm-up, and proof that every arm answers 200 {"ok": true}
            status, body = await call_once(app, scope)
            if status != 200 or body != b'{"ok":true}':
                raise AssertionError(f"{name}: got {status} {body[:200]!r}")

    estimate = await _batch(*arms["minimal"], CALLS_PER_SAMPLE)
    rounds = max(15, int(budget * 1e6 / (estimate * CALLS_PER_SAMPLE * len(arms) * 1.2)))
    samples: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            app, scope = arms[name]
            samples[name].append(await _batch(app, scope, CALLS_PER_SAMPLE))
            await asyncio.sleep(0)
    for middleware in middlewares:
        await middleware.aclose()
        stats = middleware.stats()
        if stats.cache_misses or stats.rejects:
            raise AssertionError(f"misses or refusals during the run: {stats.as_dict()}")
    bare, reference = median(samples["bare"]), median(samples["minimal"])
    return {
        "cached_keys": n_keys,
        "rounds": rounds,
        "calls_per_sample": CALLS_PER_SAMPLE,
        "arms": {
            name: {
                "route": ARMS[name][1],
                "median_us": median(s),
                "p99_us": p99(s),
                "vs_minimal": median(s) / reference,
                "added_over_bare_us": median(s) - bare,
            }
            for name, s in samples.items()
        },
    }


def run_dependencies(n_keys: int, budget: float) -> tuple[dict[str, Any], list[Target]]:
    """``budget``: rough seconds of measuring."""
    print(f"  dependencies (direct ASGI, FastAPI, {n_keys:,} cached keys) ...", flush=True)
    results = asyncio.run(_measure(n_keys, budget))
    rows = [
        (
            name,
            arm["route"],
            fmt_us(arm["median_us"]),
            fmt_us(arm["p99_us"]),
            f"{arm['vs_minimal']:.3f}x",
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
            results["arms"][name]["vs_minimal"],
            DEPENDENCY_TARGET,
            "x",
        )
        for name in TARGETED
    ]
    return results, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000, help="cached keys (default 1000)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of measuring")
    args = parser.parse_args(argv)
    _, targets = run_dependencies(args.keys, args.budget)
    print_table(
        "Targets", ("target", "goal", "measured", "verdict", "note"), [t.row() for t in targets]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
