"""Paying an invoice: the charge goes through the top-up machinery (kind ``invoice``), settling happens here.

Why reuse ``creditflow.payments.topups``: its ``stripe_charges`` row, written before Stripe is called and
holding the PaymentIntent id, is what makes a charge happen once even though localstripe ignores idempotency
keys. An invoice charge buys no credits (``credits`` 0); its request id is the invoice id for the first attempt
and ``{invoice id}:{n}`` for retry ``n``, so every attempt has its own row and a retry after a decline resolves
the customer's *current* default card.

:func:`settle` is the step after Stripe said ``succeeded`` (or nothing was due), safe to repeat:

1. the PaymentIntent is read back from Stripe and must have succeeded for the invoice's amount;
2. overage drawn on the credit line and billed by this invoice is restored to the wallet (journal
   ``overage_repayment`` against ``system:payments_clearing``, keyed ``sys:invoice:{invoice id}``, so it lands
   once; its lot keeps only what ends above zero, as for any grant after a negative balance);
3. the charge row is marked ``succeeded`` (with the repayment transaction, if any) and the invoice ``paid``.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource
from creditflow.errors import CreditflowError
from creditflow.invoicing import store
from creditflow.invoicing.store import InvoiceRecord
from creditflow.ledger import postings
from creditflow.payments import topups
from creditflow.payments.gateway import StripeGateway

KIND_INVOICE = topups.KIND_INVOICE
REPAYMENT_TYPE = "overage_repayment"


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
        metadata: dict[str, Any] = {"invoice_id": invoice.id, "invoice_number": invoice.number}
        if payment_intent_id:
            metadata["payment_intent_id"] = payment_intent_id
        result = await postings.post(
            pool, account_id=invoice.account_id, type=REPAYMENT_TYPE, amount_micros=invoice.overage_micros,
            counter_book=topups.PURCHASE_BOOK, description=f"Overage billed on invoice {invoice.number}, paid",
            idempotency_key=f"sys:invoice:{invoice.id}", metadata=metadata, lot_source=LotSource.ADJUSTMENT)
        repayment = result.transaction_id
    if charge_id is not None:
        async with pool.connection() as conn:
            await conn.execute(
                "UPDATE stripe_charges SET status = 'succeeded', ledger_txn_id = %s, failure_code = NULL,"
                " decline_code = NULL, failure_message = NULL, updated_at = now() WHERE id = %s",
                (repayment, charge_id))
    return await store.mark_paid(pool, invoice_id, charge_id=charge_id, payment_intent_id=payment_intent_id,
                                 repayment_txn_id=repayment, attempts=attempts)
