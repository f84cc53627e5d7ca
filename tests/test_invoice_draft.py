"""Invoice drafting (pure): numbered lines, exact totals in cents, informational sections kept apart."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from creditflow.domain.invoices import (
    Adjustment,
    BillingDetails,
    ChannelUsage,
    InvoiceDraft,
    InvoiceInput,
    RecurringCharge,
    TaxRegistration,
    TopUpPaid,
    draft_invoice,
    invoice_number,
)
from creditflow.domain.periods import next_period, period_at
from creditflow.domain.plans import load_plan_catalog

ACCOUNT = "acc_3f2a9c1b4d5e6f708192a3b4c5d6e7f8"
ANCHOR = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
PERIOD = period_at(ANCHOR, 0)  # 2026-01-31T09:30Z -> 2026-02-28T09:30Z
GROWTH = load_plan_catalog().get("growth")
D = Decimal

BILL_TO = BillingDetails(company="Müller & Söhne GmbH", address_line1="Hauptstraße 5", address_line2="3. OG",
                         city="Berlin", postal_code="10115", region="Berlin", country="Germany",
                         po_number="PO-7781", billing_email="ap@mueller.example")
VAT = TaxRegistration(country="DE", description="European VAT number", value="DE123456789", status="verified")


def make(**overrides: Any) -> InvoiceInput:
    fields: dict[str, Any] = {
        "number": invoice_number(ACCOUNT, PERIOD), "account_id": ACCOUNT, "issued_at": PERIOD.end,
        "due_at": datetime(2026, 3, 14, 9, 30, tzinfo=UTC), "period": PERIOD, "seller_name": "Creditflow Inc.",
        "bill_to": BILL_TO, "tax_registrations": [VAT], "plan": GROWTH,
        "recurring_charges": [RecurringCharge(description="Phone number rental", quantity=3, unit="number",
                                              unit_price_credits=150)],
        "overage_credits": "1234.5",
        "usage": [ChannelUsage(channel="voice", unit="minute", quantity="2750.5", credits="22004"),
                  ChannelUsage(channel="chat", unit="message", quantity=1800, credits="1440"),
                  ChannelUsage(channel="llm", unit="token", quantity=24505, credits="2450.5")],
        "top_ups": [TopUpPaid(paid_at=datetime(2026, 2, 3, 12, tzinfo=UTC), description="Top-up of $50.00",
                              amount_cents=5000, credits=5000),
                    TopUpPaid(paid_at=datetime(2026, 2, 20, tzinfo=UTC), description="Auto-recharge",
                              amount_cents=2000, credits=2000)],
    }
    fields.update(overrides)
    return InvoiceInput(**fields)


def rows(draft: InvoiceDraft) -> list[tuple[object, ...]]:
    return [(line.number, line.kind, line.description, line.quantity, line.unit, line.unit_price_usd,
             line.amount_cents) for line in draft.lines]


def test_invoice_number_is_derived_from_the_account_and_period() -> None:
    assert invoice_number(ACCOUNT, PERIOD) == "CF-3F2A9C1B4D5E-20260131"
    assert invoice_number(ACCOUNT, next_period(PERIOD)) == "CF-3F2A9C1B4D5E-20260228"
    with pytest.raises(ValueError, match="not an account id"):
        invoice_number("acc_XYZ", PERIOD)


def test_full_invoice_exact_totals() -> None:
    draft = draft_invoice(make())
    assert rows(draft) == [
        (1, "subscription", "Growth plan, 2026-01-31 to 2026-02-28", D(1), "month", D("199.00"), 19900),
        (2, "recurring", "Phone number rental", D(3), "number", D("1.50"), 450),
        (3, "overage", "Overage drawn on the credit line", D("1234.5"), "credit", D("0.01"), 1235),  # half-up
    ]
    assert (draft.subtotal_cents, draft.total_due_cents, draft.credit_carried_forward_cents) == (21585, 21585, 0)
    assert (draft.number, draft.period_key, draft.currency) == ("CF-3F2A9C1B4D5E-20260131", "2026-01-31", "USD")
    assert (draft.period_start, draft.period_end) == (PERIOD.start, PERIOD.end)
    assert (draft.plan_id, draft.plan_name, draft.seller_name) == ("growth", "Growth", "Creditflow Inc.")
    assert draft.bill_to.address_block() == ["Müller & Söhne GmbH", "Hauptstraße 5", "3. OG", "10115 Berlin",
                                             "Berlin", "Germany"]
    assert draft.tax_registrations == (VAT,)
    # Informational: never part of the amount due.
    assert draft.usage_total_credits == D("25894.5")
    assert [(u.channel, u.quantity, u.credits) for u in draft.usage] == [
        ("voice", D("2750.5"), D(22004)), ("chat", D(1800), D(1440)), ("llm", D(24505), D("2450.5"))]
    assert draft.top_ups_total_cents == 7000
    assert all(type(line.amount_cents) is int for line in draft.lines)
    assert type(draft.total_due_cents) is int


def test_wallet_only_account_with_usage_and_top_ups_owes_nothing() -> None:
    draft = draft_invoice(make(plan=None, recurring_charges=[], overage_credits=0))
    assert rows(draft) == []
    assert (draft.subtotal_cents, draft.total_due_cents, draft.plan_id) == (0, 0, None)
    assert (draft.usage_total_credits, draft.top_ups_total_cents) == (D("25894.5"), 7000)


def test_sub_cent_unit_prices_round_once_per_line() -> None:
    draft = draft_invoice(make(plan=None, overage_credits="0.5", recurring_charges=[
        RecurringCharge(description="SMS sender id", quantity=7, unit="id", unit_price_credits="0.35"),
        RecurringCharge(description="Recording storage", quantity=1000, unit="GB", unit_price_credits="0.001"),
        RecurringCharge(description="Phone number rental", quantity=2, unit="number", unit_price_credits="150.5"),
    ]))
    assert [(r[3], r[5], r[6]) for r in rows(draft)] == [
        (D(7), D("0.0035"), 2),  # 2.45 credits -> 2 cents
        (D(1000), D("0.00001"), 1),  # 1 credit
        (D(2), D("1.505"), 301),
        (D("0.5"), D("0.01"), 1),  # half a credit of overage -> 1 cent
    ]
    assert (draft.subtotal_cents, draft.total_due_cents) == (305, 305)


def test_prorated_fee_billed_in_advance_and_a_credit_carried_forward() -> None:
    following = next_period(PERIOD)
    draft = draft_invoice(make(
        plan=load_plan_catalog().get("starter"), subscription_fee_cents=1633, subscription_period=following,
        recurring_charges=[], overage_credits=0,
        adjustments=[Adjustment(description="Proration credit: Scale to Starter", amount_cents=-15000)]))
    assert rows(draft) == [
        (1, "subscription", "Starter plan, 2026-02-28 to 2026-03-31", D(1), "month", D("16.33"), 1633),
        (2, "adjustment", "Proration credit: Scale to Starter", D(1), "", D("-150.00"), -15000),
    ]
    assert (draft.subtotal_cents, draft.total_due_cents, draft.credit_carried_forward_cents) == (-13367, 0, 13367)


def test_the_draft_round_trips_through_json_exactly() -> None:
    draft = draft_invoice(make())
    assert InvoiceDraft.model_validate_json(draft.model_dump_json()) == draft


@pytest.mark.parametrize(("overrides", "message"), [
    ({"due_at": datetime(2026, 2, 1, tzinfo=UTC)}, "the due date is before the issue date"),
    ({"plan": None}, None),  # fine on its own
    ({"plan": None, "subscription_fee_cents": 100}, "a subscription fee needs a plan"),
    ({"overage_credits": "0.0000001"}, "finer than one micro-credit"),
    ({"overage_credits": -1}, "overage_credits cannot be negative"),
    ({"overage_credits": 12.5}, "not floats/booleans"),
    ({"issued_at": datetime(2026, 2, 28)}, "timezone-aware"),  # naive on purpose
    ({"subscription_fee_cents": -1}, "greater than or equal to 0"),
])
def test_refused_inputs(overrides: dict[str, Any], message: str | None) -> None:
    if message is None:
        make(**overrides)
        return
    with pytest.raises(ValidationError, match=message):
        make(**overrides)


def test_refused_parts() -> None:
    with pytest.raises(ValidationError, match="not floats/booleans"):
        RecurringCharge(description="x", quantity=1, unit_price_credits=1.5)
    with pytest.raises(ValidationError, match="greater than 0"):
        RecurringCharge(description="x", quantity=0, unit_price_credits=1)
    with pytest.raises(ValidationError, match="non-zero"):
        Adjustment(description="x", amount_cents=0)
    with pytest.raises(ValidationError, match="Input should be 'verified' or 'unverified'"):
        TaxRegistration(country="DE", description="European VAT number", value="DE1", status="pending")
    with pytest.raises(ValidationError, match="usage cannot be negative"):
        ChannelUsage(channel="voice", quantity=-1, credits=0)


def test_credit_carried_forward_is_applied_to_the_next_invoice() -> None:
    """The credit a negative invoice carries forward is the next invoice's "Applied credit
    balance" (at most what that invoice comes to); what is left is carried again."""
    starter = load_plan_catalog().get("starter")
    draft = draft_invoice(make(plan=starter, recurring_charges=[], overage_credits=0, credit_balance_cents=13367))
    assert rows(draft) == [
        (1, "subscription", "Starter plan, 2026-01-31 to 2026-02-28", D(1), "month", D("49.00"), 4900),
        (2, "credit", "Applied credit balance", D(1), "", D("-49.00"), -4900),
    ]
    assert (draft.subtotal_cents, draft.total_due_cents, draft.credit_carried_forward_cents,
            draft.credit_applied_cents, draft.credit_added_cents) == (0, 0, 8467, 4900, 0)
    small = draft_invoice(make(plan=starter, recurring_charges=[], overage_credits=0, credit_balance_cents=200))
    assert (small.subtotal_cents, small.total_due_cents, small.credit_carried_forward_cents,
            small.credit_applied_cents) == (4700, 4700, 0, 200)
