"""The benchmark plot: hit latency vs cached keys (log-log), and per-request latency of
keystile and its peers (a second panel: those are whole requests, measured differently)."""

from __future__ import annotations

import pathlib
from typing import Any

__all__ = ["write_plot"]


def write_plot(path: pathlib.Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hit = results.get("hit_path")
    peers = results.get("peers", {})
    with_peers = bool(peers.get("results"))
    fig, axes = plt.subplots(
        1, 2 if with_peers else 1, figsize=(14, 5.8) if with_peers else (7.5, 5.8), squeeze=False
    )
    ax = axes[0][0]
    if hit:
        sizes = [r["n"] for r in hit["sizes"]]
        series = [
            ("keystile: digest + constant-time scan", lambda r: r["keystile"], "o-", "C0"),
            ("keystile: await Verifier.verify (hit)", lambda r: r["verifier_verify"], "s:", "C0"),
            (
                "hmac.compare_digest loop (constant-time baseline)",
                lambda r: r["hmac loop"],
                "^-",
                "C3",
            ),
            ("dict lookup (non-constant-time floor)", lambda r: r["dict"], "v-", "C2"),
        ]
        for label, pick, style, color in series:
            med = [pick(r)["median_us"] for r in hit["sizes"]]
            hi = [pick(r)["p99_us"] for r in hit["sizes"]]
            ax.loglog(sizes, med, style, color=color, label=label)
            if style.endswith("-"):
                ax.fill_between(sizes, med, hi, color=color, alpha=0.12, linewidth=0)
        targets = hit.get("targets", {})
        if targets:
            ax.loglog(
                [int(n) for n in targets],
                list(targets.values()),
                "x",
                color="k",
                markersize=8,
                label="target (keystile)",
            )
        ax.set_xlabel("cached keys")
        ax.set_ylabel("µs per lookup (median; band: up to p99)")
        ax.set_title("Cache-hit verification vs cached keys (digest included)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    if with_peers:
        ax2 = axes[0][1]
        rows = peers["results"]
        names = [r["name"] for r in rows]
        y = range(len(rows))
        ax2.barh(
            [i - 0.2 for i in y],
            [r["median_us"] for r in rows],
            height=0.4,
            color="C0",
            label="through httpx.ASGITransport",
        )
        ax2.barh(
            [i + 0.2 for i in y],
            [r["direct_median_us"] for r in rows],
            height=0.4,
            color="C1",
            label="direct ASGI call",
        )
        for i, r in enumerate(rows):
            ax2.text(
                r["median_us"] * 1.1, i - 0.2, f"{r['median_us']:,.0f}", va="center", fontsize=7
            )
            ax2.text(
                r["direct_median_us"] * 1.1,
                i + 0.2,
                f"{r['direct_median_us']:,.0f}",
                va="center",
                fontsize=7,
            )
        ax2.set_yticks(list(y), names, fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xscale("log")
        ax2.set_xlabel("µs per authenticated request (median)")
        ax2.set_title(f"Per request through ASGI, FastAPI route, {peers['keys']:,} keys")
        ax2.grid(True, axis="x", which="both", alpha=0.3)
        ax2.legend(fontsize=8, loc="lower right")
    meta = results.get("meta", {})
    fig.suptitle(
        f"keystile benchmarks ({meta.get('mode', '')} run, {meta.get('cpus', '?')} CPUs, "
        f"Python {meta.get('python', '?')}, {meta.get('date', '')})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
