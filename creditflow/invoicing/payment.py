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
3. the charge row is marked ``succeeded`` (with the repayment transaction, if any) and the invoice ``paid``;
   2 and 3 are one transaction that holds the invoice's row lock.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.charges import charge_request_id  # noqa: F401 - re-exported
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


async def restore_overage(conn: Any, invoice: InvoiceRecord, payment_intent_id: str | None) -> str | None:
    """Restore to the credit line what this invoice billed and the line still carries (migration 0024: what later
    credits, e.g. the next plan grant, already repaid is not restored again), once; the journal id, or None.
    Runs on the caller's connection, inside its transaction (see :func:`settle`)."""
    metadata: dict[str, Any] = {"invoice_id": invoice.id, "invoice_number": invoice.number}
    if payment_intent_id:
        metadata["payment_intent_id"] = payment_intent_id
    key = f"sys:invoice:{invoice.id}"
    await conn.execute("SELECT cf_invoice_overage_restore(%s, %s, %s, %s, %s, %s)",
                       (invoice.account_id, invoice.period_key, invoice.overage_micros, key,
                        f"Overage billed on invoice {invoice.number}, paid", Jsonb(metadata)))
    row = await (await conn.execute("SELECT id FROM cf_journal_entry(%s, %s)",
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
    # One transaction, the invoice row locked: the restoration, the charge row and the invoice's status are never
    # seen apart (a reader or `creditflow verify` between them would see a paid-back overage on an open invoice),
    # and of two concurrent settlements (the collection activity and a late webhook) the second finds it paid.
    async with pool.connection() as conn, conn.transaction():
        if not await store.lock_payable(conn, invoice_id):
            return await store.get(pool, invoice_id)
        repayment: str | None = None
        if invoice.overage_micros > 0:
            repayment = await restore_overage(conn, invoice, payment_intent_id)
        if charge_id is not None:
            await topups.mark_succeeded(conn, charge_id, repayment)
        await store.mark_paid(conn, invoice_id, charge_id=charge_id, payment_intent_id=payment_intent_id,
                              repayment_txn_id=repayment, attempts=attempts)
    return await store.get(pool, invoice_id)


# --- refunds and disputes of an invoice payment: they move its credit-line restoration (migration 0024_3) ---------


class InvoicePaymentEvent(BaseModel):
    """One refund or dispute outcome applied to an invoice: its credit-line restoration moved by ``moved_micros``."""

    key: str
    kind: str  # refund / dispute / dispute_won / dispute_lost
    stripe_id: str
    amount_cents: int
    moved_micros: int


async def invoice_paid_with(pool: AsyncConnectionPool, account_id: str, payment_intent_id: str) -> InvoiceRecord | None:
    """The account's invoice that this PaymentIntent paid, if any."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT id FROM invoices WHERE account_id = %s AND payment_intent_id = %s",
                                        (account_id, payment_intent_id))).fetchone()
    return await store.get(pool, row["id"]) if row else None


async def _restored_micros(conn: Any, invoice: InvoiceRecord) -> int:
    row = await (await conn.execute("SELECT amount_micros FROM cf_journal_entry(%s, %s)",
                                    (invoice.account_id, f"sys:invoice:{invoice.id}"))).fetchone()
    return int(row["amount_micros"]) if row else 0


async def _refunds_took(conn: Any, invoice: InvoiceRecord) -> int:
    """Micro-credits of the restoration the invoice's refunds took back so far."""
    row = await (await conn.execute("SELECT coalesce(sum(-moved_micros), 0) AS taken FROM invoice_payment_events"
                                    " WHERE invoice_id = %s AND kind = 'refund'", (invoice.id,))).fetchone()
    return int(row["taken"]) if row else 0


async def _apply_once(conn: Any, invoice: InvoiceRecord, kind: str, stripe_id: str, cents: int, micros: int,
                      key: str, description: str) -> InvoicePaymentEvent | None:
    """Record the event and move the restoration, in the caller's transaction; None if it was applied before."""
    inserted = await (await conn.execute(
        "INSERT INTO invoice_payment_events (invoice_id, stripe_id, kind, amount_cents, moved_micros)"
        " VALUES (%s, %s, %s, %s, 0) ON CONFLICT DO NOTHING RETURNING invoice_id",
        (invoice.id, stripe_id, kind, cents))).fetchone()
    if inserted is None:
        return None
    moved = 0
    if micros:
        row = await (await conn.execute(
            "SELECT cf_invoice_restoration_move(%s, %s, %s, %s, %s, %s) AS moved",
            (invoice.account_id, invoice.period_key, micros, key, description,
             Jsonb({"invoice_id": invoice.id, "invoice_number": invoice.number, "stripe_id": stripe_id,
                    "amount_cents": cents})))).fetchone()
        moved = int(row["moved"])
        await conn.execute("UPDATE invoice_payment_events SET moved_micros = %s WHERE invoice_id = %s"
                           " AND stripe_id = %s AND kind = %s", (moved, invoice.id, stripe_id, kind))
    return InvoicePaymentEvent(key=key, kind=kind, stripe_id=stripe_id, amount_cents=cents, moved_micros=moved)


async def apply_stripe_event(pool: AsyncConnectionPool, invoice: InvoiceRecord, kind: str,
                             refunds: list[tuple[str, int]],
                             dispute: dict[str, Any] | None) -> list[InvoicePaymentEvent]:
    """A refund or dispute of the payment of a paid invoice (``kind``: refund / dispute / dispute_closed).

    Rule: refunds add to ``refunded_cents`` (refunded in full: ``refunded``) and take back the credit-line
    restoration the payment made in the refund's proportion (rounded up, at most what was restored); a dispute
    makes the invoice ``disputed`` and takes back the disputed money's share of the restoration (all of it for the
    whole payment), less what refunds took already; closed ``won`` / ``warning_closed`` the
    invoice is ``paid`` again and the restoration is made again (at most what is still drawn); closed lost it stays
    ``disputed``. Reversals never go below the floor. Each refund id / dispute outcome applies once."""
    applied: list[InvoicePaymentEvent] = []
    paid = max(1, invoice.amount_due_cents)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (invoice.id,))
        restored = await _restored_micros(conn, invoice)
        if kind == "refund":
            for refund_id, cents in refunds:
                share = -(-restored * min(cents, paid) // paid)  # rounded up: against the refund
                event = await _apply_once(conn, invoice, "refund", refund_id, cents,
                                          -min(share, max(0, restored - await _refunds_took(conn, invoice))),
                                          f"sys:invoice_refund:{refund_id}",
                                          f"Refund {refund_id} of invoice {invoice.number}: overage restoration back")
                if event:
                    applied.append(event)
            await conn.execute(
                "UPDATE invoices SET refunded_cents = (SELECT coalesce(sum(amount_cents), 0) FROM"
                " invoice_payment_events WHERE invoice_id = %s AND kind = 'refund'), updated_at = now() WHERE id = %s",
                (invoice.id, invoice.id))
            await conn.execute("UPDATE invoices SET status = 'refunded' WHERE id = %s AND status = 'paid'"
                               " AND refunded_cents >= amount_due_cents", (invoice.id,))
        elif dispute is not None:
            dispute_id, cents = str(dispute.get("dispute_id")), int(dispute.get("amount") or 0)
            if kind == "dispute":
                # The disputed money's share of the restoration, less what refunds already took back.
                share = -(-restored * min(cents, paid) // paid)
                event = await _apply_once(conn, invoice, "dispute", dispute_id, cents,
                                          -min(share, max(0, restored - await _refunds_took(conn, invoice))),
                                          f"sys:invoice_dispute:{dispute_id}",
                                          f"Dispute {dispute_id} of invoice {invoice.number}: overage restoration back")
                await conn.execute("UPDATE invoices SET status = 'disputed', updated_at = now() WHERE id = %s"
                                   " AND status IN ('paid', 'refunded')", (invoice.id,))
            elif dispute.get("status") in ("won", "warning_closed"):
                taken = await (await conn.execute(
                    "SELECT -moved_micros AS taken FROM invoice_payment_events WHERE invoice_id = %s"
                    " AND stripe_id = %s AND kind = 'dispute'", (invoice.id, dispute_id))).fetchone()
                event = await _apply_once(conn, invoice, "dispute_won", dispute_id, cents,
                                          int(taken["taken"]) if taken else 0, f"sys:invoice_dispute_won:{dispute_id}",
                                          f"Dispute {dispute_id} of invoice {invoice.number} closed in our favour")
                await conn.execute("UPDATE invoices SET status = 'paid', updated_at = now() WHERE id = %s"
                                   " AND status = 'disputed'", (invoice.id,))
            else:
                event = await _apply_once(conn, invoice, "dispute_lost", dispute_id, cents, 0, "", "")
            if event:
                applied.append(event)
    return applied
