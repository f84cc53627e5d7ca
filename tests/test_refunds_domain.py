"""Refund eligibility rules (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditflow.domain.lots import LotSource, cents_for_micros, micros_for_cents
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.refunds import PurchaseFacts, RefundError, RefundReason, parse_reason, quote_refund

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def facts(**kw: object) -> PurchaseFacts:
    base: dict[str, object] = {"source": LotSource.PURCHASE, "purchased_at": NOW - timedelta(days=1),
                               "paid_cents": 2500, "remaining_micros": 2500 * MICROS_PER_CREDIT,
                               "original_micros": 2500 * MICROS_PER_CREDIT}
    return PurchaseFacts(**{**base, **kw})  # type: ignore[arg-type]


def code_of(purchase: PurchaseFacts, credits: int | None, now: datetime = NOW) -> str:
    with pytest.raises(RefundError) as exc:
        quote_refund(purchase, credits=credits, now=now)
    return exc.value.code


def test_default_is_every_whole_credit_left() -> None:
    q = quote_refund(facts(remaining_micros=1234 * MICROS_PER_CREDIT + 500_000), credits=None, now=NOW)
    assert (q.credits, q.amount_cents, q.amount_micros) == (1234, 1234, 1234 * MICROS_PER_CREDIT)
    assert quote_refund(facts(), credits=1000, now=NOW).amount_cents == 1000


def test_refusals() -> None:
    assert code_of(facts(source=LotSource.WELCOME_BONUS), None) == "not_refundable"
    assert code_of(facts(source=LotSource.PLAN), 10) == "not_refundable"
    assert code_of(facts(), 10, NOW + timedelta(days=30)) == "refund_window_expired"
    assert quote_refund(facts(), credits=10, now=NOW + timedelta(days=29)).credits == 10
    assert code_of(facts(), 2501) == "refund_exceeds_remaining"
    assert code_of(facts(remaining_micros=0), None) == "refund_exceeds_remaining"
    assert code_of(facts(refunded_cents=2000), 600) == "refund_exceeds_remaining"  # never more than was paid
    assert code_of(facts(remaining_micros=999_999), None) == "refund_exceeds_remaining"
    for bad in (0, -5, True):
        assert code_of(facts(), bad) == "invalid_amount"  # type: ignore[arg-type]


def test_reasons() -> None:
    assert parse_reason(None, is_admin=False) is RefundReason.REQUESTED_BY_CUSTOMER
    assert parse_reason("billing_error", is_admin=True) is RefundReason.BILLING_ERROR
    for reason in ("duplicate_charge", "billing_error"):
        with pytest.raises(RefundError) as exc:
            parse_reason(reason, is_admin=False)
        assert exc.value.code == "forbidden"
    with pytest.raises(RefundError) as exc:
        parse_reason("outage", is_admin=True)
    assert exc.value.code == "validation_error"


# --- a lot's price (refunds and disputes take credits at it): properties over any purchase and any split ---

prices = st.tuples(st.integers(min_value=1, max_value=500_000),  # cents paid
                   st.integers(min_value=1, max_value=50_000_000).map(lambda c: c * MICROS_PER_CREDIT // 10))


def test_bonus_package_prices() -> None:
    """1,200 credits for 1,000 cents: the examples of docs/concepts.md."""
    price = {"paid_cents": 1000, "original_micros": 1200 * MICROS_PER_CREDIT}
    assert [cents_for_micros(c * MICROS_PER_CREDIT, **price) for c in (1200, 600, 7, 1)] == [1000, 500, 5, 0]
    assert micros_for_cents(500, **price) == 600 * MICROS_PER_CREDIT
    assert micros_for_cents(7, **price) == 8_400_000
    assert micros_for_cents(1, **price) == 1_200_000
    bonus = facts(paid_cents=1000, original_micros=1200 * MICROS_PER_CREDIT, remaining_micros=1200 * MICROS_PER_CREDIT)
    assert (quote_refund(bonus, credits=None, now=NOW).credits, quote_refund(bonus, credits=None, now=NOW).amount_cents
            ) == (1200, 1000)
    assert code_of(bonus, 1) == "refund_exceeds_remaining"  # worth less than a cent


@settings(max_examples=500, deadline=None)
@given(price=prices, cents=st.integers(min_value=0, max_value=500_000))
def test_credits_taken_for_money_are_worth_at_least_that_money(price: tuple[int, int], cents: int) -> None:
    """Rounding is against the customer both ways: the credits taken back for D cents (rounded up) are worth at least
    D cents (rounded down), and the money for some credits is never worth more than those credits."""
    paid, original = price
    cents = min(cents, paid)
    micros = micros_for_cents(cents, paid_cents=paid, original_micros=original)
    assert micros <= original
    assert micros * paid >= cents * original  # exact: the credits taken are worth at least the money
    assert cents_for_micros(micros, paid_cents=paid, original_micros=original) >= cents
    for m in (0, micros, original):
        assert cents_for_micros(m, paid_cents=paid, original_micros=original) * original <= m * paid


@settings(max_examples=300, deadline=None)
@given(price=prices, steps=st.lists(st.tuples(st.sampled_from(["refund", "refund_all", "use"]),
                                              st.integers(min_value=1, max_value=10**9)), max_size=12))
def test_no_split_of_refunds_returns_more_than_paid_or_leaves_credits_without_their_money(
        price: tuple[int, int], steps: list[tuple[str, int]]) -> None:
    """Any sequence of refunds (some credits, or everything left) and usage of one purchase: the money refunded never
    exceeds what was paid, and the money kept always covers the exact value of the credits that remain."""
    paid, original = price
    remaining, refunded = original, 0
    for action, amount in steps:
        if action == "use":
            remaining -= min(remaining, amount * 1000)
            continue
        lot = facts(paid_cents=paid, original_micros=original, remaining_micros=remaining, refunded_cents=refunded)
        credits = None if action == "refund_all" else 1 + amount % max(remaining // MICROS_PER_CREDIT, 1)
        try:
            q = quote_refund(lot, credits=credits, now=NOW)
        except RefundError as exc:
            assert exc.code == "refund_exceeds_remaining"
            continue
        assert q.amount_cents > 0 and q.amount_micros <= remaining
        remaining -= q.amount_micros
        refunded += q.amount_cents
        assert refunded <= paid
        assert (paid - refunded) * original >= remaining * paid  # the credits left keep their money
