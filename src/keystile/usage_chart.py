"""``keystile usage`` output: a bar chart within 80 columns, a PNG, the busiest keys.

Plain ASCII (``#`` bars, no colours), so it reads the same in any terminal, a CI log or
a ticket. The PNG needs matplotlib, the optional extra ``keystile[plot]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from .errors import KeystileError
from .stores.records import UsageBucket, UsageTotal

__all__ = ["bar_chart", "plot_png", "require_matplotlib", "top_table"]

#: Columns of the longest bar: 16 (time) + 2 + 40 + 2 + 9 (requests) + 2 + 8 (rejected).
BAR_WIDTH = 40
#: Periods drawn with their empty ones in between; past this only those with counts.
MAX_FILLED_ROWS = 200
_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def _periods(since: datetime, until: datetime, seconds: int) -> list[datetime]:
    first = math.floor(since.timestamp()) // seconds * seconds
    last = math.floor(until.timestamp()) // seconds * seconds
    return [datetime.fromtimestamp(t, timezone.utc) for t in range(first, last + seconds, seconds)]


def bar_chart(
    buckets: Sequence[UsageBucket], *, since: datetime, until: datetime, by: str
) -> list[str]:
    """One line per period (UTC), a bar scaled to the busiest one, requests and refused
    attempts as numbers; empty periods shown when there are at most ``MAX_FILLED_ROWS``."""
    seconds = _SECONDS[by]
    periods = _periods(since, until, seconds)
    found = {b.start: b for b in buckets}
    if len(periods) <= MAX_FILLED_ROWS:
        rows = [found.get(p, UsageBucket(p, 0, 0)) for p in periods]
    else:
        rows = list(buckets)
    total_requests = sum(b.requests for b in buckets)
    total_rejected = sum(b.rejected for b in buckets)
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
    if len(periods) > MAX_FILLED_ROWS:
        lines.append(f"(periods without use are not shown: {len(periods)} in the range)")
    lines.append(
        f"{'total':<16}  {'# requests  ! rejected':<{BAR_WIDTH}}  "
        f"{total_requests:>9}  {total_rejected:>8}"
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


def plot_png(buckets: Sequence[UsageBucket], path: str, *, title: str, by: str) -> None:
    """Requests and refused attempts per period, as stacked bars, to a PNG file."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import date2num

    starts = [float(date2num(b.start)) for b in buckets]  # type: ignore[no-untyped-call]
    figure, axes = plt.subplots(figsize=(10, 4), dpi=100)
    try:
        width = _SECONDS[by] / 86400 * 0.8  # matplotlib dates count in days
        axes.bar(starts, [b.requests for b in buckets], width=width, label="requests")
        axes.bar(
            starts,
            [b.rejected for b in buckets],
            width=width,
            bottom=[b.requests for b in buckets],
            label="rejected",
            color="tab:red",
        )
        axes.set_title(title)
        axes.set_ylabel("count")
        axes.set_xlabel("UTC")
        axes.legend()
        axes.xaxis_date()
        figure.autofmt_xdate()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
