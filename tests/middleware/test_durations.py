"""Durations as operators write them (``keystile.durations``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystile.durations import MAX_DURATION, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("90d", timedelta(days=90)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1w2d3h4m5s", timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
        ("45", timedelta(seconds=45)),
        ("0", timedelta(0)),
        ("1.5h", timedelta(minutes=90)),
        ("2.5", timedelta(seconds=2.5)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    """Each unit, a combination and a bare number of seconds parse to the right timedelta."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["1H", " 1h ", "1h 30m", "1 h"])
def test_parse_duration_tolerates_case_and_spaces(text: str) -> None:
    """Upper-case units and spaces around or between parts are accepted."""
    assert parse_duration(text) in {timedelta(hours=1), timedelta(hours=1, minutes=30)}


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "h",
        "abc",
        "5x",
        "-5s",
        "+5s",
        "1.5.5h",
        "1h-30m",
        "5s x",
        "1e3",
        "s5",
        "1,5h",
        "1h,",
    ],
)
def test_parse_duration_rejects_invalid(text: str) -> None:
    """Empty, signed, unknown-unit and garbled strings raise ValueError."""
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["100000000000000", "10000000000d", "9999999999999w"])
def test_parse_duration_out_of_range_raises_value_error(text: str) -> None:
    """A duration too large for a timedelta raises ValueError (the documented error)."""
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text", ["3000000d", "36526d", "5218w", "3155760001", "36525d1s", "1" * 400 + "s"]
)
def test_parse_duration_longer_than_a_century_raises_value_error(text: str) -> None:
    """A duration past 100 years is refused at parse time, in words, so that no caller
    later overflows a datetime with ``now + duration``."""
    with pytest.raises(ValueError, match="at most 100 years"):
        parse_duration(text)


def test_parse_duration_accepts_exactly_a_century() -> None:
    """The bound itself is accepted, and it can be added to today's date."""
    assert parse_duration(format_duration(MAX_DURATION)) == MAX_DURATION == timedelta(days=36525)
    assert datetime.now(timezone.utc) + MAX_DURATION > datetime.now(timezone.utc)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(weeks=2), "2w"),
        (timedelta(days=90), "90d"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=1, minutes=30), "90m"),
        (timedelta(seconds=90), "90s"),
        (timedelta(0), "0s"),
    ],
)
def test_format_duration(delta: timedelta, text: str) -> None:
    """A duration is written in the largest unit that divides it exactly."""
    assert format_duration(delta) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=int(MAX_DURATION.total_seconds())))
def test_format_parse_round_trip(seconds: int) -> None:
    """Any whole number of seconds up to the bound survives format_duration then
    parse_duration."""
    delta = timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta
