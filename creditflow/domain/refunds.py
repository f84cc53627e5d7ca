"""Refund eligibility (pure): which credits of a top-up may be refunded, and for how much money.

Why pure: the rules are the product's promise to customers (seeds: "within 30 days of purchase for unused
credits"; billing errors and duplicate charges), so they are decided in one place, unit-tested, and the
workflow's activity only gathers the facts. The ledger re-checks the lot's remaining credits under the
account lock when it reserves them, so a race between two refunds can never over-refund.

Rules:
* only purchased credits (a top-up's lot); bonus, plan, promotional credits are ``not_refundable``;
* within 30 days of the purchase (``refund_window_expired``);
* whole credits, at most what remains of that purchase's lot and at most what was paid less what is already
  refunded or being refunded (``refund_exceeds_remaining``); default: every whole credit that remains;
* 1 credit = 1 cent, so the money refunded is the number of credits in cents;
* ``requested_by_customer`` (default) for anyone allowed to refund; ``duplicate_charge`` and
  ``billing_error`` for admins only (``forbidden``). They follow the same limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from creditflow.domain.lots import REFUNDABLE_SOURCES, LotSource
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
    refundable = min(remaining, purchase.paid_cents - purchase.refunded_cents)  # 1 credit = 1 cent
    wanted = refundable if credits is None else credits
    if wanted <= 0 or wanted > refundable:
        raise RefundError("refund_exceeds_remaining",
                          f"at most {max(refundable, 0):,} credits of this purchase can be refunded")
    return RefundQuote(credits=wanted, amount_cents=wanted)
