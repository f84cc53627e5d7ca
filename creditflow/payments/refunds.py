"""Refunds of purchased credits, exactly once: eligibility, the reservation, the Stripe refund, finalize or release.

The saga's steps (``RefundWorkflow`` runs them; each is safe to repeat):

1. ``plan`` reads the purchase (its ``purchase`` journal row, its ``stripe_charges`` row, its lot through
   ``account_lots`` which settles deferred burns first) and applies ``creditflow.domain.refunds``. A request id
   already used answers from its row (a repeat after success must not be re-judged on what now remains).
2. ``reserve`` writes the ``refunds`` row and calls ``cf_refund_reserve`` in ONE transaction: the credits
   leave that purchase's lot and the wallet (journal type ``refund``, key ``sys:refund:{refund_id}``) and stop
   being spendable; a refusal leaves nothing behind. The lot is re-checked under the account lock.
3. ``refund_payment``: localstripe ignores Stripe idempotency keys, so the row guards the call: status
   ``refunding`` is committed first, then under the row lock the refund is created and its id recorded; a
   retry that finds the id retrieves it instead of creating another.
4. ``finalize`` (``cf_refund_finalize``) marks the row ``succeeded``; no wallet movement, the reservation is
   the ledger effect. On a permanent Stripe refusal ``release`` (``cf_refund_release``, journal type
   ``refund_reversal``, key ``sys:refund_release:{refund_id}``) puts the credits back into the same lot and
   marks the row ``failed``.
5. A refund Stripe answers ``pending`` (or ``requires_action``) is not decided: ``mark_pending`` keeps the row
   ``pending`` with the credits reserved. Stripe's final word decides it through ``apply_stripe_status``: a signed
   webhook event (``apply_stripe_event``, in the event's transaction) or the workflow's poll (``settle_pending``);
   ``succeeded`` finalizes, ``failed``/``canceled`` release once.

Known gap (as for top-ups): if the process dies after Stripe created the refund and before the row's commit,
a retry creates a second refund on localstripe; on Stripe the idempotency key ``creditflow:refund:{id}`` returns
the first within 24 hours.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.money import MICROS_PER_CREDIT, micros_to_credits
from creditflow.domain.refunds import PurchaseFacts, RefundError, RefundReason, quote_refund
from creditflow.domain.topups import cents_to_usd, format_usd
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.ledger.db import to_jsonb
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.lots import account_lots
from creditflow.ledger.models import txn_id
from creditflow.ledger.pagination import Cursor, keyset
from creditflow.ledger.transfers import moved_remaining_micros
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, RefundState, StripeGateway
from creditflow.payments.topups import charge_ledger_account

REFUND_METADATA_KEY = "creditflow_refund_id"
# Codes the refund functions raise (the exception's message is the code).
_SQL_CODES = frozenset({"invalid_amount", "unknown_account", "unknown_purchase", "not_refundable",
                        "refund_exceeds_remaining", "insufficient_credits", "idempotency_conflict", "not_found",
                        "refund_not_reserved"})
_TXN_ID = "txn_"
# Journal types of paid credits: a top-up and an auto-recharge (both keep their ``stripe_charges`` row).
REFUNDABLE_TYPES = frozenset({"purchase", "auto_recharge"})


class RefundRecord(BaseModel):
    """A row of ``refunds``."""

    id: str
    account_id: str
    request_id: str
    charge_id: str
    payment_intent_id: str
    purchase_txn_id: UUID
    lot_id: str
    credits: int
    amount_cents: int
    reason: str
    requested_by: str
    status: str
    reserve_txn_id: UUID | None
    release_txn_id: UUID | None
    stripe_refund_id: str | None
    stripe_status: str | None
    failure_code: str | None
    failure_message: str | None
    created_at: datetime
    updated_at: datetime
    finalized_at: datetime | None

    @property
    def amount_usd(self) -> Decimal:
        return cents_to_usd(self.amount_cents)

    @property
    def transaction_id(self) -> str | None:
        return txn_id(self.reserve_txn_id)


class RefundPlan(BaseModel):
    """What a refund request resolves to; ``refund_id`` and ``status`` are set when the request has a row."""

    account_id: str
    request_id: str
    charge_id: str
    payment_intent_id: str
    purchase_txn_id: str
    lot_id: str
    credits: int
    amount_cents: int
    reason: str
    requested_by: str
    purchased_at: datetime
    refund_id: str | None = None
    status: str | None = None


class RefundLedgerResult(BaseModel):
    refund: RefundRecord
    balance: Decimal


def _sql_error(exc: psycopg.Error) -> CreditflowError | None:
    code = str(exc.diag.message_primary or "")
    return CreditflowError(code, code.replace("_", " ")) if code in _SQL_CODES else None


def _purchase_uuid(value: str) -> UUID:
    if not value.startswith(_TXN_ID):
        raise CreditflowError("invalid_id", "malformed purchase_transaction_id: expected txn_<32 hex digits>")
    try:
        return UUID(hex=value[len(_TXN_ID):])
    except ValueError:
        raise CreditflowError("invalid_id", "malformed purchase_transaction_id: expected txn_<32 hex digits>") from None


async def _purchase(pool: AsyncConnectionPool, account_id: str, purchase_transaction_id: str | None,
                    payment_intent_id: str | None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The purchase's journal row, charge row and ledger account (the wallet, or the sub-account of the named credit
    system the top-up funded: its lot lives there); ``unknown_purchase`` / ``not_refundable`` otherwise."""
    if (purchase_transaction_id is None) == (payment_intent_id is None):
        raise CreditflowError("validation_error", "name the purchase: purchase_transaction_id or payment_intent_id")
    ledger = account_id
    async with pool.connection() as conn:
        if payment_intent_id is not None:
            charge = await (await conn.execute(
                "SELECT * FROM stripe_charges WHERE account_id = %s AND payment_intent_id = %s",
                (account_id, payment_intent_id))).fetchone()
            if charge is None:
                raise CreditflowError("unknown_purchase", "no top-up of this account has this PaymentIntent")
            if charge["status"] != "succeeded" or charge["ledger_txn_id"] is None:
                raise CreditflowError("not_refundable", "this top-up was not paid")
            purchase_transaction_id = charge["ledger_txn_id"]
            ledger = charge_ledger_account(account_id, charge["credit_system_id"])
        else:
            _purchase_uuid(purchase_transaction_id or "")  # malformed: invalid_id before any lookup
            funded = await (await conn.execute(
                "SELECT credit_system_id FROM stripe_charges WHERE account_id = %s AND ledger_txn_id = %s"
                " AND credit_system_id IS NOT NULL", (account_id, purchase_transaction_id))).fetchone()
            if funded is not None:  # a top-up of a named credit system: its entry is in the system's account
                ledger = charge_ledger_account(account_id, funded["credit_system_id"])
        assert purchase_transaction_id is not None
        txn = await (await conn.execute(
            "SELECT id, type, idempotency_key, created_at FROM journal WHERE id = %s AND account_id = %s"
            " AND type <> 'usage'", (_purchase_uuid(purchase_transaction_id), ledger))).fetchone()
        if txn is None:
            raise CreditflowError("unknown_purchase", "this account has no such transaction")
        charge = await (await conn.execute(
            "SELECT * FROM stripe_charges WHERE account_id = %s AND ledger_txn_id = %s AND status = 'succeeded'",
            (account_id, purchase_transaction_id))).fetchone()
    if txn["type"] not in REFUNDABLE_TYPES or charge is None:
        raise CreditflowError("not_refundable", f"a {txn['type']} transaction is not a refundable purchase")
    return txn, charge, ledger


