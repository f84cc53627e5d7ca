"""Reading credit lots: always settle the account's deferred burns first (the hot path records
what the lots owe on the balance row and burns them lazily, in order)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.lots import LotSource
from creditflow.domain.money import micros_to_credits
from creditflow.ledger.models import txn_id


class CreditLot(BaseModel):
    id: str
    source: LotSource
    original: Decimal
    remaining: Decimal
    expires_at: datetime | None
    created_at: datetime
    transaction_id: str
    # Money paid for the lot (purchases, auto-recharges); None for grants nobody paid for. Its price with ``original``.
    paid_cents: int | None = None


async def account_lots(pool: AsyncConnectionPool, account_id: str, *, include_depleted: bool = False
                       ) -> list[CreditLot]:
    """The account's lots in burn order, exact as of now (pending burns applied in the same transaction)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT cf_settle_account_burns(%s)", (account_id,))
        rows = await (await conn.execute(
            "SELECT * FROM credit_lots WHERE account_id = %s AND (%s OR NOT depleted)"
            " ORDER BY priority, expires_at NULLS LAST, created_at, id", (account_id, include_depleted))).fetchall()
    return [CreditLot(id=r["id"], source=LotSource(r["source"]), original=micros_to_credits(r["original_micros"]),
                      remaining=micros_to_credits(r["remaining_micros"]), expires_at=r["expires_at"],
                      created_at=r["created_at"], transaction_id=txn_id(r["txn_id"]) or "",
                      paid_cents=r["paid_cents"]) for r in rows]
