"""Billing periods: month-end anchors kept through leap and non-leap years, UTC, boundaries, tiling."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditflow.domain.periods import (
    Period,
    next_period,
    period_at,
    period_containing,
    period_key,
    previous_period,
)

MICROSECOND = timedelta(microseconds=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def starts(anchor: datetime, count: int) -> list[str]:
    period = period_at(anchor, 0)
    keys = []
    for _ in range(count):
        keys.append(period_key(period))
        period = next_period(period)
    return keys


def test_jan_31_anchor_through_a_non_leap_then_a_leap_year() -> None:
    assert starts(utc(2027, 1, 31), 16) == [
        "2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30", "2027-05-31", "2027-06-30", "2027-07-31",
        "2027-08-31", "2027-09-30", "2027-10-31", "2027-11-30", "2027-12-31",
        "2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30",
    ]


def test_jan_31_anchor_in_a_leap_year_renews_on_feb_29_then_mar_31() -> None:
    periods = [period_at(utc(2028, 1, 31), n) for n in range(14)]
    assert [(p.index, p.start.date().isoformat(), p.end.date().isoformat()) for p in periods[:3]] == [
        (0, "2028-01-31", "2028-02-29"), (1, "2028-02-29", "2028-03-31"), (2, "2028-03-31", "2028-04-30")]
    assert [p.key for p in periods[11:]] == ["2028-12-31", "2029-01-31", "2029-02-28"]
    assert [p.duration.days for p in periods[:13]] == [29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 28]


def test_feb_29_and_30th_anchors_keep_their_day() -> None:
    assert starts(utc(2028, 2, 29), 14) == [
        "2028-02-29", "2028-03-29", "2028-04-29", "2028-05-29", "2028-06-29", "2028-07-29", "2028-08-29",
        "2028-09-29", "2028-10-29", "2028-11-29", "2028-12-29", "2029-01-29", "2029-02-28", "2029-03-29"]
    assert starts(utc(2026, 1, 30), 4) == ["2026-01-30", "2026-02-28", "2026-03-30", "2026-04-30"]


def test_the_anchor_time_of_day_is_kept_to_the_microsecond() -> None:
    anchor = utc(2026, 1, 31, 23, 59, 59, 999_999)
    first = period_at(anchor, 0)
    assert first.start == anchor
    assert first.end == utc(2026, 2, 28, 23, 59, 59, 999_999)
    assert period_at(anchor, 2).start == utc(2026, 3, 31, 23, 59, 59, 999_999)
    assert first.key == "2026-01-31"


def test_period_containing_at_the_boundaries() -> None:
    anchor = utc(2026, 1, 31, 9, 30)
    feb = period_at(anchor, 1)
    assert (feb.start, feb.end) == (utc(2026, 2, 28, 9, 30), utc(2026, 3, 31, 9, 30))
    assert period_containing(anchor, anchor) == period_at(anchor, 0)
    assert period_containing(anchor, feb.start) == feb
    assert period_containing(anchor, feb.start - MICROSECOND) == period_at(anchor, 0)
    assert period_containing(anchor, feb.end - MICROSECOND) == feb
    assert period_containing(anchor, feb.end) == period_at(anchor, 2)
    # Same calendar day as a renewal but before its time of day: still the previous period.
    assert period_containing(anchor, utc(2026, 3, 31, 9, 29, 59)).index == 1
    assert period_containing(anchor, utc(2026, 3, 31, 9, 30)).index == 2
    assert period_containing(anchor, utc(2029, 2, 28, 9, 30)).key == "2029-02-28"
    assert period_containing(anchor, utc(2029, 2, 28, 9, 29)).key == "2029-01-31"
    assert feb.contains(utc(2026, 3, 1)) and not feb.contains(feb.end)
    assert Period.model_validate_json(feb.model_dump_json()) == feb  # as a workflow input/output


def test_other_time_zones_are_converted_to_utc() -> None:
    cet = timezone(timedelta(hours=1))
    anchor = datetime(2026, 2, 1, 0, 30, tzinfo=cet)  # 2026-01-31T23:30Z
    # Mar 1 00:00 in UTC+1 is Feb 28 23:00Z: still before the 23:30Z renewal.
    assert period_containing(anchor, datetime(2026, 3, 1, 0, 0, tzinfo=cet)).index == 0
    period = period_containing(anchor, datetime(2026, 3, 1, 0, 30, tzinfo=cet))
    assert (period.index, period.start, period.end) == (1, utc(2026, 2, 28, 23, 30), utc(2026, 3, 31, 23, 30))
    assert period.start.tzinfo is UTC
    assert period.key == "2026-02-28"


def test_refusals() -> None:
    anchor = utc(2026, 1, 31)
    with pytest.raises(ValueError, match="timezone-aware"):
        period_containing(datetime(2026, 1, 31), anchor)  # naive on purpose
    with pytest.raises(ValueError, match="timezone-aware"):
        period_containing(anchor, datetime(2026, 2, 10))
    with pytest.raises(ValueError, match="before the billing anchor"):
        period_containing(anchor, anchor - MICROSECOND)
    with pytest.raises(ValueError, match="index must be >= 0"):
        previous_period(period_at(anchor, 0))
    assert previous_period(period_at(anchor, 2)) == period_at(anchor, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        Period(anchor=anchor, index=0, start=datetime(2026, 1, 31), end=utc(2026, 2, 28))


anchors = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC))


@settings(max_examples=300, deadline=None)
@given(anchor=anchors, offset=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=366 * 30)))
def test_property_the_period_containing_an_instant_contains_it_and_its_neighbours_tile(
        anchor: datetime, offset: timedelta) -> None:
    at = anchor + offset
    period = period_containing(anchor, at)
    assert period.start <= at < period.end
    following = next_period(period)
    assert following.start == period.end  # no gap, no overlap
    assert period_containing(anchor, period.start) == period  # each period contains its start
    assert period_containing(anchor, period.end - MICROSECOND) == period
    assert period_containing(anchor, period.end) == following
    if period.index:
        assert previous_period(period).end == period.start
    # The anchor's day is kept, clamped to the month's length; the time of day never moves.
    assert period.start.day == min(anchor.day, calendar.monthrange(period.start.year, period.start.month)[1])
    assert period.start.timetz() == anchor.timetz()
    assert timedelta(days=28) <= period.duration <= timedelta(days=31)


@settings(max_examples=50, deadline=None)
@given(anchor=anchors, count=st.integers(min_value=12, max_value=60))
def test_property_consecutive_periods_tile_from_the_anchor(anchor: datetime, count: int) -> None:
    periods = [period_at(anchor, 0)]
    for _ in range(count - 1):
        periods.append(next_period(periods[-1]))
    assert periods[0].start == anchor
    for before, after in zip(periods, periods[1:], strict=False):
        assert before.end == after.start
        assert after.index == before.index + 1
    keys = [p.key for p in periods]
    assert len(set(keys)) == count  # keys are unique per account