async def _lot_account(conn: Any, lot_id: str, account_id: str) -> str:
    """The ledger account a refund's purchase lot lives in: the account's wallet, or its sub-account in the named
    credit system the top-up funded (docs/credit-systems.md)."""
    row = await (await conn.execute("SELECT account_id FROM credit_lots WHERE id = %s", (lot_id,))).fetchone()
    return str(row["account_id"]) if row is not None else account_id


async def plan(pool: AsyncConnectionPool, *, account_id: str, request_id: str, purchase_transaction_id: str | None,
               payment_intent_id: str | None, credits: int | None, reason: RefundReason, requested_by: str,
               now: datetime) -> RefundPlan:
    """Resolve and judge a refund request (read only). A request id already used returns its row's plan."""
    txn, charge, ledger = await _purchase(pool, account_id, purchase_transaction_id, payment_intent_id)
    existing = await find(pool, account_id, request_id)
    if existing is not None:
        if existing.charge_id != charge["id"] or (credits is not None and credits != existing.credits) or (
                existing.reason != reason.value):
            raise CreditflowError("idempotency_conflict",
                                  f"request_id {request_id} was already used for another refund")
        return _plan_of(existing, purchased_at=txn["created_at"])
    lots = [lot for lot in await account_lots(pool, ledger, include_depleted=True)
            if lot.transaction_id == f"txn_{txn['id'].hex}"]
    if len(lots) != 1:
        raise CreditflowError("not_refundable", "this purchase has no credit lot")
    [lot] = lots
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT coalesce(sum(amount_cents), 0) AS cents FROM refunds WHERE charge_id = %s AND status <> 'failed'",
            (charge["id"],))).fetchone()
    assert row is not None
    # The lot's price (migration 0023_1); a lot written before it without a backfilled price has its charge's.
    facts = PurchaseFacts(source=lot.source, purchased_at=lot.created_at,
                          paid_cents=lot.paid_cents if lot.paid_cents is not None else charge["amount_cents"],
                          # What remains of the purchase wherever transfers moved it (0031_3).
                          remaining_micros=int(lot.remaining * MICROS_PER_CREDIT)
                          + await moved_remaining_micros(pool, lot.id),
                          original_micros=int(lot.original * MICROS_PER_CREDIT), refunded_cents=int(row["cents"]))
    try:
        quote = quote_refund(facts, credits=credits, now=now)
    except RefundError as exc:
        raise CreditflowError(exc.code, exc.message) from exc
    return RefundPlan(account_id=account_id, request_id=request_id, charge_id=charge["id"],
                      payment_intent_id=charge["payment_intent_id"], purchase_txn_id=f"txn_{txn['id'].hex}",
                      lot_id=lot.id, credits=quote.credits, amount_cents=quote.amount_cents, reason=reason.value,
                      requested_by=requested_by, purchased_at=lot.created_at)


