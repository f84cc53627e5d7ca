"""Invoice drafting, pure: from a period's facts to numbered lines and a total due in whole US cents.

What is billed (adds to the amount due), in this order:

1. the plan's **subscription fee** (the plan's monthly fee unless the caller states another amount,
   e.g. a prorated one) for ``subscription_period`` (the invoice period unless the caller bills in
   advance and passes the next one);
2. **recurring charges** such as phone-number rentals: ``quantity x unit price`` (unit prices in
   credits, exact; 1 credit = 1 cent);
3. **overage drawn on the credit line**: the credits the balance went below zero and that no earlier
   invoice billed, in whole credits (:func:`billable_overage_micros`), billed 1 credit = 1 cent;
4. **adjustments** (e.g. a proration credit for a downgrade, negative);
5. the **applied credit balance** (negative): money credit carried from earlier invoices, at most what the lines
   above come to.

Every line's amount is rounded once, from micro-credits to whole cents, half-up, by
:func:`creditflow.domain.money.micros_to_cents`; the subtotal is the exact sum of the line amounts.
No tax is computed here: tax registrations are printed as given. A negative subtotal is not a
payment to the customer: the total due is then 0 and the rest is a money credit carried to the next invoice
(``credit_added_cents``), which applies it as its "Applied credit balance" line (``credit_applied_cents``);
``credit_carried_forward_cents`` is the credit balance left after this invoice (the account's balance is the sum
of what its invoices added less what they applied: ``creditflow.invoicing.store``).

What is informational (never added to the amount due): the **usage summary per channel** (paid with
credits as it happened) and the **top-ups paid during the period** (already paid through Stripe).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from creditflow.domain.money import (
    MAX_CREDITS,
    MICROS_PER_CREDIT,
    AmountError,
    credits_to_micros,
    micros_to_cents,
    micros_to_credits,
    to_decimal,
    usage_charge_micros,
    validate_rate,
)
from creditflow.domain.periods import Period, as_utc, period_key
from creditflow.domain.plans import Plan

CURRENCY = "USD"
CENT_IN_USD = Decimal("0.01")


def _exact(value: object, what: str) -> Decimal:
    try:
        amount = to_decimal(value)
        credits_to_micros(amount)  # at most 6 decimals
    except AmountError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if amount < 0:
        raise ValueError(f"{what} cannot be negative")
    if amount > MAX_CREDITS:
        raise ValueError(f"{what} is too large")
    return amount


def billable_overage_micros(drawn_micros: int, open_micros: int) -> int:
    """What a period's close bills of the credit line drawn: the part no earlier invoice billed (``open_micros`` is
    what earlier invoices billed and the line still carries), **rounded down to whole credits** (cents). This is
    the one rounding of overage: the invoice bills exactly this and its payment restores at most this, so a
    fraction of a credit is never billed $0 and credited back; it stays drawn and is billed with a later period's
    overage once it adds up to a credit (or is repaid by the next credits that reach the wallet)."""
    unbilled = max(0, drawn_micros - max(0, open_micros))
    return unbilled - unbilled % MICROS_PER_CREDIT


def invoice_number(account_id: str, period: Period) -> str:
    """``CF-<first 12 hex digits of the account id>-<period start YYYYMMDD>``: ``CF-3F2A9C1B4D5E-20260131``.

    Derived, not allocated, so a retried invoice workflow always gets the same number with no
    counter to keep; 48 bits of the account id plus the date make a clash practically impossible
    (the store still keeps a unique index on it)."""
    _, _, suffix = account_id.partition("_")
    if len(suffix) < 12 or any(c not in "0123456789abcdef" for c in suffix):
        raise ValueError(f"not an account id: {account_id!r}")
    return f"CF-{suffix[:12].upper()}-{period.start:%Y%m%d}"


class BillingDetails(BaseModel):
    """The account's invoice address and billing email, as the customer entered them."""

    model_config = ConfigDict(frozen=True)

    company: str = Field(default="", max_length=200)
    address_line1: str = Field(default="", max_length=200)
    address_line2: str = Field(default="", max_length=200)
    city: str = Field(default="", max_length=100)
    postal_code: str = Field(default="", max_length=20)
    region: str = Field(default="", max_length=100)
    country: str = Field(default="", max_length=100)
    po_number: str = Field(default="", max_length=100)
    billing_email: str = Field(default="", max_length=254)

    def address_block(self) -> list[str]:
        """Non-empty lines for the bill-to block: company, street, "postal code city", region, country."""
        city_line = " ".join(part for part in (self.postal_code, self.city) if part)
        return [line for line in (self.company, self.address_line1, self.address_line2, city_line, self.region,
                                  self.country) if line]


