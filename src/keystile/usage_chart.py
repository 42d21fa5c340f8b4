"""``keystile usage`` output: every period from ``--since`` to now, as a bar chart within
80 columns, as JSON Lines or as a PNG; and the busiest keys.

The store returns only the periods a key was used in; the chart, the JSON and the plot
show every period of the range, the empty ones as zeros, so a quiet night reads as a
quiet night and not as a gap, and a script gets one row per period without filling the
holes itself. The chart is plain ASCII (``#`` bars, no colours), so it reads the same in
any terminal, a CI log or a ticket. The PNG needs matplotlib, the extra ``keystile[plot]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .durations import format_duration
from .errors import KeystileError
from .stores.records import UsageBucket, UsageTotal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "bar_chart",
    "dense",
    "periods",
    "plot_png",
    "require_matplotlib",
    "top_table",
    "usage_figure",
]

#: Columns of the longest bar: 16 (time) + 2 + 40 + 2 + 9 (requests) + 2 + 8 (rejected).
BAR_WIDTH = 40
#: The most periods one ``keystile usage`` shows: 90 days (the default retention) by
#: minute fit; a century by minute, a typo, would be 52 million rows.
MAX_PERIODS = 200_000
SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def periods(since: datetime, until: datetime, by: str) -> list[datetime]:
    """The starts (UTC) of every ``by`` period from the one holding ``since`` to the one
    holding ``until``; ``KeystileError`` naming the options when there are too many."""
    seconds = SECONDS[by]
    first = math.floor(since.timestamp()) // seconds * seconds
    last = math.floor(until.timestamp()) // seconds * seconds
    count = (last - first) // seconds + 1
    if count > MAX_PERIODS:
        raise KeystileError(
            f"--since {format_duration(until - since)} --by {by} is {count} periods, more than"
            f" {MAX_PERIODS}: choose a longer --by or a shorter --since"
        )
    return [datetime.fromtimestamp(t, timezone.utc) for t in range(first, last + 1, seconds)]


def dense(buckets: Sequence[UsageBucket], starts: Sequence[datetime]) -> list[UsageBucket]:
    """One bucket per period of ``starts``: the store's where it has one, else zeros."""
    found = {b.start: b for b in buckets}
    return [found.get(start) or UsageBucket(start, 0, 0) for start in starts]


def bar_chart(rows: Sequence[UsageBucket]) -> list[str]:
    """One line per period (UTC), a bar scaled to the busiest one, requests and refused
    attempts as numbers, and the totals."""
    lines = [f"{'period (UTC)':<16}  {'':<{BAR_WIDTH}}  {'requests':>9}  {'rejected':>8}"]
    peak = max((b.requests + b.rejected for b in rows), default=0)
    for b in rows:
        width = round(BAR_WIDTH * (b.requests + b.rejected) / peak) if peak else 0
        refused = round(width * b.rejected / (b.requests + b.rejected)) if width else 0
        if b.rejected and not refused:
            refused = 1
            width = max(width, 1)
        bar = "#" * (width - refused) + "!" * refused
        lines.append(
            f"{b.start:%Y-%m-%d %H:%M}  {bar:<{BAR_WIDTH}}  {b.requests:>9}  {b.rejected:>8}"
        )
    lines.append(
        f"{'total':<16}  {'# requests  ! rejected':<{BAR_WIDTH}}  "
        f"{sum(b.requests for b in rows):>9}  {sum(b.rejected for b in rows):>8}"
    )
    return lines


def top_table(
    totals: Sequence[UsageTotal],
    owner: str,
    period: str,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> None:
    """The busiest keys, one per line: id, requests, rejected, name (cut to fit)."""
    if not totals:
        err(f"no use of any key of owner {owner!r} in the last {period}")
        return
    out(f"{'KEY ID':<24}  {'requests':>10}  {'rejected':>8}  NAME")
    for t in totals:
        out(f"{t.key_id:<24}  {t.requests:>10}  {t.rejected:>8}  {t.name[:30]}")


def require_matplotlib() -> None:
    """Fail with one line naming the extra before any work, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KeystileError(
            "--plot needs matplotlib: python -m pip install 'keystile[plot]'"
        ) from None


def usage_figure(rows: Sequence[UsageBucket], *, title: str, by: str) -> Figure:
    """Requests and refused attempts per period, stacked, over a time axis (UTC) that runs
    from the first period's start to the last one's end: a step per period, empty periods
    at zero, so the width of a stretch of the axis is the time it took."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure

    period = timedelta(seconds=SECONDS[by])
    edges = [b.start for b in rows] + ([rows[-1].start + period] if rows else [])
    x = [float(date2num(edge)) for edge in edges]  # type: ignore[no-untyped-call]
    figure = Figure(figsize=(10, 4), dpi=100)
    axes = figure.add_subplot()
    if rows:
        requests = [b.requests for b in rows]
        both = [b.requests + b.rejected for b in rows]
        axes.stairs(both, x, fill=True, color="tab:red", label="rejected")
        axes.stairs(requests, x, fill=True, color="tab:blue", label="requests")
        axes.set_xlim(x[0], x[-1])
        axes.legend()
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.set_ylabel("count")
    axes.set_xlabel("UTC")
    return figure


def plot_png(rows: Sequence[UsageBucket], path: str, *, title: str, by: str) -> None:
    """``usage_figure`` to a PNG file."""
    usage_figure(rows, title=title, by=by).savefig(path, format="png")
