"""The directory the workers of one service share their counter snapshots in.

Whatever can write in that directory could otherwise make a worker overwrite any file it
may write (through a planted link), add forged counts to every scrape, fail every scrape
with one bad value, or stall it on a FIFO. So the directory must belong to this user and
be writable by nobody else: checked when the metrics are configured (a
``ConfigurationError``), and again each time it is used. A snapshot is written to a new
private file (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600) renamed into place, and read
only when it is a small regular file of this user, opened without following a link or
waiting on a FIFO, whose every value is a plausible count. Anything else is skipped and
logged once per file, by name, never with its content: a scrape never fails or hangs
because of a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import fields
from typing import Any, NoReturn

from .errors import ConfigurationError
from .stats import ARGON2_BUCKETS, KeystileStats

__all__ = ["MAX_SNAPSHOT_BYTES", "SNAPSHOT_PREFIX", "SnapshotDirectory", "is_alive"]

logger = logging.getLogger("keystile")

SNAPSHOT_PREFIX = "keystile-"
#: A snapshot is about 1 KB; anything larger is not one.
MAX_SNAPSHOT_BYTES = 64 * 1024
#: The largest value a snapshot may carry: exact as a float, far past any real count.
MAX_VALUE = 2**53
#: A snapshot's reject reasons: few, short, and shaped like reason codes (``wrong_secret``).
MAX_REASONS = 64
_REASON = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_NAME = re.compile(rf"{SNAPSHOT_PREFIX}([1-9][0-9]{{0,9}})\.json")
_MAX_PID = 2**31 - 1
#: Files whose problem was logged; past this many, further ones are not logged.
_MAX_REPORTED = 1024
#: What a problem with the directory itself is reported under (no file is named so).
_THE_DIRECTORY = ""

_STRUCTURED = {"hit_ratio", "argon2_seconds", "rejects", "argon2_buckets"}
#: Every other field of a snapshot is a count (or a gauge): a non-negative integer.
_COUNTS = frozenset(f.name for f in fields(KeystileStats)) - _STRUCTURED
_BUCKETS = len(ARGON2_BUCKETS) + 1

_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class _BadSnapshot(Exception):
    """A file that is not a snapshot this service could have written; the reason says why
    without quoting the file."""


def _refuse(reason: str) -> NoReturn:
    raise _BadSnapshot(reason)


def _unsafe(st: os.stat_result) -> str | None:
    """Why a directory with this status may not hold snapshots, or ``None``."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_VALUE


def _check(data: object) -> dict[str, Any]:
    """``data`` if it has the shape and the plausible values of a snapshot."""
    if not isinstance(data, dict):
        _refuse("is not a JSON object")
    for name, value in data.items():
        if name in _COUNTS:
            if not _is_count(value):
                _refuse(f"has a {name} that is not a count")
        elif name == "argon2_seconds":
            if not (type(value) in (int, float) and 0 <= value <= MAX_VALUE):
                _refuse("has an argon2_seconds that is not a duration")
        elif name == "rejects":
            if not isinstance(value, dict) or len(value) > MAX_REASONS:
                _refuse("has rejects that are not counts by reason")
            for reason, n in value.items():
                if not (_REASON.fullmatch(reason) and _is_count(n)):
                    _refuse("has rejects that are not counts by reason")
        elif name == "argon2_buckets":
            if not (isinstance(value, list) and len(value) == _BUCKETS):
                _refuse("has argon2_buckets that are not the histogram's buckets")
            if not all(_is_count(n) for n in value):
                _refuse("has argon2_buckets that are not counts")
        else:
            _refuse("has a field keystile does not write")
    return data


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw, parse_constant=lambda _: _refuse("has a value that is not a number"))
    except (ValueError, RecursionError):
        _refuse("is not valid JSON")
    return _check(data)


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (its gauges still describe something)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


