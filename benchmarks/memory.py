"""Memory: resident bytes per cached key, on the compiled and the pure-Python table.

Each measurement runs in a fresh process: imports and a small warm-up first, then the
RSS before and after putting N keys into a ``VerifiedKeyCache`` (``fill_cache``: real key
ids, the entries ``apps.protect`` uses), both after ``gc.collect()``. RSS delta / N counts
everything a cached key costs: the table's arrays and key id index, the principal and its
strings, and the allocator's slack. The tokens are not kept while the cache fills (a
server does not keep them): kept, their 100 000 strings sat in the same memory arenas as
the principals, and their pages still counted after they were freed (about 115 B a key).

    python benchmarks/memory.py [N]        # 100 000 keys (--quick: 10 000)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from harness import Target, cli, print_table

__all__ = ["MEMORY_TARGET", "run_memory"]

#: RSS bytes per cached key at 100 000 keys, compiled path.
MEMORY_TARGET = (100_000, 400.0)


def _child(n: int, compiled: bool) -> dict[str, float]:
    import gc

    import psutil

    from apps import fill_cache
    from keystile.cache import VerifiedKeyCache

    process = psutil.Process()
    warm = VerifiedKeyCache(max_size=n, compiled=compiled)
    fill_cache(warm, 1_000, keep_tokens=False)
    del warm
    gc.collect()
    before = process.memory_info().rss
    cache = VerifiedKeyCache(max_size=n, compiled=compiled)
    fill_cache(cache, n, keep_tokens=False)
    gc.collect()
    after = process.memory_info().rss
    return {"keys": n, "rss_delta_bytes": after - before, "bytes_per_key": (after - before) / n}


def run_memory(n: int = MEMORY_TARGET[0]) -> tuple[dict[str, Any], list[Target]]:
    from keystile import _accel

    paths = ["pure"] if _accel.Table is None else ["compiled", "pure"]
    results: dict[str, Any] = {}
    for path in paths:
        print(f"  memory: {n:,} keys, {path} table ...", flush=True)
        out = subprocess.run(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", str(n), path],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        ).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
    print_table(
        f"Memory per cached key ({n:,} keys, RSS delta / keys, fresh process each)",
        ("table", "RSS delta MiB", "bytes per key"),
        [
            (p, f"{r['rss_delta_bytes'] / 2**20:.1f}", f"{r['bytes_per_key']:.0f}")
            for p, r in results.items()
        ],
    )
    keys, limit = MEMORY_TARGET
    targets = []
    if n == keys:
        for path, r in results.items():
            targets.append(
                Target(
                    "memory",
                    f"RSS per cached key at {keys:,} keys ({path})",
                    r["bytes_per_key"],
                    limit,
                    "B",
                )
            )
    return results, targets


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "keys", type=int, nargs="?", help="cached keys (default 100000; --quick 10000)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(int(sys.argv[2]), sys.argv[3] == "compiled")))
    else:
        raise SystemExit(
            cli(
                "memory",
                __doc__,
                lambda args: run_memory(args.keys or (10_000 if args.quick else MEMORY_TARGET[0])),
                configure=_options,
            )
        )
