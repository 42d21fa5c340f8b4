"""Durations as operators write them: ``30s``, ``15m``, ``1h``, ``90d``, ``2w``."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

#: The longest duration accepted: 100 years. Durations are added to or taken from the
#: current time (``--expires-in``, ``--grace``, ``--unused-for``); a longer one is a typo,
#: and a much longer one would not fit in a ``datetime`` at all.
MAX_DURATION = timedelta(days=36525)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.ASCII)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?", re.ASCII)


def parse_duration(text: str) -> timedelta:
    """``"90d"`` → ``timedelta(days=90)``; a bare number is seconds.

    Raises ``ValueError`` for anything else and for durations past ``MAX_DURATION``.
    """
    value = text.strip().lower()
    if _NUMBER_RE.fullmatch(value):
        parts = [(value, "s")]
    else:
        parts = _DURATION_RE.findall(value)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != value.replace(" ", ""):
            raise ValueError(f"invalid duration {text!r}: use e.g. 30s, 15m, 1h, 90d or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds <= MAX_DURATION.total_seconds():  # also catches inf from a huge number
        raise ValueError(
            f"duration {text!r} is too long: at most 100 years ({format_duration(MAX_DURATION)})"
        )
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