def _plan_of(record: RefundRecord, *, purchased_at: datetime) -> RefundPlan:
    return RefundPlan(account_id=record.account_id, request_id=record.request_id, charge_id=record.charge_id,
                      payment_intent_id=record.payment_intent_id, purchase_txn_id=f"txn_{record.purchase_txn_id.hex}",
                      lot_id=record.lot_id, credits=record.credits, amount_cents=record.amount_cents,
                      reason=record.reason, requested_by=record.requested_by, purchased_at=purchased_at,
                      refund_id=record.id, status=record.status)


def _hash(kind: str, record: RefundRecord) -> bytes:
    return request_hash(kind, record.id, record.lot_id, record.credits * MICROS_PER_CREDIT)


def _description(record: RefundRecord) -> str:
    return f"Refund of {record.credits:,} credits ({format_usd(record.amount_cents)}) of purchase " \
           f"txn_{record.purchase_txn_id.hex}"


async def reserve(pool: AsyncConnectionPool, p: RefundPlan) -> RefundLedgerResult:
    """Write the refund row and take its credits out of the purchase's lot, in one transaction (replayed if done)."""
    try:
        async with pool.connection() as conn, conn.transaction():
            ledger = await _lot_account(conn, p.lot_id, p.account_id)
            await conn.execute("SELECT 1 FROM balances WHERE account_id = %s FOR UPDATE", (ledger,))
            await conn.execute(
                "INSERT INTO refunds (id, account_id, request_id, charge_id, payment_intent_id, purchase_txn_id,"
                " lot_id, credits, amount_cents, reason, requested_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (account_id, request_id) DO NOTHING",
                (new_id("ref"), p.account_id, p.request_id, p.charge_id, p.payment_intent_id,
                 _purchase_uuid(p.purchase_txn_id), p.lot_id, p.credits, p.amount_cents, p.reason, p.requested_by))
            record = await _load_by_request(conn, p.account_id, p.request_id, lock=True)
            if record.charge_id != p.charge_id or record.credits != p.credits:
                raise CreditflowError("idempotency_conflict",
                                      f"request_id {p.request_id} was already used for another refund")
            if record.status == "failed":
                return RefundLedgerResult(refund=record, balance=await _balance(conn, ledger))
            # Never more than was paid, counting every other refund of this charge (the account lock serializes them).
            row = await (await conn.execute(
                "SELECT coalesce(sum(amount_cents), 0) AS cents FROM refunds WHERE charge_id = %s"
                " AND status <> 'failed' AND id <> %s", (p.charge_id, record.id))).fetchone()
            assert row is not None
            amount_row = await (await conn.execute("SELECT amount_cents FROM stripe_charges WHERE id = %s",
                                                   (p.charge_id,))).fetchone()
            assert amount_row is not None
            if row["cents"] + record.amount_cents > amount_row["amount_cents"]:
                raise CreditflowError("refund_exceeds_remaining", "this purchase is already refunded")
            result = await (await conn.execute(
                "SELECT * FROM cf_refund_reserve(%s, %s, %s, %s, %s, %s, %s)",
                (ledger, record.lot_id, record.credits * MICROS_PER_CREDIT, f"sys:refund:{record.id}",
                 _hash("refund_reserve", record), _description(record),
                 to_jsonb({"refund_id": record.id, "purchase_transaction_id": p.purchase_txn_id,
                           "payment_intent_id": record.payment_intent_id, "reason": record.reason,
                           "amount_cents": record.amount_cents, "request_id": record.request_id})))).fetchone()
            assert result is not None
            await conn.execute("UPDATE refunds SET reserve_txn_id = %s, updated_at = now() WHERE id = %s"
                               " AND reserve_txn_id IS NULL", (result["txn_id"], record.id))
            record = await _load(conn, record.id)
            return RefundLedgerResult(refund=record, balance=await _balance(conn, ledger))
    except psycopg.Error as exc:
        mapped = _sql_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


