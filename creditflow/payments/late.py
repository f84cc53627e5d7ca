"""One path for a payment Stripe says succeeded after creditflow recorded it failed or gave up on it.

It happens when the workflow that owned the charge stopped before the outcome was known: Stripe unreachable for the
whole retry budget (the PaymentIntent may even have been created with its answer lost, so the row has no
PaymentIntent id), or a PaymentIntent still ``processing`` when a top-up's payment window closed. Stripe's
``payment_intent.succeeded`` is then routed (webhook -> outbox -> account workflow, activity ``credit_late_payment``)
here, for every kind of ``stripe_charges`` row:

1. the PaymentIntent is read back from Stripe (the event alone is never trusted) and must be this charge's:
   creditflow's charge id in its metadata, the charge's amount, ``succeeded``; it is recorded on the row if the row
   had none (a row that names another PaymentIntent is refused: the known gap of two PaymentIntents, for an
   operator);
2. top-ups and auto-recharges are credited with the same ledger key as the normal path
   (``sys:topup:{payment_intent_id}``), so a late credit and a normal one can never both land; the row becomes
   ``succeeded`` and a replay of the request reports the success;
3. invoice payments settle their invoice through ``creditflow.invoicing.payment.settle`` (checked with Stripe,
   overage restored once, invoice ``paid``). If the invoice was already paid by another charge, nothing is done
   and the result says so (the customer paid twice: refund one by hand).
"""

from __future__ import annotations

import logging

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.invoicing import payment as invoice_payment
from creditflow.payments import topups
from creditflow.payments.gateway import StripeGateway

log = logging.getLogger(__name__)

PAYMENT_SUCCEEDED_LATE = topups.PAYMENT_SUCCEEDED_LATE


class LateSettlement(BaseModel):
    """What the late path did: credited now (or it was already), an invoice paid, or Stripe disagrees."""

    charge_id: str
    kind: str = topups.KIND_AUTO_RECHARGE  # the default: results recorded when only auto-recharges took this path
    request_id: str = ""
    payment_intent_id: str | None = None
    payment_intent_status: str | None = None
    credited: bool = False  # a ledger credit (or invoice settlement) was made now, not replayed
    transaction_id: str | None = None
    credits: int = 0
    amount_cents: int = 0
    invoice_id: str | None = None
    note: str | None = None


def _invoice_id(request_id: str) -> str:
    """Invoice charge rows carry the invoice id as request id (``{invoice id}:{n}`` for a retry)."""
    return request_id.split(":", 1)[0]


async def settle_late(pool: AsyncConnectionPool, gateway: StripeGateway, account_id: str, charge_id: str,
                      payment_intent_id: str | None) -> LateSettlement:
    """Check ``payment_intent_id`` with Stripe and settle the charge ``charge_id`` once (see the module docstring)."""
    record = await topups.get_charge(pool, charge_id)
    if record.account_id != account_id:
        raise CreditflowError("not_found", f"no charge {charge_id} on this account")
    pi_id = record.payment_intent_id or payment_intent_id
    if not pi_id:
        raise CreditflowError("not_found", f"charge {charge_id} has no PaymentIntent")
    if payment_intent_id and record.payment_intent_id and payment_intent_id != record.payment_intent_id:
        raise CreditflowError("payment_intent_mismatch", f"charge {charge_id} records PaymentIntent "
                              f"{record.payment_intent_id}, not {payment_intent_id}; reconcile by hand")
    pi = await gateway.retrieve_payment_intent(pi_id)
    result = LateSettlement(charge_id=charge_id, kind=record.kind, request_id=record.request_id,
                            payment_intent_id=pi.id, payment_intent_status=pi.status,
                            amount_cents=record.amount_cents)
    ours = pi.id == record.payment_intent_id or pi.metadata.get(topups.CHARGE_METADATA_KEY) == record.id
    if not ours or pi.amount_cents != record.amount_cents:
        raise CreditflowError("payment_intent_mismatch", f"PaymentIntent {pi.id} is not charge {charge_id}'s "
                              f"({pi.amount_cents} cents, charge {pi.metadata.get(topups.CHARGE_METADATA_KEY)})")
    if pi.status != "succeeded":
        return result
    if record.payment_intent_id is None:  # the answer was lost: the PaymentIntent is recorded now
        async with pool.connection() as conn:
            await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s, updated_at = now()"
                               " WHERE id = %s AND payment_intent_id IS NULL", (pi.id, charge_id))
    if record.kind == topups.KIND_INVOICE:
        invoice_id = _invoice_id(record.request_id)
        invoice = await invoice_payment.settle(pool, gateway, invoice_id, charge_id=charge_id)
        result.invoice_id = invoice_id
        if invoice.charge_id != charge_id:
            log.error("invoice %s was paid by charge %s; charge %s (PaymentIntent %s) succeeded too: refund one",
                      invoice_id, invoice.charge_id, charge_id, pi.id)
            result.note = "invoice_already_paid"
            return result
        result.credited = record.status != "succeeded"
        result.transaction_id = invoice.repayment_txn_id
        return result
    credit = await topups.credit(pool, charge_id)
    result.credited = not credit.replayed
    result.transaction_id, result.credits = credit.transaction_id, credit.credits
    return result
