"""Refunds made on Stripe directly and disputes: take back the credits that payment bought.

Stripe tells us with ``charge.refunded`` (a refund creditflow did not make: e.g. from the Stripe dashboard) and
``charge.dispute.created``. The webhook stores the event and writes an outbox row in the same transaction; the
account workflow applies it here, once per refund or dispute id (the journal key). The credits come from the
purchase's own lot, in the lot's own proportion (a package may have bought more credits than cents): D cents take back
ceil(D * credits bought / cents paid) micros, rounded up against the customer (``creditflow.domain.lots``), never
more than remains of that lot and never below the balance floor; what could not be taken back is reported.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.domain.lots import micros_for_cents
from creditflow.errors import CreditflowError
from creditflow.invoicing import payment as invoice_payment
from creditflow.ledger.db import to_jsonb
from creditflow.payments.refunds import REFUND_METADATA_KEY
from creditflow.payments.topups import charge_ledger_account

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
    """The credited charge of this PaymentIntent and the credit lot its purchase created, with the ledger account
    the lot lives in (``ledger_account``: the wallet, or the sub-account of the named credit system it funded)."""
    charge = await (await conn.execute(
        "SELECT id, amount_cents, credits, ledger_txn_id, credit_system_id FROM stripe_charges"
        " WHERE account_id = %s AND payment_intent_id = %s AND status = 'succeeded' AND credits > 0",
        (account_id, payment_intent_id))).fetchone()
    if charge is None or not charge["ledger_txn_id"]:
        raise CreditflowError("unknown_purchase", f"no credited purchase with PaymentIntent {payment_intent_id}")
    ledger = charge_ledger_account(account_id, charge["credit_system_id"])
    lot = await (await conn.execute("SELECT id, paid_cents, original_micros FROM credit_lots"
                                    " WHERE account_id = %s AND txn_id = %s",
                                    (ledger, UUID(hex=charge["ledger_txn_id"].removeprefix("txn_"))))).fetchone()
    if lot is None:
        raise CreditflowError("unknown_purchase", f"the purchase of {payment_intent_id} has no credit lot")
    # The lot's price (0023_1); a lot without a backfilled price has its charge's.
    return {**charge, "lot_id": lot["id"], "original_micros": lot["original_micros"], "ledger_account": ledger,
            "paid_cents": lot["paid_cents"] if lot["paid_cents"] is not None else charge["amount_cents"]}


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
    if invoice is not None:  # an invoice payment: its credit-line restoration moves, not a lot
        return await _apply_to_invoice(invoice, pool, kind, payload, stripe_refunds, result)
    async with pool.connection() as conn:
        try:
            purchase = await _purchase(conn, account_id, result.payment_intent_id)
        except CreditflowError:
            result.ignored.append(f"{result.payment_intent_id}: not a credited creditflow purchase")
            return result
        if kind == DISPUTE_CLOSED:
            await _close_dispute(conn, account_id, purchase, payload, result)
            return result
        if kind == REFUNDED:
            ours = {r["stripe_refund_id"] for r in await (await conn.execute(
                "SELECT stripe_refund_id FROM refunds WHERE charge_id = %s AND stripe_refund_id IS NOT NULL",
                (purchase["id"],))).fetchall()}
            # Ours: recorded on a refunds row, or carrying our refund id in its metadata (Stripe may report the
            # refund before that row records the Stripe id, or the row's commit may have been lost to a crash).
            items = [("refund", refund_id, cents)
                     for refund_id, cents in _refunds_not_ours(payload, stripe_refunds, ours, result)]
        else:
            items = [("dispute", str(payload.get("dispute_id")), int(payload.get("amount") or 0))]
        for what, stripe_id, cents in items:
            async with conn.transaction():
                result.applied.append(await _take_back(conn, account_id, purchase, what, stripe_id, cents,
                                                       result.payment_intent_id, payload.get("reason")))
    return result


async def _take_back(conn: Any, account_id: str, purchase: dict[str, Any], what: str, stripe_id: str, cents: int,
                     payment_intent_id: str | None, reason: object) -> Clawback:
    """One refund made on Stripe or one dispute: the credits its money bought leave the purchase's lot (once per
    key). A dispute is recorded in ``disputes`` in the same transaction with what it claims and what it took: what
    the lot could not give now (e.g. credits an in-flight refund holds in reserve) stays claimed, and a release of
    that refund gives it to the dispute (``creditflow.payments.refunds``)."""
    key = f"sys:{'stripe_refund' if what == 'refund' else 'dispute'}:{stripe_id}"
    if what == "dispute":
        known = await (await conn.execute("SELECT amount_cents, claimed_micros, taken_micros FROM disputes"
                                          " WHERE id = %s", (stripe_id,))).fetchone()
        if known is not None:  # applied before (a redelivery): nothing more
            return Clawback(key=key, kind=what, stripe_id=stripe_id, amount_cents=known["amount_cents"],
                            wanted_micros=known["claimed_micros"], taken_micros=known["taken_micros"])
    # The credits that money bought, in the lot's own proportion, rounded up (creditflow.domain.lots).
    wanted = micros_for_cents(min(cents, purchase["paid_cents"]), paid_cents=purchase["paid_cents"],
                              original_micros=purchase["original_micros"])
    description = (f"Refund {stripe_id} made on Stripe" if what == "refund"
                   else f"Disputed payment {payment_intent_id} ({reason or 'dispute'})")
    try:
        row = await (await conn.execute(
            "SELECT cf_clawback_lot(%s, %s, %s, %s, %s, %s, %s, %s) AS taken",
            (purchase["ledger_account"], purchase["lot_id"], wanted, what, "system:refund_reserve" if what == "refund"
             else "system:disputes", key, description,
             to_jsonb({"payment_intent_id": payment_intent_id, "stripe_id": stripe_id,
                       "amount_cents": cents})))).fetchone()
    except psycopg.errors.RaiseException as exc:
        raise CreditflowError(str(exc.diag.message_primary or "clawback_failed")) from exc
    assert row is not None
    taken = int(row["taken"])
    if what == "dispute":
        await conn.execute(
            "INSERT INTO disputes (id, account_id, charge_id, payment_intent_id, lot_id, amount_cents, claimed_micros,"
            " taken_micros) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING",  # applied meanwhile by the other path (workflow / reconciliation)
            (stripe_id, account_id, purchase["id"], payment_intent_id, purchase["lot_id"], cents, wanted, taken))
    return Clawback(key=key, kind=what, stripe_id=stripe_id, amount_cents=cents, wanted_micros=wanted,
                    taken_micros=taken)


# Closing statuses that give back what the dispute took (the merchant keeps the money).
RETURNING_CLOSES = frozenset({"won", "warning_closed"})


async def _close_dispute(conn: Any, account_id: str, purchase: dict[str, Any], payload: dict[str, Any],
                         result: ClawbackResult) -> None:
    """A dispute closed: its status is recorded; ``won`` and ``warning_closed`` (an inquiry that did not become a
    chargeback) leave the merchant the money, so they give back what it took to the purchase's own lot (journal
    ``dispute_reversal``, key ``sys:dispute_won:{id}``), once, and claim nothing more; a dispute lost keeps them
    taken (and its claim on credits a refund releases later). A close that arrives before its opening records the
    dispute closed, so a late ``charge.dispute.created`` of a dispute the merchant won takes nothing."""
    dispute_id = str(payload.get("dispute_id"))
    status = str(payload.get("status") or "closed")
    async with conn.transaction():
        # The balance rows first, as every ledger write (a refund's release locks it before the disputes rows): the
        # purchase's workspace's and those its credits were moved to, in id order (0031_3).
        ledger = purchase["ledger_account"]
        await conn.execute("SELECT cf_lock_lot_family(%s, %s)", (ledger, purchase["lot_id"]))
        dispute = await (await conn.execute("SELECT * FROM disputes WHERE id = %s AND account_id = %s FOR UPDATE",
                                            (dispute_id, account_id))).fetchone()
        if dispute is None:
            if status in RETURNING_CLOSES:
                await conn.execute(
                    "INSERT INTO disputes (id, account_id, charge_id, payment_intent_id, lot_id, amount_cents,"
                    " claimed_micros, status, closed_at) VALUES (%s, %s, %s, %s, %s, %s, 0, %s, now())",
                    (dispute_id, account_id, purchase["id"], result.payment_intent_id, purchase["lot_id"],
                     int(payload.get("amount") or 0), status))
            result.ignored.append(f"{dispute_id}: closed {status} before it was opened here; nothing was taken")
            return
        if dispute["closed_at"] is None:
            await conn.execute("UPDATE disputes SET status = %s, closed_at = now(), updated_at = now() WHERE id = %s",
                               (status, dispute_id))
        if status not in RETURNING_CLOSES:
            result.ignored.append(f"{dispute_id}: closed {status}, credits stay taken")
            return
        back = dispute["taken_micros"] - dispute["returned_micros"]
        if back <= 0:
            result.ignored.append(f"{dispute_id}: nothing was taken")
            return
        key = f"sys:dispute_won:{dispute_id}"
        description = f"Dispute {dispute_id} {status}: credits given back"
        metadata = {"dispute_id": dispute_id, "payment_intent_id": result.payment_intent_id}
        # What it took from workspaces the purchase's credits were moved to goes back to those lots (0031_3).
        moved = await return_moved_parts(conn, ledger, dispute["lot_id"], f"sys:dispute:{dispute_id}", key,
                                         "dispute", "dispute_reversal", "system:disputes", description, metadata)
        if back - moved > 0:
            # Back into the purchase's own lot (cf_lot_return, 0023_4): its price keeps describing what it holds.
            row = await (await conn.execute(
                "SELECT * FROM cf_lot_return(%s, %s, %s, 'dispute_reversal', 'system:disputes', %s, %s, %s)",
                (ledger, dispute["lot_id"], back - moved, key, description, to_jsonb(metadata))
            )).fetchone()
            assert row is not None
        await conn.execute("UPDATE disputes SET returned_micros = returned_micros + %s, updated_at = now()"
                           " WHERE id = %s", (back, dispute_id))
    result.applied.append(Clawback(key=key, kind="dispute_reversal", stripe_id=dispute_id,
                                   amount_cents=int(payload.get("amount") or 0), wanted_micros=-back,
                                   taken_micros=-back))


async def restore_failed_refund(conn: Any, obj: dict[str, Any]) -> str | None:
    """A refund made on Stripe directly, whose credits were taken back on ``charge.refunded``, that Stripe reports
    ``failed`` or ``canceled`` (a Refund object of ``charge.refund.updated`` / ``refund.failed``): the money did not
    go back, so the credits return to the purchase's own lot, once (journal ``refund_reversal``, key
    ``sys:stripe_refund_failed:{refund_id}``), in the caller's (the webhook's) transaction. Returns the charge id
    (``stripe_charges``) when something was (or had been) restored, else None."""
    refund_id, status, pi = obj.get("id"), obj.get("status"), obj.get("payment_intent")
    if status not in ("failed", "canceled") or not isinstance(refund_id, str) or not isinstance(pi, str):
        return None
    charge = await (await conn.execute("SELECT account_id, credit_system_id FROM stripe_charges"
                                       " WHERE payment_intent_id = %s", (pi,))).fetchone()
    if charge is None:
        return None
    # The ledger account of the purchase's lot: the wallet, or a named credit system's sub-account.
    account_id = charge_ledger_account(charge["account_id"], charge["credit_system_id"])
    taken = await (await conn.execute(
        "SELECT -amount_micros AS micros FROM cf_journal_entry(%s, %s)",
        (account_id, f"sys:stripe_refund:{refund_id}"))).fetchone()
    if taken is None:
        return None
    purchase = await _purchase(conn, charge["account_id"], pi)
    key = f"sys:stripe_refund_failed:{refund_id}"
    description = f"Refund {refund_id} made on Stripe {status}: credits back"
    metadata = {"payment_intent_id": pi, "stripe_id": refund_id, "status": status}
    try:
        # What it took from workspaces the purchase's credits were moved to goes back to those lots (0031_3).
        moved = await return_moved_parts(conn, account_id, purchase["lot_id"], f"sys:stripe_refund:{refund_id}", key,
                                         "refund", "refund_reversal", "system:refund_reserve", description, metadata)
        if taken["micros"] > 0:
            await conn.execute(
                "SELECT * FROM cf_lot_return(%s, %s, %s, 'refund_reversal', 'system:refund_reserve', %s, %s, %s)",
                (account_id, purchase["lot_id"], taken["micros"], key, description, to_jsonb(metadata)))
        elif moved > 0:  # the purchase's workspace gave nothing: a row of 0 records the restoration once
            await conn.execute(
                "INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros,"
                " description, metadata, idempotency_key) SELECT account_id, 'refund_reversal', 0,"
                " 'system:refund_reserve', balance_micros, %s, %s, %s FROM balances WHERE account_id = %s"
                " AND NOT EXISTS (SELECT 1 FROM journal_keys WHERE account_id = %s AND idempotency_key = %s)",
                (description, to_jsonb(metadata), key, account_id, account_id, key))
        else:
            return None
    except psycopg.Error as exc:
        raise CreditflowError(str(exc.diag.message_primary or "clawback_failed")) from exc
    return str(purchase["id"])


async def return_moved_parts(conn: Any, account_id: str, lot_id: str, taken_key: str, return_key: str,
                             taken_type: str, return_type: str, book: str, description: str,
                             metadata: dict[str, Any]) -> int:
    """Give back what a clawback under ``taken_key`` (and the parts a released refund later gave it,
    ``taken_key:refund:...``) took from the lots the purchase's credits were moved to by transfers: each to its own
    lot (cf_lot_return), once (key ``return_key:<lot id>``). Returns the micros given back (or given back before)."""
    await conn.execute("SELECT cf_lock_lot_family(%s, %s)", (account_id, lot_id))
    parts = await (await conn.execute(
        "SELECT l.id, l.account_id, sum(-j.amount_micros)::bigint AS taken FROM credit_lots l"
        " JOIN journal_keys k ON k.account_id = l.account_id"
        "  AND (k.idempotency_key = %s || ':' || l.id OR k.idempotency_key LIKE %s || ':refund:%%:' || l.id)"
        " JOIN journal j ON j.account_id = k.account_id AND j.created_at = k.created_at AND j.seq = k.seq"
        "  AND j.type = %s"
        " WHERE l.origin_lot_id = %s GROUP BY l.id, l.account_id HAVING sum(-j.amount_micros) > 0"
        " ORDER BY l.id", (taken_key, taken_key, taken_type, lot_id))).fetchall()
    for part in parts:
        await conn.execute(
            "SELECT * FROM cf_lot_return(%s, %s, %s, %s, %s, %s, %s, %s)",
            (part["account_id"], part["id"], part["taken"], return_type, book, f"{return_key}:{part['id']}",
             description + " (credits moved here by a transfer)",
             to_jsonb({**metadata, "origin_lot_id": lot_id, "origin_account_id": account_id})))
    return sum(int(p["taken"]) for p in parts)


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
