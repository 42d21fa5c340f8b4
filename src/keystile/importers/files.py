"""Keys from a file: CSV, or JSON Lines (one object per line), for any other source.

The columns (CSV header, or JSON fields)::

    id, owner, name, scopes, created_at, expires_at, revoked, hash_algorithm, hash

``id`` is the key's public part as its format reads it (``--format``: the shape of the
key strings, ``drf-api-key`` by default); ``hash_algorithm`` one of
``legacy.schemes.ALGORITHMS`` and ``hash`` the hash in that algorithm's form; ``scopes``
separated by spaces or commas (a list in JSON); times in ISO 8601 (UTC unless they say
otherwise); ``revoked`` true/false or the time of the revocation. ``id``,
``hash_algorithm`` and ``hash`` are required, the others may be empty or absent
(``owner``: then ``--owner``).

A file past ``MAX_FILE_BYTES`` or ``MAX_ROWS``, without the required columns, or that
is not CSV or JSON Lines is refused whole (``bad_file``); a row that cannot be read
(a bad time, a field past ``MAX_FIELD_LENGTH``) is skipped and counted (``invalid_row``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ImportSourceError
from ..stores.records import utcnow
from .database import moment
from .records import Skipped, SourceKey, keys_of

__all__ = ["COLUMNS", "MAX_FIELD_LENGTH", "MAX_FILE_BYTES", "MAX_ROWS", "read_keys"]

COLUMNS = (
    "id",
    "owner",
    "name",
    "scopes",
    "created_at",
    "expires_at",
    "revoked",
    "hash_algorithm",
    "hash",
)
_REQUIRED = ("id", "hash_algorithm", "hash")
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ROWS = 1_000_000
MAX_FIELD_LENGTH = 4096
_TRUE, _FALSE = {"true", "yes", "1", "t", "y"}, {"false", "no", "0", "f", "n", ""}


def read_keys(path: str | Path) -> list[SourceKey | Skipped]:
    """The keys of a CSV file, or of a JSON Lines file (``.jsonl``, ``.ndjson``)."""
    text = _read(Path(path))
    jsonl = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    return keys_of(_bounded(_json_rows(text) if jsonl else _csv_rows(text)), _key)


def _bounded(rows: Iterator[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for number, row in enumerate(rows, 1):
        if number > MAX_ROWS:
            raise ImportSourceError("bad_file", f"more than {MAX_ROWS} rows")
        yield row


def _read(path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImportSourceError("unreachable", f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImportSourceError("bad_file", f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportSourceError("bad_file", f"{path} is not UTF-8 text") from None


def _csv_rows(text: str) -> Iterator[Mapping[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
        _check_columns(header)
        yield from reader
    except csv.Error as exc:
        raise ImportSourceError("bad_file", f"not CSV (line {reader.line_num}): {exc}") from None


def _json_rows(text: str) -> Iterator[Mapping[str, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ImportSourceError("bad_file", f"line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise ImportSourceError("bad_file", f"line {number} is not a JSON object")
        _check_columns(list(row))
        yield row


def _check_columns(columns: Sequence[str]) -> None:
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise ImportSourceError("bad_file", f"no column {', '.join(missing)}")


def _key(row: Mapping[str, Any]) -> SourceKey:
    return SourceKey(
        source_id=_text(row, "id"),
        public=_text(row, "id"),
        algorithm=_text(row, "hash_algorithm"),
        hash=_text(row, "hash"),
        name=_text(row, "name") or None,
        owner=_text(row, "owner") or None,
        scopes=_scopes(row.get("scopes")),
        created_at=moment(_text(row, "created_at")),
        expires_at=moment(_text(row, "expires_at")),
        revoked_at=_revoked(row.get("revoked")),
    )


def _text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_FIELD_LENGTH:
        raise ValueError(f"{column}: text of at most {MAX_FIELD_LENGTH} characters")
    return value.strip()


def _scopes(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if value is None:
        return ()
    if not isinstance(value, str) or len(value) > MAX_FIELD_LENGTH:
        raise ValueError("scopes: a list, or text separated by spaces or commas")
    return tuple(s for s in re.split(r"[\s,]+", value) if s)


def _revoked(value: Any) -> Any:
    if isinstance(value, bool):
        return utcnow() if value else None
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return utcnow()
    if text in _FALSE:
        return None
    return moment(str(value))
