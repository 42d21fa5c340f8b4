"""The usage chart of a key's page: bars as inline SVG, drawn by the server.

One bar per period (hours over 24 hours and 7 days, days over 30 days), its height scaled
to the busiest period, the refused attempts stacked on top in another colour. Only
numbers leave this module; the template writes the SVG (escaped like everything else), so
the chart needs no script, no outside asset and nothing the Content-Security-Policy would
have to allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..stores.records import UsageBucket
from ..usage_chart import dense, periods
from ..validation import UsageGranularity

__all__ = ["RANGES", "Bar", "Chart", "chart"]

#: The ranges a key's page offers: (label, how far back, bucket period).
RANGES: dict[str, tuple[timedelta, UsageGranularity]] = {
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "hour"),
    "30d": (timedelta(days=30), "day"),
}
WIDTH, HEIGHT = 720, 160


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    requests_y: float
    requests_height: float
    rejected_y: float
    rejected_height: float
    label: str


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    requests: int
    rejected: int
    first: str
    last: str
    width: int = WIDTH
    height: int = HEIGHT


def chart(buckets: Sequence[UsageBucket], since: datetime, until: datetime, by: str) -> Chart:
    """The bars of ``buckets`` over every ``by`` period from ``since`` to ``until``."""
    rows = dense(buckets, periods(since, until, by))
    peak = max((b.requests + b.rejected for b in rows), default=0)
    step = WIDTH / max(len(rows), 1)
    scale = HEIGHT / peak if peak else 0.0
    fmt = "%Y-%m-%d %H:%M" if by == "hour" else "%Y-%m-%d"
    bars = []
    for index, b in enumerate(rows):
        requests, rejected = b.requests * scale, b.rejected * scale
        bars.append(
            Bar(
                x=round(index * step, 2),
                width=round(max(step - 1, 1), 2),
                requests_y=round(HEIGHT - requests, 2),
                requests_height=round(requests, 2),
                rejected_y=round(HEIGHT - requests - rejected, 2),
                rejected_height=round(rejected, 2),
                label=f"{b.start:{fmt}} UTC: {b.requests} requests, {b.rejected} refused",
            )
        )
    return Chart(
        bars=bars,
        peak=peak,
        requests=sum(b.requests for b in rows),
        rejected=sum(b.rejected for b in rows),
        first=f"{rows[0].start:{fmt}}" if rows else "",
        last=f"{rows[-1].start:{fmt}}" if rows else "",
    )
