"""Non-usage movements of credits (grants, manual adjustments, later purchases and refunds):
one balanced journal transaction each, idempotent by key, stored in the same transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource, lot_priority
from creditflow.domain.money import credits_to_micros, micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger.db import with_retry
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.models import Balances, PostingResult

# Codes raised by cf_post (SQLSTATE -> our code).
_SQLSTATE_CODES = {"CF400": "invalid_amount", "CF402": "insufficient_credits", "CF404": "unknown_account"}


def _result(data: dict[str, Any], replayed: bool = False) -> PostingResult:
    return PostingResult(
        transaction_id=data["transaction_id"], amount=micros_to_credits(data["amount_micros"]),
        replayed=replayed,
        balances=Balances.from_micros(data["balance_micros"], data["held_micros"], data["floor_micros"]),
    )


async def post(
    pool: AsyncConnectionPool,
    *,
    account_id: str,
    type: str,
    amount_micros: int,
    book: str,
    description: str,
    idempotency_key: str,
    metadata: dict[str, Any] | None = None,
    lot_source: LotSource = LotSource.ADJUSTMENT,
    lot_expires_at: datetime | None = None,
    enforce_floor: bool = True,
) -> PostingResult:
    """Move ``amount_micros`` into (positive) or out of (negative) the wallet against ``book``.

    Same key and same request returns the first result (``replayed``); same key with another
    request is ``idempotency_conflict``. The key is stored with the effect, never before it."""
    check_token(idempotency_key, "idempotency_key")
    fingerprint = request_hash("post", type=type, amount=amount_micros, book=book, description=description,
                               metadata=metadata or {}, source=lot_source.value,
                               expires=lot_expires_at.isoformat() if lot_expires_at else None)

    async def run() -> PostingResult:
        async with pool.connection() as conn, conn.transaction():
            locked = await (await conn.execute(
                "SELECT 1 FROM balances WHERE account_id = %s FOR UPDATE", (account_id,))).fetchone()
            if locked is None:
                raise CreditflowError("unknown_account", f"no account {account_id}")
            seen = await (await conn.execute(
                "SELECT request_hash, response FROM idempotency_keys WHERE account_id = %s AND key = %s",
                (account_id, idempotency_key))).fetchone()
            if seen is not None:
                if seen["request_hash"] != fingerprint:
                    raise CreditflowError("idempotency_conflict",
                                          "this idempotency key was used for a different request")
                return _result(seen["response"], replayed=True)
            try:
                row = await (await conn.execute(
                    "SELECT cf_post(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) AS r",
                    (account_id, type, amount_micros, book, description, Jsonb(metadata or {}),
                     lot_source.value, lot_priority(lot_source), lot_expires_at, enforce_floor))).fetchone()
            except psycopg.Error as exc:
                code = _SQLSTATE_CODES.get(exc.diag.sqlstate or "")
                if code is None:
                    raise
                raise CreditflowError(code, str(exc.diag.message_primary)) from exc
            await conn.execute(
                "INSERT INTO idempotency_keys (account_id, key, request_hash, response) VALUES (%s, %s, %s, %s)",
                (account_id, idempotency_key, fingerprint, Jsonb(row["r"])))
        return _result(row["r"])

    return await with_retry(run)


async def adjust(pool: AsyncConnectionPool, *, account_id: str, amount_credits: int, reason: str,
                 idempotency_key: str, actor: str = "admin",
                 metadata: dict[str, Any] | None = None) -> PostingResult:
    """Manual credit (positive) or debit (negative) by an operator, with a reason, as a journal entry.

    A debit never takes the balance below its floor."""
    if not reason.strip():
        raise CreditflowError("validation_error", "a reason is required for a manual adjustment")
    return await post(
        pool, account_id=account_id, type="adjustment", amount_micros=credits_to_micros(amount_credits),
        book="system:adjustments", description=reason.strip(), idempotency_key=idempotency_key,
        metadata={"reason": reason.strip(), "actor": actor, **(metadata or {})},
        lot_source=LotSource.ADJUSTMENT,
    )
