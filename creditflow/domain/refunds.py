"""Refund eligibility (pure): which credits of a top-up may be refunded, and for how much money.

Why pure: the rules are the product's promise to customers (seeds: "within 30 days of purchase for unused
credits"; billing errors and duplicate charges), so they are decided in one place, unit-tested, and the
workflow's activity only gathers the facts. The ledger re-checks the lot's remaining credits under the
account lock when it reserves them, so a race between two refunds can never over-refund.

Rules:
* only purchased credits (a top-up's lot); bonus, plan, promotional credits are ``not_refundable``;
* within 30 days of the purchase (``refund_window_expired``);
* whole credits, at most what remains of that purchase's lot (``refund_exceeds_remaining``); default: every whole
  credit that remains, a package's bonus credits included (they leave with the purchase they came with);
* priced by the lot's own proportion (``creditflow.domain.lots``): the money refunded is
  floor(credits * paid_cents / credits bought), rounded DOWN, against the refund; so 1,200 credits bought for $10
  give back $10 only all together, 600 of them $5, 7 of them $0.05 (5.83 cents), 1 of them nothing (refused:
  ``refund_exceeds_remaining``, worth less than a cent). Credits derived from money (disputes, refunds made on
  Stripe) are rounded UP. A sub-credit rest of the lot (left by fractional usage) stays, with its money;
* never more money than was paid less what is already refunded or being refunded (an explicit number of credits
  worth more is ``refund_exceeds_remaining``; "everything" is capped at that money);
* ``requested_by_customer`` (default) for anyone allowed to refund; ``duplicate_charge`` and
  ``billing_error`` for admins only (``forbidden``). They follow the same limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from creditflow.domain.lots import REFUNDABLE_SOURCES, LotSource, cents_for_micros
from creditflow.domain.money import MICROS_PER_CREDIT

REFUND_WINDOW = timedelta(days=30)


class RefundReason(StrEnum):
    REQUESTED_BY_CUSTOMER = "requested_by_customer"
    DUPLICATE_CHARGE = "duplicate_charge"
    BILLING_ERROR = "billing_error"


ADMIN_ONLY_REASONS = frozenset({RefundReason.DUPLICATE_CHARGE, RefundReason.BILLING_ERROR})


class RefundError(Exception):
    """A refusal with a stable code (``refund_window_expired``, ``refund_exceeds_remaining``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PurchaseFacts:
    """What is known about the purchase a refund names, read from the ledger and the charge row."""

    source: LotSource
    purchased_at: datetime
    paid_cents: int
    remaining_micros: int
    # The credits the payment bought (the lot's original size, a package's bonus included): the lot's price.
    original_micros: int
    # Cents of this purchase already refunded or being refunded (failed refunds excluded).
    refunded_cents: int = 0


@dataclass(frozen=True)
class RefundQuote:
    credits: int
    amount_cents: int

    @property
    def amount_micros(self) -> int:
        return self.credits * MICROS_PER_CREDIT


def parse_reason(value: str | None, *, is_admin: bool) -> RefundReason:
    """The reason, defaulting to ``requested_by_customer``; admin-only reasons refused to account keys."""
    try:
        reason = RefundReason(value or RefundReason.REQUESTED_BY_CUSTOMER)
    except ValueError:
        raise RefundError("validation_error",
                          f"reason must be one of {', '.join(r.value for r in RefundReason)}") from None
    if reason in ADMIN_ONLY_REASONS and not is_admin:
        raise RefundError("forbidden", f"reason {reason.value} is for administrators only")
    return reason


def check_credits(credits: object) -> int | None:
    """Whole credits > 0, or None (everything that remains). Booleans and fractions are refused."""
    if credits is None:
        return None
    if isinstance(credits, bool) or not isinstance(credits, int) or credits <= 0:
        raise RefundError("invalid_amount", "credits must be a whole number of credits above zero")
    return credits


def quote_refund(purchase: PurchaseFacts, *, credits: int | None, now: datetime) -> RefundQuote:
    """How many credits (and cents) this refund takes, or a ``RefundError``."""
    if purchase.source not in REFUNDABLE_SOURCES:
        raise RefundError("not_refundable", f"{purchase.source.value} credits are not refundable")
    if now - purchase.purchased_at > REFUND_WINDOW:
        raise RefundError("refund_window_expired", "refunds are possible within 30 days of purchase")
    credits = check_credits(credits)
    remaining = purchase.remaining_micros // MICROS_PER_CREDIT
    cents_left = purchase.paid_cents - purchase.refunded_cents
    wanted = remaining if credits is None else credits
    if wanted <= 0 or wanted > remaining or cents_left <= 0:
        refundable = remaining if cents_left > 0 else 0
        raise RefundError("refund_exceeds_remaining",
                          f"at most {refundable:,} credits of this purchase can be refunded")
    cents = cents_for_micros(wanted * MICROS_PER_CREDIT, paid_cents=purchase.paid_cents,
                             original_micros=purchase.original_micros)
    if cents > cents_left:
        if credits is not None:
            raise RefundError("refund_exceeds_remaining", "this purchase's money is already refunded")
        cents = cents_left  # everything that remains, for what is left of the money
    if cents <= 0:
        raise RefundError("refund_exceeds_remaining", f"{wanted:,} credits of this purchase are worth less than a cent")
    return RefundQuote(credits=wanted, amount_cents=cents)