class SnapshotDirectory:
    """One snapshot directory: create and check it with :meth:`open`, then :meth:`write`
    this process's snapshot and :meth:`read` the others'."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reported: set[str] = set()

    @classmethod
    def open(cls, path: str, *, source: str) -> SnapshotDirectory:
        """The directory at ``path``, created 0700 if missing; a ``ConfigurationError``
        naming ``source`` (where the path came from) if others could write in it."""
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            pass  # something that is not a directory: said below
        except OSError as exc:
            raise ConfigurationError(
                f"the metrics directory {path} ({source}) cannot be created: {exc.strerror}"
            ) from None
        try:
            problem = _unsafe(os.stat(path))
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror})"
        if problem is not None:
            raise ConfigurationError(
                f"the metrics directory {path} ({source}) {problem}: it must be a directory"
                " of the service's user that nobody else may write in (chmod 700)"
            )
        return cls(path)

    def _report(self, what: str, message: str, *args: object) -> None:
        """Log a problem with ``what`` (a file name, or the directory) once, until it is
        solved: not at every scrape."""
        if what in self._reported or len(self._reported) >= _MAX_REPORTED:
            return
        self._reported.add(what)
        logger.warning(message, *args)

    def _open_directory(self) -> int | None:
        """A descriptor of the directory, if it is still this user's alone."""
        problem: str | None
        try:
            fd = os.open(self.path, _DIRECTORY_FLAGS)
        except OSError as exc:
            problem = f"cannot be opened ({exc.strerror})"
        else:
            problem = _unsafe(os.fstat(fd))
            if problem is None:
                self._reported.discard(_THE_DIRECTORY)
                return fd
            os.close(fd)
        message = "keystile: the metrics directory %s %s: snapshots are neither read nor written"
        self._report(_THE_DIRECTORY, message, self.path, problem)
        return None

    def write(self, pid: int, data: dict[str, Any]) -> None:
        """Put ``data`` where the other workers read process ``pid``'s snapshot: a new
        private file, renamed over the old snapshot (never through a link)."""
        directory = self._open_directory()
        if directory is None:
            return
        name = f"{SNAPSHOT_PREFIX}{pid}.json"
        temporary = f".{SNAPSHOT_PREFIX}{pid}-{secrets.token_hex(8)}.tmp"
        try:
            out = os.open(temporary, _CREATE_FLAGS, 0o600, dir_fd=directory)
            try:
                with os.fdopen(out, "wb") as file:
                    file.write(json.dumps(data).encode())
                os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=directory)
                raise
        except OSError as exc:
            message = "keystile: cannot write the metrics snapshot %s (%s)"
            self._report(name, message, name, exc.strerror)
        else:
            self._reported.discard(name)
        finally:
            os.close(directory)

    def read(self, me: int) -> list[tuple[int, dict[str, Any]]]:
        """Every other process's snapshot that passes the checks, with its pid."""
        directory = self._open_directory()
        if directory is None:
            return []
        found: list[tuple[int, dict[str, Any]]] = []
        try:
            names = os.listdir(directory)
        except OSError as exc:
            message = "keystile: the metrics directory %s cannot be listed (%s)"
            self._report(_THE_DIRECTORY, message, self.path, exc.strerror)
            names = []
        try:
            for name in names:
                match = _NAME.fullmatch(name)
                if match is None:
                    continue
                pid = int(match[1])
                if pid == me or pid > _MAX_PID:
                    continue
                try:
                    found.append((pid, self._read_one(directory, name)))
                except FileNotFoundError:
                    continue  # removed since it was listed
                except _BadSnapshot as exc:
                    self._report(name, "keystile: metrics snapshot %s skipped: it %s", name, exc)
            return found
        finally:
            os.close(directory)

    @staticmethod
    def _read_one(directory: int, name: str) -> dict[str, Any]:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=directory)
        except FileNotFoundError:
            raise
        except OSError as exc:  # O_NOFOLLOW: a link fails with ELOOP (EMLINK on BSD)
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                _refuse("is a symbolic link")
            _refuse(f"cannot be opened ({exc.strerror})")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                _refuse("is not a regular file")
            if st.st_uid != os.geteuid():
                _refuse(f"is owned by uid {st.st_uid}, not by this user")
            if st.st_size > MAX_SNAPSHOT_BYTES:
                _refuse(f"is larger than {MAX_SNAPSHOT_BYTES} bytes")
            chunks, size = [], 0
            while size <= MAX_SNAPSHOT_BYTES:
                chunk = os.read(fd, MAX_SNAPSHOT_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            _refuse(f"cannot be read ({exc.strerror})")
        finally:
            os.close(fd)
        if size > MAX_SNAPSHOT_BYTES:
            _refuse(f"is larger than {MAX_SNAPSHOT_BYTES} bytes")
        return _parse(b"".join(chunks))
