"""The metrics snapshot directory is read as untrusted input: it must be this user's
alone, snapshots are written without following links and read only when they are small
regular files of plausible counts; nothing in it can fail, stall or skew a scrape."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from apps import inner_app, protect
from keystile import APIKeyMiddleware, ConfigurationError
from keystile.metrics import PrometheusMetrics
from keystile.stores import store_from_url

pytestmark = pytest.mark.anyio

ME = os.getpid()
#: Two pids of "other workers": the parent (alive) and one past any live pid.
WORKER = os.getppid()
OTHER = 4_194_000
NOBODY = 65534
MARKER = "ks_0123456789abSECRETLIKEmarker"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Service:
    """A middleware exporting to its own registry through a snapshot directory."""

    directory: Path
    registry: CollectorRegistry
    metrics: PrometheusMetrics
    app: APIKeyMiddleware

    def scrape(self) -> Samples:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.registry.collect()
            for s in family.samples
        }

    def write(self) -> None:
        self.metrics.collector().write_snapshot()

    def own_snapshot(self) -> dict[str, Any]:
        """The snapshot this process writes: the shape every worker writes."""
        self.write()
        data: dict[str, Any] = json.loads((self.directory / f"keystile-{ME}.json").read_text())
        (self.directory / f"keystile-{ME}.json").unlink()
        return data

    def plant(self, pid: int, content: bytes | dict[str, Any]) -> Path:
        path = self.directory / f"keystile-{pid}.json"
        body = content if isinstance(content, bytes) else json.dumps(content).encode()
        path.write_bytes(body)
        path.chmod(0o600)
        return path


def serve(directory: Path) -> Service:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, directory=directory)
    app = protect(store_from_url("memory://"), metrics=metrics)
    return Service(directory, registry, metrics, app)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    running = serve(tmp_path / "metrics")
    yield running
    await running.app.aclose()


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and name in r.getMessage()
    ]


# -- the directory ------------------------------------------------------------------------


async def test_missing_directory_is_created_private(service: Service) -> None:
    """A missing snapshot directory (and its missing parent) is created mode 0700."""
    nested = service.directory.parent / "run" / "metrics"
    other = serve(nested)
    assert stat.S_IMODE(nested.stat().st_mode) == 0o700
    assert stat.S_IMODE(service.directory.stat().st_mode) == 0o700
    await other.app.aclose()


@pytest.mark.parametrize("mode", [0o770, 0o730, 0o707, 0o777, 0o1777], ids=oct)
async def test_directory_writable_by_others_is_refused_at_start(tmp_path: Path, mode: int) -> None:
    """A directory others may write in (group, world, even sticky) is refused when the
    metrics are configured, with one ConfigurationError naming it."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(ConfigurationError, match="metrics directory") as refused:
        serve(directory)
    assert str(directory) in str(refused.value)
    assert "writable" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
async def test_directory_of_another_user_is_refused_at_start(tmp_path: Path) -> None:
    """A private directory that belongs to another user is refused at start."""
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(ConfigurationError, match="owned by"):
        serve(directory)


async def test_path_that_is_not_a_directory_is_refused_at_start(tmp_path: Path) -> None:
    """A snapshot 'directory' that is a file is a ConfigurationError, not an OSError."""
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigurationError, match="not a directory"):
        serve(path)


async def test_metrics_true_refuses_the_environment_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metrics=True with KEYSTILE_METRICS_DIR world-writable fails at construction, with a
    message naming the variable."""
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    monkeypatch.setenv("KEYSTILE_METRICS_DIR", str(directory))
    with pytest.raises(ConfigurationError, match="KEYSTILE_METRICS_DIR"):
        APIKeyMiddleware(inner_app(), store=store_from_url("memory://"), metrics=True)


async def test_directory_opened_up_after_start_is_no_longer_used(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory made world-writable while running is neither read nor written (and
    said once), so forged snapshots planted then do not count."""
    baseline = service.scrape()
    service.plant(WORKER, {**service.own_snapshot(), "cache_hits": 1000})
    service.directory.chmod(0o777)
    for _ in range(3):
        assert service.scrape() == baseline
    service.write()
    assert not (service.directory / f"keystile-{ME}.json").exists()
    assert len(warnings_about(caplog, str(service.directory))) == 1