async def refund_payment(pool: AsyncConnectionPool, gateway: StripeGateway, refund_id: str) -> RefundState:
    """The Stripe refund of this row: created once (``refunding`` committed first), retrieved on every later call."""
    async with pool.connection() as conn, conn.transaction():
        record = await _load(conn, refund_id, lock=True)
        if record.stripe_refund_id is None:
            if record.status == "failed" or record.reserve_txn_id is None:
                raise CreditflowError("refund_not_reserved", f"refund {refund_id} is not reserved")
            await conn.execute("UPDATE refunds SET status = 'refunding', updated_at = now() WHERE id = %s"
                               " AND status = 'reserved'", (refund_id,))
    async with pool.connection() as conn, conn.transaction():
        record = await _load(conn, refund_id, lock=True)
        if record.stripe_refund_id is not None:
            return await gateway.retrieve_refund(record.stripe_refund_id)
        refund = await gateway.create_refund(
            record.payment_intent_id, record.amount_cents, idempotency_key=f"creditflow:refund:{record.id}",
            metadata={ACCOUNT_METADATA_KEY: record.account_id, REFUND_METADATA_KEY: record.id,
                      "creditflow_reason": record.reason})
        await conn.execute("UPDATE refunds SET stripe_refund_id = %s, stripe_status = %s, updated_at = now()"
                           " WHERE id = %s", (refund.id, refund.status, refund_id))
    return refund


async def finalize(pool: AsyncConnectionPool, refund_id: str, stripe_refund_id: str,
                   stripe_status: str) -> RefundLedgerResult:
    """Stripe refunded the money: the row becomes ``succeeded`` (idempotent). A row that a later Stripe event
    reported failed (its credits released, ``apply_stripe_status``) is returned as it is."""
    try:
        async with pool.connection() as conn, conn.transaction():
            record = await _load(conn, refund_id, lock=True)
            if record.status == "failed" and record.stripe_status in STRIPE_FAILED:
                return RefundLedgerResult(refund=record, balance=await _record_balance(conn, record))
            return await _finalize_in(conn, refund_id, stripe_refund_id, stripe_status)
    except psycopg.Error as exc:
        mapped = _sql_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


