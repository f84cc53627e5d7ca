"""Pure domain rules: exact money and the burn order of credit lots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditflow.domain.lots import Lot, LotSource, plan_burn
from creditflow.domain.money import (
    AmountError,
    credits_to_micros,
    micros_to_credits,
    usage_charge_micros,
    usd_to_credits,
    validate_quantity,
    validate_rate,
    validate_whole_credits,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_tokens_at_a_tenth_of_a_credit_are_exact() -> None:
    assert usage_charge_micros(Decimal(2450), Decimal("0.1")) == 245 * 1_000_000
    assert micros_to_credits(usage_charge_micros(Decimal(5), Decimal("0.1"))) == Decimal("0.5")


def test_rounding_is_half_up_to_the_micro_credit() -> None:
    assert usage_charge_micros(Decimal("0.0000005"), Decimal(1)) == 1
    assert usage_charge_micros(Decimal("0.0000004"), Decimal(1)) == 0
    assert usage_charge_micros(Decimal("0.333333"), Decimal("0.000003")) == 1


def test_conversions() -> None:
    assert usd_to_credits(Decimal("10")) == 1000
    assert usd_to_credits("5.01") == 501
    with pytest.raises(AmountError):
        usd_to_credits("5.001")
    assert credits_to_micros(Decimal("0.000001")) == 1
    with pytest.raises(AmountError):
        credits_to_micros(Decimal("0.0000001"))
    assert micros_to_credits(5_000_000_000) == Decimal(5000)
    assert str(micros_to_credits(5_000_000_000)) == "5000"


@pytest.mark.parametrize("bad", [0, -1, "1e10", "0.0000001", True, 1.5, "nan", "inf", "x"])
def test_bad_quantities_are_refused(bad: object) -> None:
    with pytest.raises(AmountError):
        validate_quantity(bad, integer_only=False)


def test_whole_unit_features_refuse_fractions() -> None:
    assert validate_quantity("2.5", integer_only=False) == Decimal("2.5")
    with pytest.raises(AmountError):
        validate_quantity("2.5", integer_only=True)


def test_rates_and_manual_amounts() -> None:
    assert validate_rate("0.1") == Decimal("0.1")
    for bad in ("-1", "0.0000001", 10**7):
        with pytest.raises(AmountError):
            validate_rate(bad)
    assert validate_whole_credits(-300, allow_negative=True) == -300
    for bad in (0, "1.5", -1, 10**10):
        with pytest.raises(AmountError):
            validate_whole_credits(bad)


def lot(id: str, source: LotSource, remaining: int, age_days: int = 0, expires_in: int | None = None) -> Lot:
    created = T0 + timedelta(days=age_days)
    return Lot(id=id, source=source, remaining_micros=remaining, created_at=created,
               expires_at=None if expires_in is None else T0 + timedelta(days=expires_in))


def test_burn_order_plan_then_promotional_then_purchased() -> None:
    lots = [
        lot("purchase", LotSource.PURCHASE, 500, age_days=0),
        lot("bonus", LotSource.WELCOME_BONUS, 100, age_days=5),
        lot("plan", LotSource.PLAN, 200, age_days=9, expires_in=30),
    ]
    takes, uncovered = plan_burn(lots, 450)
    assert takes == [("plan", 200), ("bonus", 100), ("purchase", 150)] and uncovered == 0


def test_earliest_expiry_first_then_oldest_and_overage_remainder() -> None:
    lots = [
        lot("no-expiry-old", LotSource.PROMOTIONAL, 10, age_days=0),
        lot("late", LotSource.PROMOTIONAL, 10, age_days=1, expires_in=60),
        lot("soon", LotSource.PROMOTIONAL, 10, age_days=2, expires_in=10),
        lot("no-expiry-new", LotSource.PROMOTIONAL, 10, age_days=3),
    ]
    takes, uncovered = plan_burn(lots, 45)
    assert [t[0] for t in takes] == ["soon", "late", "no-expiry-old", "no-expiry-new"]
    assert uncovered == 5


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=8), st.integers(min_value=0, max_value=10**7))
def test_burn_never_takes_more_than_asked_or_held(remaining: list[int], amount: int) -> None:
    lots = [lot(f"l{i}", LotSource.PURCHASE, r, age_days=i) for i, r in enumerate(remaining)]
    takes, uncovered = plan_burn(lots, amount)
    assert sum(t for _, t in takes) + uncovered == amount
    assert uncovered == max(0, amount - sum(remaining))
    held = {f"l{i}": r for i, r in enumerate(remaining)}
    assert all(0 < t <= held[i] for i, t in takes)
