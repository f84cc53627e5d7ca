"""Paying an invoice: the charge goes through the top-up machinery (kind ``invoice``), settling happens here.

Why reuse ``creditflow.payments.topups``: its ``stripe_charges`` row, written before Stripe is called and
holding the PaymentIntent id, is what makes a charge happen once even though localstripe ignores idempotency
keys. An invoice charge buys no credits (``credits`` 0); its request id is the invoice id for the first attempt
and ``{invoice id}:{n}`` for retry ``n``, so every attempt has its own row and a retry after a decline resolves
the customer's *current* default card.

:func:`settle` is the step after Stripe said ``succeeded`` (or nothing was due), safe to repeat:

1. the PaymentIntent is read back from Stripe and must have succeeded for the invoice's amount;
2. the overage this invoice billed that the credit line still carries is restored (journal ``overage_repayment``
   against ``system:payments_clearing``, keyed ``sys:invoice:{invoice id}``, so it lands once): what later credits
   (the next plan grant, a top-up) already repaid is not restored again, so the restoration never leaves credits
   above zero (:func:`restore_overage`, migration 0024);
3. the charge row is marked ``succeeded`` (with the repayment transaction, if any) and the invoice ``paid``.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.invoicing import store
from creditflow.invoicing.store import InvoiceRecord
from creditflow.ledger.models import txn_id
from creditflow.payments import topups
from creditflow.payments.gateway import StripeGateway

KIND_INVOICE = topups.KIND_INVOICE
REPAYMENT_TYPE = "overage_repayment"
# PaymentIntent states that can still turn into a payment and that Stripe lets us cancel.
_CANCELABLE = frozenset({"requires_payment_method", "requires_confirmation", "requires_action", "requires_capture"})


async def restore_overage(pool: AsyncConnectionPool, invoice: InvoiceRecord,
                          payment_intent_id: str | None) -> str | None:
    """Restore to the credit line what this invoice billed and the line still carries (migration 0024: what later
    credits, e.g. the next plan grant, already repaid is not restored again), once; the journal id, or None."""
    metadata: dict[str, Any] = {"invoice_id": invoice.id, "invoice_number": invoice.number}
    if payment_intent_id:
        metadata["payment_intent_id"] = payment_intent_id
    key = f"sys:invoice:{invoice.id}"
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_invoice_overage_restore(%s, %s, %s, %s, %s, %s)",
                           (invoice.account_id, invoice.period_key, invoice.overage_micros, key,
                            f"Overage billed on invoice {invoice.number}, paid", Jsonb(metadata)))
        row = await (await conn.execute("SELECT id FROM journal WHERE account_id = %s AND idempotency_key = %s",
                                        (invoice.account_id, key))).fetchone()
    return txn_id(row["id"]) if row else None


class EarlierCharges(BaseModel):
    """What the invoice's earlier charge attempts came to on Stripe, before another is made."""

    paid_charge_id: str | None = None  # an earlier attempt's PaymentIntent succeeded: settle with it
    in_flight: bool = False  # one is still processing (or could not be canceled): no new charge now


async def earlier_charges(pool: AsyncConnectionPool, gateway: StripeGateway, invoice_id: str) -> EarlierCharges:
    """Read every earlier charge attempt of the invoice back from Stripe before a new PaymentIntent is made.

    One that succeeded (late: its attempt was recorded as failed) pays the invoice; one that could still succeed
    (waiting for the customer, a card retry) is canceled first, and if it cannot be canceled (processing) no new
    charge is made now. So an invoice has at most one succeeded PaymentIntent whatever its attempts ended as."""
    invoice = await store.get(pool, invoice_id)
    async with pool.connection() as conn:
        charges = await (await conn.execute(
            "SELECT id, payment_intent_id FROM stripe_charges WHERE account_id = %s AND kind = %s"
            " AND (request_id = %s OR request_id LIKE %s) AND payment_intent_id IS NOT NULL ORDER BY created_at, id",
            (invoice.account_id, KIND_INVOICE, invoice_id, f"{invoice_id}:%"))).fetchall()
    result = EarlierCharges()
    for charge in charges:
        pi = await gateway.retrieve_payment_intent(charge["payment_intent_id"])
        if pi.status in _CANCELABLE:
            pi = await gateway.cancel_payment_intent(pi.id)  # returned as it is if it can no longer be canceled
        if pi.status == "succeeded" and pi.amount_cents == invoice.amount_due_cents:
            return EarlierCharges(paid_charge_id=charge["id"])
        if pi.status not in ("canceled", "succeeded"):
            result.in_flight = True
    return result


def charge_request_id(invoice_id: str, attempt: int) -> str:
    """``stripe_charges.request_id`` of charge attempt ``attempt`` (1-based) of an invoice."""
    return invoice_id if attempt <= 1 else f"{invoice_id}:{attempt}"


async def settle(pool: AsyncConnectionPool, gateway: StripeGateway, invoice_id: str, *, charge_id: str | None,
                 attempts: int | None = None) -> InvoiceRecord:
    """Mark the invoice paid (see the module docstring); a paid invoice is returned as it is."""
    invoice = await store.get(pool, invoice_id)
    if invoice.status == "paid":
        return invoice
    if invoice.status not in ("open", "past_due"):
        raise CreditflowError("invalid_transition", f"invoice {invoice_id} is {invoice.status}")
    payment_intent_id: str | None = None
    if charge_id is not None:
        record = await topups.get_charge(pool, charge_id)
        if (record.kind, record.account_id) != (KIND_INVOICE, invoice.account_id) or not (
                record.request_id == invoice_id or record.request_id.startswith(f"{invoice_id}:")):
            raise CreditflowError("not_found", f"charge {charge_id} is not a charge of invoice {invoice_id}")
        pi = await topups.refresh(pool, gateway, charge_id)
        if pi.status != "succeeded" or pi.amount_cents != invoice.amount_due_cents:
            raise CreditflowError("payment_not_settled",
                                  f"PaymentIntent {pi.id} is {pi.status} for {pi.amount_cents} cents")
        payment_intent_id = pi.id
    elif invoice.amount_due_cents > 0:
        raise CreditflowError("payment_required", f"invoice {invoice_id} has an amount due and no charge")
    repayment: str | None = None
    if invoice.overage_micros > 0:
        repayment = await restore_overage(pool, invoice, payment_intent_id)
    if charge_id is not None:
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE stripe_charges SET status = 'succeeded', ledger_txn_id = %s, failure_code = NULL,"
                " decline_code = NULL, failure_message = NULL, updated_at = now() WHERE id = %s",
                (repayment, charge_id))
    return await store.mark_paid(pool, invoice_id, charge_id=charge_id, payment_intent_id=payment_intent_id,
                                 repayment_txn_id=repayment, attempts=attempts)
