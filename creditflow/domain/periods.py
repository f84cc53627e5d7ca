"""Monthly billing periods anchored on the day the account was opened, UTC throughout (pure, no clock).

Rule. The **anchor** is the instant the billing relationship started (normally the account's
``created_at``). Period ``n`` (``n = 0, 1, 2, ...``) starts ``n`` calendar months after the anchor,
on the anchor's day of month, clamped to the last day of shorter months, at the anchor's exact UTC
time of day (to the microsecond); it ends where period ``n + 1`` starts (``start <= t < end``).
Each start is computed from the anchor, never from the previous period, so the anchor day is kept:
an account opened on Jan 31 renews on Feb 28 (Feb 29 in a leap year), then Mar 31, Apr 30, May 31...
and never drifts to the 28th.

Why the anchor's time of day rather than midnight: the first period then starts exactly when the
account opened (no hours billed before it existed), and a renewal timer fires one calendar month to
the microsecond after the previous boundary, which is what a durable workflow sleeps until.

Instants before the anchor belong to no period (``ValueError``). Naive datetimes are refused; aware
ones in another zone are converted to UTC first.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["Period", "as_utc", "next_period", "period_at", "period_containing", "period_key", "previous_period"]


def as_utc(value: datetime, what: str = "datetime") -> datetime:
    """The same instant in UTC; a naive datetime is refused because its instant is unknown."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC); got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _shift_months(anchor: datetime, months: int) -> datetime:
    """``anchor`` plus ``months`` calendar months, the day clamped to the target month's length."""
    total = anchor.year * 12 + (anchor.month - 1) + months
    year, month0 = divmod(total, 12)
    month = month0 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


class Period(BaseModel):
    """One billing period: ``start <= t < end``; ``index`` 0 is the period that starts at the anchor."""

    model_config = ConfigDict(frozen=True)

    anchor: datetime
    index: int
    start: datetime
    end: datetime

    @field_validator("anchor", "start", "end")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)

    def contains(self, at: datetime) -> bool:
        return self.start <= as_utc(at, "at") < self.end

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    @property
    def key(self) -> str:
        return period_key(self)


def period_at(anchor: datetime, index: int) -> Period:
    """Period number ``index`` (0-based) of an account anchored at ``anchor``."""
    if index < 0:
        raise ValueError(f"period index must be >= 0, got {index}")
    anchor = as_utc(anchor, "anchor")
    return Period(anchor=anchor, index=index, start=_shift_months(anchor, index),
                  end=_shift_months(anchor, index + 1))


def period_containing(anchor: datetime, at: datetime) -> Period:
    """The period with ``start <= at < end``; ``at`` before the anchor is refused."""
    anchor = as_utc(anchor, "anchor")
    at = as_utc(at, "at")
    if at < anchor:
        raise ValueError(f"{at.isoformat()} is before the billing anchor {anchor.isoformat()}")
    # The calendar-month difference is right or one too many (at is earlier in its month than the
    # anchor's clamped day/time); period n + 1 starts in the month after at's, so never too few.
    index = (at.year - anchor.year) * 12 + (at.month - anchor.month)
    if _shift_months(anchor, index) > at:
        index -= 1
    period = period_at(anchor, index)
    assert period.start <= at < period.end
    return period


def next_period(period: Period) -> Period:
    """The period that starts where ``period`` ends."""
    return period_at(period.anchor, period.index + 1)


def previous_period(period: Period) -> Period:
    """The period that ends where ``period`` starts; the first period has none."""
    return period_at(period.anchor, period.index - 1)


def period_key(period: Period) -> str:
    """A stable id for the period: its UTC start date (``"2026-01-31"``).

    Unique per account because every period of an account starts in a different calendar month;
    used in workflow ids such as ``invoice:{account_id}:{period_key}``."""
    return period.start.date().isoformat()