class TaxRegistrationStatus(StrEnum):
    VERIFIED = "verified"
    UNVERIFIED = "unverified"


class TaxRegistration(BaseModel):
    """A tax id of the customer (e.g. "European VAT number" DE123456789), printed on the invoice."""

    model_config = ConfigDict(frozen=True)

    country: str = Field(min_length=1, max_length=100)
    description: str = Field(min_length=1, max_length=100)
    value: str = Field(min_length=1, max_length=100)
    status: TaxRegistrationStatus = TaxRegistrationStatus.UNVERIFIED


class RecurringCharge(BaseModel):
    """A monthly charge configured on the account, e.g. 3 phone numbers at 150 credits each."""

    model_config = ConfigDict(frozen=True)

    description: str = Field(min_length=1, max_length=200)
    quantity: int = Field(gt=0, le=1_000_000)
    unit: str = Field(default="", max_length=50)
    unit_price_credits: Decimal

    @field_validator("unit_price_credits", mode="before")
    @classmethod
    def _rate(cls, value: object) -> Decimal:
        try:
            return validate_rate(value)
        except AmountError as exc:
            raise ValueError(str(exc)) from exc


class Adjustment(BaseModel):
    """A stated amount in cents, e.g. "Proration credit: Scale to Starter" (negative is a credit)."""

    model_config = ConfigDict(frozen=True)

    description: str = Field(min_length=1, max_length=200)
    amount_cents: int

    @field_validator("amount_cents")
    @classmethod
    def _bounded(cls, value: int) -> int:
        if value == 0 or abs(value) > MAX_CREDITS:
            raise ValueError("an adjustment is a non-zero amount of at most 1e9 cents")
        return value


class ChannelUsage(BaseModel):
    """Usage of one channel in the period: metered quantity and the credits it cost (exact)."""

    model_config = ConfigDict(frozen=True)

    channel: str = Field(min_length=1, max_length=50)
    unit: str = Field(default="", max_length=50)
    quantity: Decimal
    credits: Decimal

    @field_validator("quantity", "credits", mode="before")
    @classmethod
    def _exact(cls, value: object) -> Decimal:
        return _exact(value, "usage")


