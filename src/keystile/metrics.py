"""Prometheus metrics: every counter of ``stats()`` as a ``keystile_*`` metric.

``APIKeyMiddleware(..., metrics=True)`` (extra ``keystile[prometheus]``) registers a
collector with ``prometheus_client``. It reads the runtime's counters when Prometheus
scrapes, so the request path pays nothing: no metric object is touched per request.

Several worker processes (``uvicorn --workers 4``, gunicorn) each count their own
requests, and a scrape reaches whichever worker the kernel hands it to. Give every
worker the same directory (``KEYSTILE_METRICS_DIR``, or ``PrometheusMetrics(directory=)``)
and each writes a snapshot of its counters there every ``interval`` seconds (and at
shutdown); the worker that answers a scrape adds the others' snapshots to its own live
counters. Counters of workers that exited still count (what they counted happened);
gauges (cache size, pending writes) count live workers only. Empty the directory when
the service starts, as with ``prometheus_client``'s own multiprocess mode. The directory
must be the service user's alone; what is read from it is checked (``metrics_dir``).

Serve the metrics on a path the middleware exempts::

    from keystile.metrics import metrics_app
    routes = [Route("/metrics", metrics_app())]
    app.add_middleware(APIKeyMiddleware, metrics=True, exempt_paths=["/metrics"])
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread

from .errors import ConfigurationError
from .metrics_dir import SnapshotDirectory, is_alive
from .stats import ARGON2_BUCKETS, KeystileStats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry


__all__ = [
    "METRICS_DIR_ENV",
    "KeystileCollector",
    "PrometheusMetrics",
    "metrics_app",
]


class RuntimeCounters(Protocol):
    """What the exporter needs of a runtime: its counters, and a place for a duty and a
    hook at stop. A protocol, so this module does not import the runtime (which is built
    from a config that names this module's exporter)."""

    extra_duties: dict[str, Callable[[], Awaitable[None]]]
    stop_hooks: list[Callable[[], None]]

    def stats(self) -> KeystileStats: ...


logger = logging.getLogger("keystile")

#: The directory every worker shares its counter snapshots in.
METRICS_DIR_ENV = "KEYSTILE_METRICS_DIR"
#: Seconds between snapshots: how far behind another worker's counts a scrape may be.
DEFAULT_SNAPSHOT_INTERVAL = 1.0

#: ``stats()`` counters: field (the metric is ``keystile_<field>_total``) and help text.
_COUNTER_HELP = (
    ("cache_hits", "Requests answered from the verified-key cache: no store read, no argon2."),
    (
        "cache_misses",
        "Well-formed keys neither the cache nor the negative cache answered (sent on to"
        " admission and the store).",
    ),
    ("negative_hits", "Refusals answered from the negative cache of recently refused keys."),
    ("argon2_verifications", "argon2id verifications run (one per cache miss of a known key id)."),
    ("state_refreshes", "Cached keys whose state was re-read from the store after cache_ttl."),
    ("stale_served", "Requests served from a stale cached state while the store was unreachable."),
    (
        "revocation_events",
        "Key state changes heard (revoke, update, disable...) that evicted a cached key.",
    ),
    (
        "cache_resets",
        "Times every cached key's state was made stale: changes may have been missed.",
    ),
    ("flushes", "Batched usage writes (last_used_at, quotas) that landed."),
    ("flush_failures", "Batched usage writes that failed and were kept for a retry."),
    ("touches_written", "last_used_at values written by flushes."),
    ("rate_limited", "Requests refused by a key's rate limit (429)."),
    ("quota_exceeded", "Requests refused by a key's quota (429)."),
    (
        "rate_limit_errors",
        "Rate-limit decisions made without the shared limiter (Redis unreachable).",
    ),
    ("usage_rows_written", "Per-key, per-minute usage rows added to the store by flushes."),
    ("usage_dropped", "Per-key usage rows dropped because the store stayed unreachable too long."),
    ("memo_hits", "Cache misses the verification memo answered: another process had run argon2."),
    ("memo_misses", "Cache misses the verification memo had no matching entry for (argon2 ran)."),
    ("memo_errors", "Cache misses the verification memo could not answer (Redis unreachable)."),
)
#: ``stats()`` gauges: field (the metric is ``keystile_<field>``) and help text. Summed
#: over live workers only.
_GAUGE_HELP = (
    ("argon2_in_flight", "argon2id verifications running now."),
    ("cache_size", "Verified keys in the cache now."),
    ("cache_max_size", "The cache's bound (cache_max_size)."),
    ("pending_touches", "Keys whose last_used_at waits for the next flush."),
    ("usage_pending", "Per-key usage rows waiting for the next flush."),
)
#: The tables above as field, metric name, help text.
COUNTERS = tuple((field, f"keystile_{field}", text) for field, text in _COUNTER_HELP)
GAUGES = tuple((field, f"keystile_{field}", text) for field, text in _GAUGE_HELP)
_GAUGE_FIELDS = frozenset(field for field, _, _ in GAUGES)


def _require_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "metrics=True needs prometheus_client: python -m pip install 'keystile[prometheus]'"
        ) from None