# -- writing ------------------------------------------------------------------------------


async def test_snapshot_is_private_and_leaves_no_temporary_file(service: Service) -> None:
    """The snapshot file is mode 0600 and the write leaves nothing else behind."""
    service.write()
    service.write()
    path = service.directory / f"keystile-{ME}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(service.directory)) == [path.name]


async def test_write_never_follows_a_planted_link(service: Service, tmp_path: Path) -> None:
    """Links planted at the snapshot path and at a predictable temporary path are not
    followed: their target keeps its content, the snapshot becomes a regular file."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    snapshot = service.directory / f"keystile-{ME}.json"
    snapshot.symlink_to(victim)
    (service.directory / f"keystile-{ME}.tmp").symlink_to(victim)
    service.write()
    assert victim.read_text() == "precious"
    assert stat.S_ISREG(os.lstat(snapshot).st_mode)
    assert "cache_hits" in json.loads(snapshot.read_text())


async def test_write_over_a_planted_directory_is_skipped_with_one_warning(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory where the snapshot goes makes the write fail quietly (one warning, no
    exception, no temporary file left), the next writes too."""
    (service.directory / f"keystile-{ME}.json").mkdir()
    for _ in range(3):
        service.write()
    assert sorted(os.listdir(service.directory)) == [f"keystile-{ME}.json"]
    assert len(warnings_about(caplog, f"keystile-{ME}.json")) == 1


# -- reading ------------------------------------------------------------------------------