async def _finalize_in(conn: Any, refund_id: str, stripe_refund_id: str, stripe_status: str) -> RefundLedgerResult:
    row = await (await conn.execute("SELECT * FROM cf_refund_finalize(%s, %s, %s)",
                                    (refund_id, stripe_refund_id, stripe_status))).fetchone()
    assert row is not None
    record = RefundRecord(**row)
    return RefundLedgerResult(refund=record, balance=await _record_balance(conn, record))


async def release(pool: AsyncConnectionPool, refund_id: str, *, failure_code: str,
                  failure_message: str | None) -> RefundLedgerResult:
    """Compensation: Stripe refused for good, so the reserved credits go back to the purchase's lot (once) and
    the row becomes ``failed``. A succeeded refund is never released here (only Stripe's own word that it failed
    afterwards releases it: ``apply_stripe_status``)."""
    async with pool.connection() as conn, conn.transaction():
        return await _release_in(conn, refund_id, failure_code=failure_code, failure_message=failure_message)


async def _release_in(conn: Any, refund_id: str, *, failure_code: str, failure_message: str | None,
                      stripe_status: str | None = None, after_success: bool = False) -> RefundLedgerResult:
    record = await _load(conn, refund_id, lock=True)
    if record.status == "succeeded" and not after_success:
        raise CreditflowError("idempotency_conflict", f"refund {refund_id} succeeded; it cannot be released")
    release_txn: UUID | None = record.release_txn_id
    if record.reserve_txn_id is not None and release_txn is None:
        ledger = await _lot_account(conn, record.lot_id, record.account_id)
        result = await (await conn.execute(
            "SELECT * FROM cf_refund_release(%s, %s, %s, %s, %s, %s, %s)",
            (ledger, record.lot_id, record.credits * MICROS_PER_CREDIT,
             f"sys:refund_release:{record.id}", _hash("refund_release", record),
             f"Refund reversed ({failure_code}): {record.credits:,} credits back",
             to_jsonb({"refund_id": record.id, "failure_code": failure_code,
                       "refund_transaction_id": record.transaction_id})))).fetchone()
        assert result is not None
        release_txn = result["txn_id"]
        await _satisfy_dispute_claims(conn, record)
    await conn.execute(
        "UPDATE refunds SET status = 'failed', release_txn_id = %s, failure_code = coalesce(failure_code, %s),"
        " failure_message = coalesce(failure_message, %s), stripe_status = coalesce(%s, stripe_status),"
        " finalized_at = NULL, updated_at = now() WHERE id = %s",
        (release_txn, failure_code, failure_message, stripe_status, refund_id))
    record = await _load(conn, refund_id)
    return RefundLedgerResult(refund=record, balance=await _record_balance(conn, record))


async def _satisfy_dispute_claims(conn: Any, record: RefundRecord) -> None:
    """The credits a released refund puts back into its purchase's lot go first to the disputes of that purchase
    that could not take them while the refund held them in reserve (``disputes``, migration 0023_3): journal
    ``dispute``, key ``sys:dispute:{dispute_id}:refund:{refund_id}``, in the release's transaction (so once). A
    dispute closed ``won`` / ``warning_closed`` claims nothing. Only the rest stays in the wallet."""
    claims = await (await conn.execute(
        "SELECT id, claimed_micros - taken_micros AS owed FROM disputes WHERE lot_id = %s"
        " AND taken_micros < claimed_micros AND status NOT IN ('won', 'warning_closed')"
        " ORDER BY created_at, id FOR UPDATE", (record.lot_id,))).fetchall()
    ledger = await _lot_account(conn, record.lot_id, record.account_id) if claims else record.account_id
    for claim in claims:
        row = await (await conn.execute(
            "SELECT cf_clawback_lot(%s, %s, %s, 'dispute', 'system:disputes', %s, %s, %s) AS taken",
            (ledger, record.lot_id, claim["owed"], f"sys:dispute:{claim['id']}:refund:{record.id}",
             f"Disputed payment {record.payment_intent_id}: credits released by refund {record.id}",
             to_jsonb({"payment_intent_id": record.payment_intent_id, "stripe_id": claim["id"],
                       "refund_id": record.id})))).fetchone()
        assert row is not None
        if row["taken"] > 0:
            await conn.execute("UPDATE disputes SET taken_micros = taken_micros + %s, updated_at = now()"
                               " WHERE id = %s", (row["taken"], claim["id"]))