class TopUpPaid(BaseModel):
    """A top-up paid during the period (informational: it was charged when it happened)."""

    model_config = ConfigDict(frozen=True)

    paid_at: datetime
    description: str = Field(min_length=1, max_length=200)
    amount_cents: int = Field(gt=0)
    credits: int = Field(gt=0)

    @field_validator("paid_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value, "paid_at")


class InvoiceInput(BaseModel):
    """Everything an invoice is drafted from; gathered by the invoice workflow's activities."""

    model_config = ConfigDict(frozen=True)

    number: str = Field(min_length=1, max_length=64)
    account_id: str
    issued_at: datetime
    due_at: datetime
    period: Period
    seller_name: str = Field(min_length=1, max_length=200)
    bill_to: BillingDetails = Field(default_factory=BillingDetails)
    tax_registrations: tuple[TaxRegistration, ...] = ()
    plan: Plan | None = None
    subscription_fee_cents: int | None = Field(default=None, ge=0)
    subscription_period: Period | None = None
    recurring_charges: tuple[RecurringCharge, ...] = ()
    overage_credits: Decimal = Decimal(0)
    adjustments: tuple[Adjustment, ...] = ()
    usage: tuple[ChannelUsage, ...] = ()
    top_ups: tuple[TopUpPaid, ...] = ()
    credit_balance_cents: int = Field(default=0, ge=0)  # money credit carried from earlier invoices

    @field_validator("issued_at", "due_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)

    @field_validator("overage_credits", mode="before")
    @classmethod
    def _overage(cls, value: object) -> Decimal:
        return _exact(value, "overage_credits")

    @model_validator(mode="after")
    def _consistent(self) -> InvoiceInput:
        if self.due_at < self.issued_at:
            raise ValueError("the due date is before the issue date")
        if self.plan is None and (self.subscription_fee_cents is not None or self.subscription_period is not None):
            raise ValueError("a subscription fee needs a plan")
        return self


LineKind = Literal["subscription", "recurring", "overage", "adjustment", "credit"]


class InvoiceLine(BaseModel):
    """One billed line. ``unit_price_usd`` is exact (a 0.1-credit price is $0.001); the amount is whole cents."""

    model_config = ConfigDict(frozen=True)

    number: int
    kind: LineKind
    description: str
    quantity: Decimal
    unit: str
    unit_price_usd: Decimal
    amount_cents: int


class InvoiceDraft(BaseModel):
    """The drafted invoice: what the renderer prints and the workflow charges."""

    model_config = ConfigDict(frozen=True)

    number: str
    account_id: str
    currency: str = CURRENCY
    issued_at: datetime
    due_at: datetime
    period_key: str
    period_start: datetime
    period_end: datetime
    seller_name: str
    bill_to: BillingDetails
    tax_registrations: tuple[TaxRegistration, ...]
    plan_id: str | None
    plan_name: str | None
    lines: tuple[InvoiceLine, ...]
    subtotal_cents: int
    total_due_cents: int
    credit_carried_forward_cents: int
    usage: tuple[ChannelUsage, ...]
    credit_applied_cents: int = 0  # the credit balance this invoice used ("Applied credit balance" line)
    credit_added_cents: int = 0  # what a negative subtotal adds to the credit balance
    usage_total_credits: Decimal
    top_ups: tuple[TopUpPaid, ...]
    top_ups_total_cents: int


def _credits_to_usd(credits: Decimal) -> Decimal:
    """Exact: 150 credits -> 1.50 USD, 0.1 credit -> 0.001 USD (at least two decimals, for display)."""
    usd = credits * CENT_IN_USD
    return usd.quantize(CENT_IN_USD) if usd == usd.quantize(CENT_IN_USD) else usd.normalize()


def _cents_to_usd(cents: int) -> Decimal:
    return (Decimal(cents) * CENT_IN_USD).quantize(CENT_IN_USD)


def _period_label(period: Period) -> str:
    return f"{period.start:%Y-%m-%d} to {period.end:%Y-%m-%d}"


def draft_invoice(data: InvoiceInput) -> InvoiceDraft:
    """Number the billed lines, total them, and carry the informational sections through."""
    lines: list[InvoiceLine] = []

    def add(kind: LineKind, description: str, quantity: Decimal, unit: str, unit_price_usd: Decimal,
            amount_cents: int) -> None:
        lines.append(InvoiceLine(number=len(lines) + 1, kind=kind, description=description, quantity=quantity,
                                 unit=unit, unit_price_usd=unit_price_usd, amount_cents=amount_cents))

    if data.plan is not None:
        fee = data.plan.monthly_fee_cents if data.subscription_fee_cents is None else data.subscription_fee_cents
        covered = data.subscription_period or data.period
        add("subscription", f"{data.plan.name} plan, {_period_label(covered)}", Decimal(1), "month",
            _cents_to_usd(fee), fee)
    for charge in data.recurring_charges:
        quantity = Decimal(charge.quantity)
        amount = micros_to_cents(usage_charge_micros(quantity, charge.unit_price_credits))
        add("recurring", charge.description, quantity, charge.unit, _credits_to_usd(charge.unit_price_credits), amount)
    if data.overage_credits > 0:
        amount = micros_to_cents(credits_to_micros(data.overage_credits))
        add("overage", "Overage drawn on the credit line", data.overage_credits, "credit", CENT_IN_USD, amount)
    for adjustment in data.adjustments:
        add("adjustment", adjustment.description, Decimal(1), "", _cents_to_usd(adjustment.amount_cents),
            adjustment.amount_cents)

    billed = sum(line.amount_cents for line in lines)
    applied = min(data.credit_balance_cents, max(0, billed))
    if applied:
        add("credit", "Applied credit balance", Decimal(1), "", _cents_to_usd(-applied), -applied)
    subtotal = billed - applied
    added = max(0, -billed)
    usage_micros = sum(credits_to_micros(item.credits) for item in data.usage)
    return InvoiceDraft(
        number=data.number, account_id=data.account_id, issued_at=data.issued_at, due_at=data.due_at,
        period_key=period_key(data.period), period_start=data.period.start, period_end=data.period.end,
        seller_name=data.seller_name, bill_to=data.bill_to, tax_registrations=data.tax_registrations,
        plan_id=data.plan.id if data.plan else None, plan_name=data.plan.name if data.plan else None,
        lines=tuple(lines), subtotal_cents=subtotal, total_due_cents=max(0, subtotal),
        credit_carried_forward_cents=data.credit_balance_cents - applied + added, credit_applied_cents=applied,
        credit_added_cents=added, usage=data.usage,
        usage_total_credits=micros_to_credits(usage_micros),
        top_ups=data.top_ups, top_ups_total_cents=sum(t.amount_cents for t in data.top_ups))