def forged(real: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({**real, **changes}).encode()


BAD_CONTENTS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not JSON": lambda real: b"{not json " + MARKER.encode(),
    "a list": lambda real: b"[1, 2, 3]",
    "deeply nested": lambda real: b"[" * 100_000,
    "negative count": lambda real: forged(real, cache_hits=-1000),
    "NaN count": lambda real: json.dumps({**real, "cache_hits": float("nan")}).encode(),
    "NaN seconds": lambda real: json.dumps({**real, "argon2_seconds": float("nan")}).encode(),
    "infinite seconds": lambda real: json.dumps({**real, "argon2_seconds": float("inf")}).encode(),
    "huge count": lambda real: forged(real, cache_hits=10**30),
    "huge float count": lambda real: forged(real, cache_misses=1e300),
    "fractional count": lambda real: forged(real, cache_hits=1.5),
    "boolean count": lambda real: forged(real, cache_hits=True),
    "text count": lambda real: forged(real, cache_hits="12"),
    "text reject count": lambda real: forged(real, rejects={"wrong_secret": MARKER}),
    "negative reject count": lambda real: forged(real, rejects={"wrong_secret": -5}),
    "reject label not a reason": lambda real: forged(real, rejects={f"{MARKER}\n<b>": 1}),
    "thousands of reject labels": lambda real: forged(
        real, rejects={f"reason_{i}": 1 for i in range(5000)}
    ),
    "short bucket list": lambda real: forged(real, argon2_buckets=[5]),
    "long bucket list": lambda real: forged(real, argon2_buckets=[1] * 50),
    "negative bucket": lambda real: forged(real, argon2_buckets=[-5] * len(real["argon2_buckets"])),
    "buckets not a list": lambda real: forged(real, argon2_buckets={"0": 1}),
    "unknown field": lambda real: forged(real, **{MARKER: 5}),
    "larger than a snapshot can be": lambda real: (
        forged(real, cache_hits=1000)[:-1] + b" " * 2_000_000 + b"}"
    ),
}


@pytest.mark.parametrize("content", BAD_CONTENTS.values(), ids=BAD_CONTENTS.keys())
async def test_bad_snapshot_is_skipped_and_logged_once(
    service: Service,
    caplog: pytest.LogCaptureFixture,
    content: Callable[[dict[str, Any]], bytes],
) -> None:
    """A snapshot that is not small non-negative counts of the right shape adds nothing to
    any scrape (every sample as without it), the good one beside it still counts, and it
    is logged once, by file name, never with its content."""
    real = service.own_snapshot()
    service.plant(WORKER, {**real, "cache_hits": 7})
    baseline = service.scrape()
    assert baseline[("keystile_cache_hits_total", ())] == 7
    bad = service.plant(OTHER, content(real))
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        assert service.scrape() == baseline
    assert len(warnings_about(caplog, bad.name)) == 1
    assert all(MARKER not in r.getMessage() for r in caplog.records)


async def test_link_to_a_forged_snapshot_is_not_read(
    service: Service, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symbolic link named like a snapshot is never followed, whatever it points to."""
    baseline = service.scrape()
    target = tmp_path / "forged.json"
    target.write_text(json.dumps({**service.own_snapshot(), "cache_hits": 1000}))
    target.chmod(0o600)
    (service.directory / f"keystile-{WORKER}.json").symlink_to(target)
    for _ in range(3):
        assert service.scrape() == baseline
    assert len(warnings_about(caplog, f"keystile-{WORKER}.json")) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
async def test_snapshot_of_another_user_is_not_read(service: Service) -> None:
    """A snapshot file that belongs to another user adds nothing."""
    baseline = service.scrape()
    path = service.plant(WORKER, {**service.own_snapshot(), "cache_hits": 1000})
    os.chown(path, NOBODY, NOBODY)
    assert service.scrape() == baseline


async def test_directory_named_like_a_snapshot_is_skipped(service: Service) -> None:
    """A directory named like a snapshot adds nothing and fails nothing."""
    baseline = service.scrape()
    (service.directory / f"keystile-{WORKER}.json").mkdir()
    assert service.scrape() == baseline


async def test_impossible_pid_in_a_name_is_skipped(service: Service) -> None:
    """A snapshot named with a pid no process can have adds nothing and fails nothing."""
    baseline = service.scrape()
    service.plant(10**20, {**service.own_snapshot(), "cache_hits": 1000})
    assert service.scrape() == baseline


async def test_fifo_named_like_a_snapshot_does_not_hang_the_scrape(service: Service) -> None:
    """A FIFO named like a snapshot (no writer at the other end) is skipped at once: the
    scrape finishes, with the good snapshot beside it counted."""
    service.plant(WORKER, {**service.own_snapshot(), "cache_hits": 7})
    fifo = service.directory / f"keystile-{OTHER}.json"
    os.mkfifo(fifo, 0o600)
    done = threading.Event()
    result: list[Samples] = []

    def scrape() -> None:
        result.append(service.scrape())
        done.set()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    finished = done.wait(timeout=20)
    if not finished:  # let a reader blocked on the FIFO go, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert finished, "the scrape blocked on a FIFO"
    assert result[0][("keystile_cache_hits_total", ())] == 7


async def test_snapshot_removed_during_a_scrape_is_skipped_quietly(
    service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot listed by a scrape but removed before it is opened (a worker's file
    being cleaned up) is skipped without an error or a warning."""
    real = service.own_snapshot()
    service.plant(WORKER, {**real, "cache_hits": 7})
    baseline = service.scrape()
    victim = service.plant(OTHER, {**real, "cache_hits": 1000})
    listdir = os.listdir

    def listdir_then_remove(*args: Any, **kwargs: Any) -> list[str]:
        names = listdir(*args, **kwargs)
        if victim.exists():
            victim.unlink()
        return names

    monkeypatch.setattr(os, "listdir", listdir_then_remove)
    assert service.scrape() == baseline
    assert not warnings_about(caplog, victim.name)


async def test_real_snapshots_of_other_workers_count(service: Service) -> None:
    """The guard refuses no snapshot a worker writes: another worker's real snapshot adds
    its counters, rejects and histogram to the scrape."""
    real = service.own_snapshot()
    real.update(cache_hits=5, rejects={"wrong_secret": 2, "ip_not_allowed": 1})
    real["argon2_buckets"] = [1] + [0] * (len(real["argon2_buckets"]) - 1)
    real["argon2_seconds"] = 0.25
    service.plant(WORKER, real)
    samples = service.scrape()
    assert samples[("keystile_cache_hits_total", ())] == 5
    assert samples[("keystile_rejects_total", (("reason", "wrong_secret"),))] == 2
    assert samples[("keystile_rejects_total", (("reason", "ip_not_allowed"),))] == 1
    assert samples[("keystile_argon2_seconds_count", ())] == 1
    assert samples[("keystile_argon2_seconds_sum", ())] == 0.25