# --- Stripe has not settled the refund yet (status pending / requires_action) ---------------------------------
# Stripe's statuses: succeeded and failed/canceled are final; anything else (pending, requires_action) is not.
STRIPE_SUCCEEDED = "succeeded"
STRIPE_FAILED = frozenset({"failed", "canceled"})
_DECIDED = frozenset({"succeeded", "failed"})  # row statuses that no longer wait for Stripe


async def mark_pending(pool: AsyncConnectionPool, refund_id: str, stripe_status: str) -> RefundLedgerResult:
    """Stripe accepted the refund without settling it: the row is ``pending`` and the credits stay reserved. A row
    that Stripe's webhook already decided is left as it is (and returned)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("UPDATE refunds SET status = 'pending', stripe_status = %s, updated_at = now()"
                           " WHERE id = %s AND status IN ('reserved', 'refunding', 'pending')",
                           (stripe_status, refund_id))
        record = await _load(conn, refund_id)
        return RefundLedgerResult(refund=record, balance=await _record_balance(conn, record))


async def settle_pending(pool: AsyncConnectionPool, gateway: StripeGateway, refund_id: str) -> RefundLedgerResult:
    """The workflow's poll of a pending refund: decided already (a webhook), or ask Stripe and apply its answer."""
    record = await get_refund(pool, refund_id)
    if record.status in _DECIDED or record.stripe_refund_id is None:
        async with pool.connection() as conn:
            return RefundLedgerResult(refund=record, balance=await _record_balance(conn, record))
    state = await gateway.retrieve_refund(record.stripe_refund_id)
    async with pool.connection() as conn, conn.transaction():
        return await apply_stripe_status(conn, refund_id, state.id, state.status, state.failure_reason)


async def apply_stripe_status(conn: Any, refund_id: str, stripe_refund_id: str, status: str,
                              failure_reason: str | None) -> RefundLedgerResult:
    """Stripe's word on one of our refunds, in the caller's transaction (a webhook event or the workflow's poll).

    ``succeeded`` finalizes (a released refund stays released); ``failed`` / ``canceled`` release the reserved
    credits back to the purchase's lot, once (key ``sys:refund_release:{refund_id}``), even after the refund was
    marked succeeded (Stripe can fail a refund after reporting it succeeded: the money did not go back, so the
    credits do); anything else only records Stripe's status on an undecided row."""
    record = await _load(conn, refund_id, lock=True)
    if status == STRIPE_SUCCEEDED:
        if record.status != "failed" and record.reserve_txn_id is not None:
            return await _finalize_in(conn, refund_id, stripe_refund_id, status)
    elif status in STRIPE_FAILED:
        if record.status != "failed":
            return await _release_in(conn, refund_id, failure_code="refund_failed",
                                     failure_message=f"Stripe reports the refund {status}"
                                     + (f" ({failure_reason})" if failure_reason else ""),
                                     stripe_status=status, after_success=True)
    elif record.status not in _DECIDED:
        await conn.execute(
            "UPDATE refunds SET stripe_status = %s, stripe_refund_id = coalesce(stripe_refund_id, %s),"
            " status = CASE WHEN status = 'refunding' THEN 'pending' ELSE status END, updated_at = now()"
            " WHERE id = %s", (status, stripe_refund_id, refund_id))
        record = await _load(conn, refund_id)
    return RefundLedgerResult(refund=record, balance=await _record_balance(conn, record))


