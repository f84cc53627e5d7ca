"""Refund eligibility rules (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from creditflow.domain.lots import LotSource
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
