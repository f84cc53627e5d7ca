"""Refunds made on Stripe directly and disputes: take back the credits that payment bought (issue 3).

Stripe tells us with ``charge.refunded`` (a refund creditflow did not make: e.g. from the Stripe dashboard) and
``charge.dispute.created``. The webhook stores the event and writes an outbox row in the same transaction; the
account workflow applies it here, once per refund or dispute id (the journal key). The credits come from the
purchase's own lot, in proportion to the money (a package may have bought more credits than cents), never more
than remains of that lot and never below the balance floor; what could not be taken back is reported.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.errors import CreditflowError
from creditflow.invoicing import payment as invoice_payment
from creditflow.ledger.db import to_jsonb
from creditflow.payments.refunds import REFUND_METADATA_KEY

REFUNDED = "stripe.charge.refunded"
DISPUTED = "stripe.charge.dispute.created"
# Not a clawback but the same route (webhook -> outbox -> account workflow): an auto-recharge whose workflow gave
# up on an unclear outcome, reported paid by Stripe afterwards.
RECHARGE_SUCCEEDED_LATE = "stripe.recharge.succeeded_late"
DISPUTE_CLOSED = "stripe.charge.dispute.closed"
EVENT_KINDS = {"charge.refunded": REFUNDED, "charge.dispute.created": DISPUTED,
               "charge.dispute.closed": DISPUTE_CLOSED}


class Clawback(BaseModel):
    """One refund or dispute applied to the ledger."""

    key: str
    kind: str  # refund / dispute
    stripe_id: str
    amount_cents: int
    wanted_micros: int
    taken_micros: int


class ClawbackResult(BaseModel):
    payment_intent_id: str | None = None
    charge_id: str | None = None
    applied: list[Clawback] = Field(default_factory=list)
    ignored: list[str] = Field(default_factory=list)  # refunds creditflow made itself, or nothing to do


def outbox_payload(event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
    """What the account workflow needs from a Charge (refunded) or a Dispute object: ids and amounts only."""
    if event_type == "charge.refunded":
        refunds = obj.get("refunds") if isinstance(obj.get("refunds"), dict) else {}
        data = refunds.get("data") if isinstance(refunds, dict) else None
        return {"payment_intent_id": obj.get("payment_intent"), "stripe_charge_id": obj.get("id"),
                "refunds": [{"id": r.get("id"), "amount": r.get("amount"),
                             "creditflow_refund_id": (r.get("metadata") or {}).get(REFUND_METADATA_KEY)}
                            for r in (data or [])
                            if isinstance(r, dict) and isinstance(r.get("id"), str) and type(r.get("amount")) is int]}
    return {"payment_intent_id": obj.get("payment_intent"), "stripe_charge_id": obj.get("charge"),
            "dispute_id": obj.get("id"), "amount": obj.get("amount"), "reason": obj.get("reason"),
            "status": obj.get("status")}


async def _purchase(conn: Any, account_id: str, payment_intent_id: str) -> dict[str, Any]:
    """The credited charge of this PaymentIntent and the credit lot its purchase created."""
    charge = await (await conn.execute(
        "SELECT id, amount_cents, credits, ledger_txn_id FROM stripe_charges"
        " WHERE account_id = %s AND payment_intent_id = %s AND status = 'succeeded' AND credits > 0",
        (account_id, payment_intent_id))).fetchone()
    if charge is None or not charge["ledger_txn_id"]:
        raise CreditflowError("unknown_purchase", f"no credited purchase with PaymentIntent {payment_intent_id}")
    lot = await (await conn.execute("SELECT id FROM credit_lots WHERE account_id = %s AND txn_id = %s",
                                    (account_id, UUID(hex=charge["ledger_txn_id"].removeprefix("txn_"))))).fetchone()
    if lot is None:
        raise CreditflowError("unknown_purchase", f"the purchase of {payment_intent_id} has no credit lot")
    return {**charge, "lot_id": lot["id"]}


async def apply(pool: AsyncConnectionPool, account_id: str, kind: str, payload: dict[str, Any],
                stripe_refunds: list[dict[str, Any]] | None = None) -> ClawbackResult:
    """Apply a ``stripe.charge.refunded`` or ``stripe.charge.dispute.created`` outbox event (idempotent).

    ``stripe_refunds``: the PaymentIntent's succeeded refunds as listed by Stripe now. Merged with the event's
    (Stripe API versions from 2022-11-15 no longer include ``Charge.refunds`` in the event)."""
    pi = payload.get("payment_intent_id")
    result = ClawbackResult(payment_intent_id=pi if isinstance(pi, str) else None,
                            charge_id=payload.get("stripe_charge_id"))
    if result.payment_intent_id is None:
        result.ignored.append("no PaymentIntent")
        return result
    invoice = await invoice_payment.invoice_paid_with(pool, account_id, result.payment_intent_id)
    if invoice is not None:  # an invoice payment: the invoice and its credit-line restoration (issue 11, defect 8)
        return await _apply_to_invoice(invoice, pool, kind, payload, stripe_refunds, result)
    async with pool.connection() as conn:
        try:
            purchase = await _purchase(conn, account_id, result.payment_intent_id)
        except CreditflowError:
            result.ignored.append(f"{result.payment_intent_id}: not a credited creditflow purchase")
            return result
        if kind == DISPUTE_CLOSED:
            await _close_dispute(conn, account_id, payload, result)
            return result
        if kind == REFUNDED:
            ours = {r["stripe_refund_id"] for r in await (await conn.execute(
                "SELECT stripe_refund_id FROM refunds WHERE charge_id = %s AND stripe_refund_id IS NOT NULL",
                (purchase["id"],))).fetchall()}
            # Ours: recorded on a refunds row, or carrying our refund id in its metadata (Stripe may report the
            # refund before that row records the Stripe id, or the row's commit may have been lost to a crash).
            items = []
            listed = {r["id"]: r for r in payload.get("refunds", [])}
            for r in stripe_refunds or []:
                listed.setdefault(r["id"], r)
            for r in listed.values():
                if r["id"] in ours or r.get("creditflow_refund_id"):
                    result.ignored.append(f"{r['id']}: made by creditflow")
                else:
                    items.append(("refund", r["id"], int(r["amount"])))
        else:
            items = [("dispute", str(payload.get("dispute_id")), int(payload.get("amount") or 0))]
        for what, stripe_id, cents in items:
            wanted = purchase["credits"] * MICROS_PER_CREDIT * min(cents, purchase["amount_cents"]) \
                // purchase["amount_cents"]
            key = f"sys:{'stripe_refund' if what == 'refund' else 'dispute'}:{stripe_id}"
            description = (f"Refund {stripe_id} made on Stripe" if what == "refund"
                           else f"Disputed payment {result.payment_intent_id} ({payload.get('reason') or 'dispute'})")
            try:
                row = await (await conn.execute(
                    "SELECT cf_clawback_lot(%s, %s, %s, %s, %s, %s, %s, %s) AS taken",
                    (account_id, purchase["lot_id"], wanted, what, "system:refund_reserve" if what == "refund"
                     else "system:disputes", key, description,
                     to_jsonb({"payment_intent_id": result.payment_intent_id, "stripe_id": stripe_id,
                               "amount_cents": cents})))).fetchone()
            except psycopg.errors.RaiseException as exc:
                raise CreditflowError(str(exc.diag.message_primary or "clawback_failed")) from exc
            assert row is not None
            result.applied.append(Clawback(key=key, kind=what, stripe_id=stripe_id, amount_cents=cents,
                                           wanted_micros=wanted, taken_micros=int(row["taken"])))
    return result


def _refunds_not_ours(payload: dict[str, Any], stripe_refunds: list[dict[str, Any]] | None,
                      ours: set[str], result: ClawbackResult) -> list[tuple[str, int]]:
    """(refund id, cents) of the refunds listed in the event or by Stripe that creditflow did not make."""
    listed = {r["id"]: r for r in payload.get("refunds", [])}
    for r in stripe_refunds or []:
        listed.setdefault(r["id"], r)
    items = []
    for r in listed.values():
        if r["id"] in ours or r.get("creditflow_refund_id"):
            result.ignored.append(f"{r['id']}: made by creditflow")
        else:
            items.append((r["id"], int(r["amount"])))
    return items


async def _apply_to_invoice(invoice: Any, pool: AsyncConnectionPool, kind: str, payload: dict[str, Any],
                            stripe_refunds: list[dict[str, Any]] | None, result: ClawbackResult) -> ClawbackResult:
    """Refunds and disputes of an invoice payment (creditflow.invoicing.payment.apply_stripe_event)."""
    what = {REFUNDED: "refund", DISPUTED: "dispute", DISPUTE_CLOSED: "dispute_closed"}.get(kind)
    if what is None:
        result.ignored.append(f"{kind}: not an invoice payment event")
        return result
    refunds = _refunds_not_ours(payload, stripe_refunds, set(), result) if what == "refund" else []
    events = await invoice_payment.apply_stripe_event(pool, invoice, what, refunds,
                                                      payload if what != "refund" else None)
    for e in events:
        result.applied.append(Clawback(key=e.key, kind=f"invoice_{e.kind}", stripe_id=e.stripe_id,
                                       amount_cents=e.amount_cents, wanted_micros=-e.moved_micros,
                                       taken_micros=-e.moved_micros))
    if not events:
        result.ignored.append(f"invoice {invoice.id}: nothing new")
    return result


async def _close_dispute(conn: Any, account_id: str, payload: dict[str, Any], result: ClawbackResult) -> None:
    """A dispute won gives back the credits taken when it was opened (a new purchased lot), once; a dispute lost
    (or closed otherwise) keeps them taken."""
    dispute_id = str(payload.get("dispute_id"))
    if payload.get("status") != "won":
        result.ignored.append(f"{dispute_id}: closed {payload.get('status')}, credits stay taken")
        return
    taken = await (await conn.execute(
        "SELECT -amount_micros AS micros FROM journal WHERE account_id = %s AND idempotency_key = %s",
        (account_id, f"sys:dispute:{dispute_id}"))).fetchone()
    if taken is None or taken["micros"] <= 0:
        result.ignored.append(f"{dispute_id}: nothing was taken")
        return
    key = f"sys:dispute_won:{dispute_id}"
    row = await (await conn.execute(
        "SELECT * FROM cf_post(%s, 'dispute_reversal', %s, 'system:disputes', %s, %s, 'purchase', 20, NULL, %s,"
        " NULL)", (account_id, taken["micros"], f"Dispute {dispute_id} won: credits given back",
                   to_jsonb({"dispute_id": dispute_id, "payment_intent_id": result.payment_intent_id}), key))
    ).fetchone()
    assert row is not None
    result.applied.append(Clawback(key=key, kind="dispute_reversal", stripe_id=dispute_id,
                                   amount_cents=int(payload.get("amount") or 0), wanted_micros=-taken["micros"],
                                   taken_micros=-taken["micros"]))
