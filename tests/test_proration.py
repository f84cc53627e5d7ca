"""Plan changes: next-renewal by default; immediate changes prorated to the microsecond, half-up to the cent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from creditflow.domain.money import micros_to_cents, prorate
from creditflow.domain.periods import period_at
from creditflow.domain.plans import Plan, load_plan_catalog
from creditflow.domain.proration import PlanChangeTiming, Proration, change_effective_at, prorate_plan_change

CATALOG = load_plan_catalog()
STARTER, GROWTH, SCALE = CATALOG.get("starter"), CATALOG.get("growth"), CATALOG.get("scale")
ANCHOR = datetime(2026, 1, 31, tzinfo=UTC)
FEB = period_at(ANCHOR, 0)  # 2026-01-31 -> 2026-02-28: 28 days
APR = period_at(ANCHOR, 2)  # 2026-03-31 -> 2026-04-30: 30 days


def figures(p: Proration) -> tuple[int, ...]:
    """(credit, charge, net, granted, expired, plan credits after)."""
    return (p.old_plan_credit_cents, p.new_plan_charge_cents, p.net_cents, p.plan_credits_granted,
            p.plan_credits_expired, p.plan_credits_after)


@pytest.mark.parametrize(("amount", "num", "den", "expected"), [
    (7, 1, 2, 4), (5, 1, 2, 3), (3, 1, 2, 2), (5, 1, 4, 1), (2, 1, 3, 1), (1, 1, 3, 0), (19900, 1, 3, 6633),
    (49900, 2, 3, 33267), (-7, 1, 2, -4), (-5, 1, 4, -1), (0, 1, 2, 0), (4900, 0, 5, 0), (4900, 5, 5, 4900),
    (10**30 + 1, 1, 2, 5 * 10**29 + 1),  # integers only: exact far beyond Decimal's 28 digits
])
def test_prorate_rounds_half_up(amount: int, num: int, den: int, expected: int) -> None:
    assert prorate(amount, num, den) == expected


@pytest.mark.parametrize(("micros", "cents"), [
    (500_000, 1), (499_999, 0), (1_234_500_000, 1235), (1_234_499_999, 1234), (150_000_000, 150), (0, 0),
    (-500_000, -1), (-1_499_999, -1),
])
def test_micros_to_cents_rounds_half_up(micros: int, cents: int) -> None:
    assert micros_to_cents(micros) == cents


def test_changes_take_effect_at_the_next_renewal_by_default() -> None:
    at = datetime(2026, 2, 14, 15, 0, tzinfo=UTC)
    assert change_effective_at(FEB, at, PlanChangeTiming.NEXT_RENEWAL) == datetime(2026, 2, 28, tzinfo=UTC)
    assert change_effective_at(FEB, at, PlanChangeTiming.IMMEDIATE) == at
    with pytest.raises(ValueError, match="not in the period starting 2026-01-31"):
        change_effective_at(FEB, FEB.end, PlanChangeTiming.NEXT_RENEWAL)


def test_upgrade_halfway_through_february() -> None:
    p = prorate_plan_change(FEB, datetime(2026, 2, 14, tzinfo=UTC), STARTER, GROWTH, plan_credits_remaining=1200)
    assert (p.remaining_micros, p.period_micros) == (14 * 86_400 * 10**6, 28 * 86_400 * 10**6)
    # credit 4900/2, charge 19900/2; plan credits: +22000/2 - 5000/2
    assert figures(p) == (2450, 9950, 7500, 8500, 0, 9700)
    assert (p.period_key, p.old_plan_id, p.new_plan_id) == ("2026-01-31", "starter", "growth")


def test_upgrade_with_a_third_of_april_left_rounds_each_line_half_up() -> None:
    p = prorate_plan_change(APR, datetime(2026, 4, 20, tzinfo=UTC), GROWTH, SCALE, plan_credits_remaining=0)
    # 19900/3 = 6633.33 -> 6633; 49900/3 = 16633.33 -> 16633; 60000/3 - 22000/3 = 20000 - 7333
    assert figures(p) == (6633, 16633, 10000, 12667, 0, 12667)


@pytest.mark.parametrize(("remaining", "expired", "after"), [(5000, 5000, 0), (30000, 18333, 11667), (0, 0, 0)])
def test_downgrade_expires_the_old_plans_share_but_never_more_than_remains(remaining: int, expired: int,
                                                                          after: int) -> None:
    p = prorate_plan_change(APR, datetime(2026, 4, 20, tzinfo=UTC), SCALE, STARTER, plan_credits_remaining=remaining)
    # credit 49900/3 -> 16633; charge 4900/3 = 1633.33 -> 1633; share swap 1667 - 20000 = -18333
    assert figures(p) == (16633, 1633, -15000, 0, expired, after)


def test_to_and_from_no_plan() -> None:
    halfway = datetime(2026, 2, 14, tzinfo=UTC)
    assert figures(prorate_plan_change(FEB, halfway, None, GROWTH, plan_credits_remaining=0)) == (
        0, 9950, 9950, 11000, 0, 11000)
    assert figures(prorate_plan_change(FEB, halfway, GROWTH, None, plan_credits_remaining=20000)) == (
        9950, 0, -9950, 0, 11000, 9000)


def test_a_half_cent_rounds_up() -> None:
    tiny = Plan(id="tiny", name="Tiny", monthly_fee_usd="0.07", included_credits=7)
    p = prorate_plan_change(FEB, datetime(2026, 2, 14, tzinfo=UTC), tiny, None, plan_credits_remaining=7)
    assert figures(p) == (4, 0, -4, 0, 4, 3)  # 3.5 cents -> 4; 3.5 credits -> 4


def test_boundaries_of_the_period() -> None:
    at_start = prorate_plan_change(FEB, FEB.start, STARTER, GROWTH, plan_credits_remaining=5000)
    assert figures(at_start) == (4900, 19900, 15000, 17000, 0, 22000)
    last_microsecond = prorate_plan_change(FEB, FEB.end - timedelta(microseconds=1), STARTER, GROWTH,
                                           plan_credits_remaining=10)
    assert last_microsecond.remaining_micros == 1
    assert figures(last_microsecond) == (0, 0, 0, 0, 0, 10)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="the same"):
        prorate_plan_change(FEB, FEB.start, GROWTH, GROWTH, plan_credits_remaining=0)
    with pytest.raises(ValueError, match="the same"):
        prorate_plan_change(FEB, FEB.start, None, None, plan_credits_remaining=0)
    with pytest.raises(ValueError, match="not in the period"):
        prorate_plan_change(FEB, FEB.end, GROWTH, SCALE, plan_credits_remaining=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        prorate_plan_change(FEB, datetime(2026, 2, 14), GROWTH, SCALE, plan_credits_remaining=0)
    with pytest.raises(ValueError, match="cannot be negative"):
        prorate_plan_change(FEB, FEB.start, GROWTH, SCALE, plan_credits_remaining=-1)