def _snapshot(stats: KeystileStats) -> dict[str, Any]:
    data = stats.as_dict()
    data.pop("hit_ratio", None)
    data["argon2_buckets"] = list(stats.argon2_buckets)
    return data


def _add(total: dict[str, Any], part: Mapping[str, Any], *, counters_only: bool) -> None:
    """Add one snapshot's numbers to ``total`` (gauges too unless ``counters_only``)."""
    for name, value in part.items():
        if counters_only and name in _GAUGE_FIELDS:
            continue
        if name == "rejects" and isinstance(value, Mapping):
            rejects = total.setdefault("rejects", {})
            for reason, n in value.items():
                rejects[str(reason)] = rejects.get(str(reason), 0) + int(n)
        elif name == "argon2_buckets" and isinstance(value, list):
            buckets = total.setdefault("argon2_buckets", [0] * (len(ARGON2_BUCKETS) + 1))
            for i, n in enumerate(value[: len(buckets)]):
                buckets[i] += int(n)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value


class KeystileCollector:
    """A ``prometheus_client`` collector over the runtimes of this process and, with a
    directory, the snapshots of the other workers. One per registry."""

    def __init__(self, snapshots: SnapshotDirectory | None = None) -> None:
        self.snapshots = snapshots
        self._runtimes: weakref.WeakSet[RuntimeCounters] = weakref.WeakSet()

    def add(self, runtime: RuntimeCounters) -> None:
        self._runtimes.add(runtime)

    def local(self) -> dict[str, Any]:
        """This process's counters, summed over its runtimes."""
        total: dict[str, Any] = {}
        for runtime in list(self._runtimes):
            _add(total, _snapshot(runtime.stats()), counters_only=False)
        return total

    @property
    def directory(self) -> str | None:
        return None if self.snapshots is None else self.snapshots.path

    def write_snapshot(self) -> None:
        """Write this process's counters for the other workers' scrapes (atomically)."""
        if self.snapshots is not None:
            self.snapshots.write(os.getpid(), self.local())

    def totals(self) -> dict[str, Any]:
        """The whole service: live counters here plus every other worker's snapshot
        (those that pass the checks of ``metrics_dir``)."""
        total = self.local()
        if self.snapshots is not None:
            for pid, data in self.snapshots.read(os.getpid()):
                _add(total, data, counters_only=not is_alive(pid))
        return total

    def describe(self) -> Iterable[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.totals()))

    @staticmethod
    def _families(total: Mapping[str, Any]) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for field, name, text in COUNTERS:
            yield CounterMetricFamily(name, text, value=total.get(field, 0))
        rejects = CounterMetricFamily(
            "keystile_rejects",
            "Requests refused, by reason (missing, malformed, unknown, wrong_secret, revoked,"
            " expired, disabled, ip_not_allowed, overloaded, store_unavailable...).",
            labels=["reason"],
        )
        for reason, n in sorted(dict(total.get("rejects", {})).items()):
            rejects.add_metric([reason], n)
        yield rejects
        buckets = list(total.get("argon2_buckets") or [0] * (len(ARGON2_BUCKETS) + 1))
        cumulative, running = [], 0
        for bound, n in zip((*ARGON2_BUCKETS, float("inf")), buckets, strict=False):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        yield HistogramMetricFamily(
            "keystile_argon2_seconds",
            "Seconds each argon2id verification took (the work alone, not the wait for a"
            " thread): the cost every cache miss pays.",
            buckets=cumulative,
            sum_value=total.get("argon2_seconds", 0.0),
        )
        for field, name, text in GAUGES:
            yield GaugeMetricFamily(name, text, value=total.get(field, 0))
        hits, misses = total.get("cache_hits", 0), total.get("cache_misses", 0)
        yield GaugeMetricFamily(
            "keystile_cache_hit_ratio",
            "hits / (hits + misses) since start: near 1 in steady state. Negative-cache"
            " answers are not misses (keystile_negative_hits).",
            value=hits / (hits + misses) if hits + misses else 0.0,
        )


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, KeystileCollector] = (
    weakref.WeakKeyDictionary()
)


