"""Charges as workflows see them: the kinds of ``stripe_charges`` rows, a PaymentIntent's state, an invoice charge's
request id. Pure (no I/O), so workflows import these without the Stripe gateway or the ledger."""

from __future__ import annotations

from pydantic import BaseModel

KIND_TOPUP = "topup"
KIND_AUTO_RECHARGE = "auto_recharge"
# An invoice payment (creditflow/invoicing/payment.py): buys no credits (``credits`` 0), settled by the invoice.
KIND_INVOICE = "invoice"


def charge_request_id(invoice_id: str, attempt: int) -> str:
    """``stripe_charges.request_id`` of charge attempt ``attempt`` (1-based) of an invoice."""
    return invoice_id if attempt <= 1 else f"{invoice_id}:{attempt}"


class PaymentIntentState(BaseModel):
    """What creditflow needs to know about a PaymentIntent. ``status`` is Stripe's (``succeeded``,
    ``processing``, ``requires_action``, ``requires_payment_method``, ``requires_confirmation``, ``canceled``...)."""

    id: str
    status: str
    amount_cents: int
    currency: str
    customer_id: str | None = None
    payment_method_id: str | None = None
    client_secret: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    metadata: dict[str, str] = {}
