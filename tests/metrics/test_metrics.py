"""Prometheus metrics: every counter of stats() as keystile_* metrics, read at scrape time,
and a scrape of a 2-worker uvicorn reporting the whole service."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from apps import client, protect
from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.metrics import COUNTERS, GAUGES, PrometheusMetrics, metrics_app
from keystile.stats import KeystileStats
from keystile.stores import store_from_url
from keystile.tokens import generate_key

pytestmark = pytest.mark.anyio

#: tests/, where ``metrics_workers_app`` lives.
TESTS = Path(__file__).resolve().parents[1]


async def mint(url: str) -> tuple[str, str]:
    async with KeyManager(store_from_url(url), argon2=CHEAPEST_PARAMETERS) as keys:
        created = await keys.create(owner="acme", name=f"k-{uuid.uuid4().hex[:8]}")
        return created.key, created.id


async def test_metrics_carry_the_counters_with_their_values(sqlite_database_url: str) -> None:
    """metrics=PrometheusMetrics(registry) puts hits, misses, argon2 and rejects by reason
    into that registry with the values stats() reports."""
    key, key_id = await mint(sqlite_database_url)
    registry = CollectorRegistry()
    app = protect(
        store_from_url(sqlite_database_url), metrics=PrometheusMetrics(registry), cache_ttl=3600
    )
    wrong = generate_key(key_id=key_id)[0]
    async with client(app) as http:
        for _ in range(6):
            assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 200
        for _ in range(2):
            assert (await http.get("/whoami", headers={"X-API-Key": wrong})).status_code == 401
        assert (await http.get("/whoami")).status_code == 401
    stats = app.stats()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("keystile_cache_hits_total") == stats.cache_hits == 5
    assert value("keystile_cache_misses_total") == stats.cache_misses == 2
    assert value("keystile_argon2_verifications_total") == 2
    assert value("keystile_argon2_seconds_count") == 2
    assert value("keystile_argon2_seconds_bucket", le="+Inf") == 2
    assert value("keystile_argon2_seconds_sum") == pytest.approx(stats.argon2_seconds)
    assert value("keystile_rejects_total", reason="wrong_secret") == 2
    assert value("keystile_rejects_total", reason="missing") == 1
    assert value("keystile_negative_hits_total") == 1
    assert value("keystile_cache_size") == 1
    assert value("keystile_pending_touches") == 1
    await app.aclose()


async def test_every_stats_counter_has_a_metric_with_help(sqlite_database_url: str) -> None:
    """Each numeric field of stats() is exported under keystile_*, with help text, and no
    label other than the reject reason exists (never a key id or a secret)."""
    registry = CollectorRegistry()
    app = protect(store_from_url(sqlite_database_url), metrics=PrometheusMetrics(registry))
    exported = {field for field, _, _ in (*COUNTERS, *GAUGES)}
    exported |= {"rejects", "argon2_seconds", "argon2_buckets", "hit_ratio"}
    assert {f.name for f in dataclasses.fields(KeystileStats)} <= exported
    families = list(registry.collect())
    assert all(f.name.startswith("keystile_") and f.documentation for f in families)
    labels = {name for f in families for s in f.samples for name in s.labels}
    assert labels <= {"reason", "le"}
    await app.aclose()


async def test_metrics_dependency_missing_names_the_extra() -> None:
    """Without prometheus_client, metrics=True fails with one line naming the extra."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from starlette.applications import Starlette\n"
        "from keystile import APIKeyMiddleware, ConfigurationError\n"
        "try:\n"
        "    APIKeyMiddleware(Starlette(), database_url='memory://', metrics=True)\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "keystile[prometheus]" in done.stdout and done.stdout.count("\n") == 1


async def test_metrics_app_serves_the_text_format(sqlite_database_url: str) -> None:
    """metrics_app() answers with the Prometheus text format of its registry."""
    key, _ = await mint(sqlite_database_url)
    registry = CollectorRegistry()
    app = protect(store_from_url(sqlite_database_url), metrics=PrometheusMetrics(registry))
    async with client(app) as http:
        assert (await http.get("/whoami", headers={"X-API-Key": key})).status_code == 200
    async with client(metrics_app(registry)) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["keystile_cache_misses"].samples[0].value == 1
    await app.aclose()


# -- two uvicorn workers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_two_workers_scrape_reports_the_whole_service(
    anyio_backend: str, sqlite_database_url: str, tmp_path: Path
) -> None:
    """uvicorn --workers 2: after both workers served requests, a scrape (answered by
    either) counts every request sent, through the shared snapshot directory."""
    key, key_id = anyio.run(mint, sqlite_database_url)
    wrong = generate_key(key_id=key_id)[0]
    metrics_dir = tmp_path / "metrics"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "KEYSTILE_DATABASE_URL": sqlite_database_url,
        "KEYSTILE_METRICS_DIR": str(metrics_dir),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-m", "uvicorn", "metrics_workers_app:app", "--workers", "2"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                httpx.get(f"{base}/metrics", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        pids: dict[int, int] = {}
        sent = 0
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=base, limits=no_reuse, timeout=10) as http:
            while (len(pids) < 2 or min(pids.values()) < 3) and sent < 3000:
                response = http.get("/whoami", headers={"X-API-Key": key})
                assert response.status_code == 200
                pid = response.json()["pid"]
                pids[pid] = pids.get(pid, 0) + 1
                sent += 1
            for _ in range(3):
                assert http.get("/whoami", headers={"X-API-Key": wrong}).status_code == 401
        assert len(pids) == 2, f"one worker served all {sent} requests"
        assert min(pids.values()) < sent  # neither worker alone saw everything

        def totals() -> tuple[float, float, float]:
            samples = scrape(base)
            return (  # each request is a hit, a miss or an answer of the negative cache
                samples[("keystile_cache_hits_total", ())]
                + samples[("keystile_cache_misses_total", ())]
                + samples[("keystile_negative_hits_total", ())],
                samples.get(("keystile_rejects_total", (("reason", "wrong_secret"),)), 0.0),
                samples[("keystile_argon2_seconds_count", ())],
            )

        expected_lookups = sent + 3
        seen = totals()
        deadline = time.monotonic() + 15
        while seen[:2] != (expected_lookups, 3) and time.monotonic() < deadline:
            time.sleep(0.1)
            seen = totals()
        assert seen[:2] == (expected_lookups, 3)
        # Each worker proved the key once, and at least one wrong secret ran argon2.
        assert 3 <= seen[2] <= 2 + 3
        assert len(list(metrics_dir.glob("keystile-*.json"))) == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
