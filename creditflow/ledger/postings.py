"""Non-usage movements of credits (grants, manual adjustments, later purchases and refunds):
one journal row each against a system book, idempotent by key in the same transaction."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource, lot_priority
from creditflow.domain.money import credits_to_micros, micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger.db import to_jsonb, with_retry
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.models import Balances, PostingResult, txn_id
from creditflow.metadata import check_metadata

# Codes raised by cf_post (SQLSTATE -> our code).
_SQLSTATE_CODES = {"CF400": "invalid_amount", "CF402": "insufficient_credits", "CF404": "unknown_account",
                   "CF409": "idempotency_conflict"}


async def post(
    pool: AsyncConnectionPool,
    *,
    account_id: str,
    type: str,
    amount_micros: int,
    counter_book: str,
    description: str,
    idempotency_key: str,
    metadata: dict[str, Any] | None = None,
    lot_source: LotSource = LotSource.ADJUSTMENT,
    lot_expires_at: datetime | None = None,
    lot_paid_cents: int | None = None,
    with_entry: Callable[[AsyncConnection[Any], str], Awaitable[None]] | None = None,
) -> PostingResult:
    """Move ``amount_micros`` into (positive: a new credit lot) or out of (negative: burns lots,
    never below the floor) the wallet, against ``counter_book`` (``system:...``).

    Same key and same request returns the first result (``replayed``); same key with another
    request is ``idempotency_conflict``. The key is stored with the effect, never before it.

    ``lot_paid_cents``: the money paid for a purchased grant, stored on its lot in the same transaction (the
    lot's price: refunds and disputes move its credits and money in that proportion). Not part of the
    request's fingerprint: the caller's metadata carries the amount.

    ``with_entry``: writes that must commit with the entry (or with its replay), given the connection and the
    transaction id, e.g. the charge row that names the entry: never one without the other."""
    check_token(idempotency_key, "idempotency_key")
    if metadata:
        check_metadata(metadata)
    fingerprint = request_hash("post", type, amount_micros, counter_book, description, lot_source.value,
                               lot_expires_at.isoformat() if lot_expires_at else None, metadata=metadata)
    params = (account_id, type, amount_micros, counter_book, description, to_jsonb(metadata), lot_source.value,
              lot_priority(lot_source), lot_expires_at, idempotency_key, fingerprint)

    async def run() -> PostingResult:
        try:
            async with pool.connection() as conn, conn.transaction():
                row = await (await conn.execute(
                    "SELECT * FROM cf_post(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", params)).fetchone()
                if lot_paid_cents is not None and row is not None and row["lot_id"] is not None:
                    await conn.execute("UPDATE credit_lots SET paid_cents = %s WHERE id = %s AND paid_cents IS NULL",
                                       (lot_paid_cents, row["lot_id"]))
                if with_entry is not None and row is not None:
                    await with_entry(conn, txn_id(row["txn_id"]) or "")
        except psycopg.Error as exc:
            code = _SQLSTATE_CODES.get(exc.diag.sqlstate or "")
            if code is None:
                raise
            raise CreditflowError(code, str(exc.diag.message_primary)) from exc
        assert row is not None
        return PostingResult(
            transaction_id=txn_id(row["txn_id"]) or "", amount=micros_to_credits(row["amount_micros"]),
            replayed=row["replayed"], lot_id=row["lot_id"],
            balances=Balances.from_micros(row["balance_micros"], row["held_micros"], row["floor_micros"]))

    return await with_retry(run)


async def adjust(pool: AsyncConnectionPool, *, account_id: str, amount_credits: int, reason: str,
                 idempotency_key: str, actor: str = "admin",
                 metadata: dict[str, Any] | None = None) -> PostingResult:
    """Manual credit (positive) or debit (negative) by an operator, with a reason, as a journal entry.

    A debit never takes the balance below its floor."""
    if not reason.strip():
        raise CreditflowError("validation_error", "a reason is required for a manual adjustment")
    check_token(idempotency_key, "idempotency_key")
    return await post(
        pool, account_id=account_id, type="adjustment", amount_micros=credits_to_micros(amount_credits),
        counter_book="system:adjustments", description=reason.strip(), idempotency_key=f"adj:{idempotency_key}",
        metadata={"reason": reason.strip(), "actor": actor, **(metadata or {})},
        lot_source=LotSource.ADJUSTMENT,
    )