class PrometheusMetrics:
    """Where and how the middleware's counters are exported: ``metrics=PrometheusMetrics(
    registry=..., directory=...)``; ``metrics=True`` is ``PrometheusMetrics()``.

    ``registry``: a ``prometheus_client.CollectorRegistry`` (default: the global one).
    ``directory``: shared by the workers of one service (default ``$KEYSTILE_METRICS_DIR``;
    unset: this process's counters alone), created 0700 if missing, and refused (a
    ``ConfigurationError``) if another user owns it or others may write in it.
    ``interval``: seconds between snapshots.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        interval: float = DEFAULT_SNAPSHOT_INTERVAL,
    ) -> None:
        _require_client()
        from prometheus_client import REGISTRY

        if interval <= 0:
            raise ConfigurationError("the metrics snapshot interval must be positive")
        self.registry: CollectorRegistry = registry if registry is not None else REGISTRY
        env = os.environ.get(METRICS_DIR_ENV)
        chosen = directory if directory is not None else env
        self.directory = str(chosen) if chosen else None
        self.snapshots: SnapshotDirectory | None = None
        if self.directory is not None:
            source = "PrometheusMetrics(directory=)" if directory is not None else METRICS_DIR_ENV
            self.snapshots = SnapshotDirectory.open(self.directory, source=source)
        self.interval = interval

    def collector(self) -> KeystileCollector:
        """The registry's keystile collector, registered on first use."""
        collector = _collectors.get(self.registry)
        if collector is None:
            collector = _collectors[self.registry] = KeystileCollector(self.snapshots)
            self.registry.register(collector)
        elif self.snapshots is not None:
            collector.snapshots = self.snapshots
        return collector

    def install(self, runtime: RuntimeCounters) -> None:
        """Export ``runtime``'s counters; with a directory, write snapshots of them."""
        collector = self.collector()
        collector.add(runtime)
        if collector.snapshots is None:
            return
        interval = self.interval

        async def write_snapshots() -> None:
            while True:
                await anyio.to_thread.run_sync(collector.write_snapshot)
                await anyio.sleep(interval)

        runtime.extra_duties["metrics snapshots"] = write_snapshots
        if collector.write_snapshot not in runtime.stop_hooks:
            runtime.stop_hooks.append(collector.write_snapshot)


class _MetricsApp:
    """A plain ASGI app answering every HTTP request with the registry's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if scope["type"] != "http":
            return
        body = await anyio.to_thread.run_sync(generate_latest, self.registry)
        headers = [
            (b"content-type", CONTENT_TYPE_LATEST.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving the Prometheus text format: mount it on a path the middleware
    exempts (``Route("/metrics", metrics_app())``, ``exempt_paths=["/metrics"]``)."""
    _require_client()
    from prometheus_client import REGISTRY

    return _MetricsApp(registry if registry is not None else REGISTRY)