async def apply_stripe_event(conn: Any, obj: dict[str, Any]) -> RefundRecord | None:
    """A Refund object from a signed Stripe event (``charge.refund.updated``, ``refund.updated``,
    ``refund.failed``): applied to the refund row it names (its Stripe id, or creditflow's id in its metadata);
    None if it is not one of creditflow's refunds. Runs in the webhook's transaction, so once per event."""
    stripe_id, status = obj.get("id"), obj.get("status")
    if not isinstance(stripe_id, str) or not isinstance(status, str):
        return None
    row = await (await conn.execute("SELECT id FROM refunds WHERE stripe_refund_id = %s", (stripe_id,))).fetchone()
    ours = (obj.get("metadata") or {}).get(REFUND_METADATA_KEY) if isinstance(obj.get("metadata"), dict) else None
    if row is None and isinstance(ours, str):
        row = await (await conn.execute(
            "SELECT id FROM refunds WHERE id = %s AND (stripe_refund_id IS NULL OR stripe_refund_id = %s)",
            (ours, stripe_id))).fetchone()
    if row is None:
        return None
    reason = obj.get("failure_reason")
    try:
        result = await apply_stripe_status(conn, row["id"], stripe_id, status,
                                           reason if isinstance(reason, str) else None)
    except psycopg.Error as exc:
        mapped = _sql_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    return result.refund


async def funded_system(pool: AsyncConnectionPool, account_id: str, payment_intent_id: str) -> str | None:
    """The named credit system a top-up funded (None: the wallet), for answers that report its balance."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT credit_system_id FROM stripe_charges WHERE account_id = %s"
                                        " AND payment_intent_id = %s", (account_id, payment_intent_id))).fetchone()
    return row["credit_system_id"] if row is not None else None


async def refunded_systems(pool: AsyncConnectionPool, records: list[RefundRecord]) -> dict[str, str]:
    """refund id -> the named credit system its purchase funded, for the refunds of ``records`` that have one."""
    if not records:
        return {}
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT l.id, a.credit_system_id FROM credit_lots l JOIN accounts a ON a.id = l.account_id"
            " WHERE l.id = ANY(%s) AND a.credit_system_id IS NOT NULL", ([r.lot_id for r in records],))).fetchall()
    systems = {row["id"]: row["credit_system_id"] for row in rows}
    return {r.id: systems[r.lot_id] for r in records if r.lot_id in systems}


async def find(pool: AsyncConnectionPool, account_id: str, request_id: str) -> RefundRecord | None:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT * FROM refunds WHERE account_id = %s AND request_id = %s",
                                        (account_id, request_id))).fetchone()
    return RefundRecord(**row) if row else None


async def get_refund(pool: AsyncConnectionPool, refund_id: str) -> RefundRecord:
    async with pool.connection() as conn:
        return await _load(conn, refund_id)


async def list_refunds(pool: AsyncConnectionPool, account_id: str, limit: int = 50,
                       cursor: Cursor | None = None) -> list[RefundRecord]:
    """The account's refunds, newest first; ``cursor``: the page after or before an item."""
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        where, params, order, reverse = await keyset(conn, "refunds", account_id, cursor)
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM refunds WHERE account_id = %s AND {} ORDER BY {} LIMIT %s").format(where, order),
            (account_id, *params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [RefundRecord(**row) for row in rows]


async def _load(conn: Any, refund_id: str, *, lock: bool = False) -> RefundRecord:
    row = await (await conn.execute("SELECT * FROM refunds WHERE id = %s" + (" FOR UPDATE" if lock else ""),
                                    (refund_id,))).fetchone()
    if row is None:
        raise CreditflowError("not_found", f"no refund {refund_id}")
    return RefundRecord(**row)


async def _load_by_request(conn: Any, account_id: str, request_id: str, *, lock: bool = False) -> RefundRecord:
    row = await (await conn.execute("SELECT * FROM refunds WHERE account_id = %s AND request_id = %s"
                                    + (" FOR UPDATE" if lock else ""), (account_id, request_id))).fetchone()
    if row is None:
        raise CreditflowError("not_found", f"no refund for request {request_id}")
    return RefundRecord(**row)


async def _balance_micros(conn: Any, account_id: str) -> int:
    row = await (await conn.execute("SELECT balance_micros FROM balances WHERE account_id = %s",
                                    (account_id,))).fetchone()
    return int(row["balance_micros"]) if row else 0


async def _balance(conn: Any, account_id: str) -> Decimal:
    return micros_to_credits(await _balance_micros(conn, account_id))


async def _record_balance(conn: Any, record: RefundRecord) -> Decimal:
    """The balance a refund moved: its purchase lot's account's (the wallet, or a named credit system's)."""
    return await _balance(conn, await _lot_account(conn, record.lot_id, record.account_id))

