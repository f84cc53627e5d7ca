"""Read side of the ledger: balance, transaction history, usage items and daily rollups."""

from __future__ import annotations

import base64
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ledger.models import (
    Balance,
    Balances,
    Transaction,
    TransactionPage,
    UsageItem,
    UsageRollup,
    exact,
)


async def balance(pool: AsyncConnectionPool, account_id: str) -> Balance:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT balance_micros, cf_live_held(account_id, held_micros) AS held_micros, floor_micros, updated_at"
            " FROM balances WHERE account_id = %s",
            (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return Balance(account_id=account_id, last_updated=row["updated_at"],
                   **Balances.from_micros(row["balance_micros"], row["held_micros"],
                                         row["floor_micros"]).model_dump())


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CreditflowError("validation_error", "malformed cursor") from exc


async def transactions(pool: AsyncConnectionPool, account_id: str, *, limit: int = 50,
                       cursor: str | None = None, type: str | None = None) -> TransactionPage:
    """Newest first; ``cursor`` continues after the last item of the previous page."""
    before = _decode_cursor(cursor) if cursor else None
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT seq, id, type, amount_micros, description, balance_after_micros, created_at, metadata"
            " FROM journal_transactions WHERE account_id = %(a)s"
            " AND (%(t)s::text IS NULL OR type = %(t)s) AND (%(b)s::bigint IS NULL OR seq < %(b)s)"
            " ORDER BY seq DESC LIMIT %(l)s",
            {"a": account_id, "t": type, "b": before, "l": limit + 1})).fetchall()
        total = await (await conn.execute(
            "SELECT count(*) AS n FROM journal_transactions WHERE account_id = %(a)s"
            " AND (%(t)s::text IS NULL OR type = %(t)s)", {"a": account_id, "t": type})).fetchone()
    items = [
        Transaction(id=r["id"], type=r["type"], amount=micros_to_credits(r["amount_micros"]),
                    description=r["description"],
                    balance_after=None if r["balance_after_micros"] is None
                    else micros_to_credits(r["balance_after_micros"]),
                    created_at=r["created_at"], metadata=r["metadata"])
        for r in rows[:limit]
    ]
    next_cursor = _encode_cursor(rows[limit - 1]["seq"]) if len(rows) > limit else None
    return TransactionPage(items=items, total=total["n"], next_cursor=next_cursor)


async def usage_items(pool: AsyncConnectionPool, account_id: str, *, start: datetime | None = None,
                      end: datetime | None = None, agent_id: str | None = None,
                      limit: int = 100) -> list[UsageItem]:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT * FROM usage_items WHERE account_id = %(a)s"
            " AND (%(s)s::timestamptz IS NULL OR created_at >= %(s)s)"
            " AND (%(e)s::timestamptz IS NULL OR created_at < %(e)s)"
            " AND (%(g)s::text IS NULL OR agent_id = %(g)s)"
            " ORDER BY created_at DESC, id LIMIT %(l)s",
            {"a": account_id, "s": start, "e": end, "g": agent_id, "l": limit})).fetchall()
    return [
        UsageItem(id=r["id"], channel=r["channel"], feature=r["feature_id"], quantity=exact(r["quantity"]),
                  credits_per_unit=exact(r["credits_per_unit"]),
                  credits=micros_to_credits(r["credits_micros"]), agent_id=r["agent_id"],
                  transaction_id=r["txn_id"], created_at=r["created_at"], metadata=r["metadata"])
        for r in rows
    ]


async def usage_rollups(pool: AsyncConnectionPool, account_id: str, *, start: datetime | None = None,
                        end: datetime | None = None) -> list[UsageRollup]:
    """Daily (UTC) totals per channel."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT to_char(date_trunc('day', created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') AS day, channel,"
            " sum(quantity) AS quantity, sum(credits_micros) AS micros, count(*) AS events"
            " FROM usage_items WHERE account_id = %(a)s"
            " AND (%(s)s::timestamptz IS NULL OR created_at >= %(s)s)"
            " AND (%(e)s::timestamptz IS NULL OR created_at < %(e)s)"
            " GROUP BY 1, 2 ORDER BY 1 DESC, 2", {"a": account_id, "s": start, "e": end})).fetchall()
    return [UsageRollup(date=r["day"], channel=r["channel"], quantity=exact(r["quantity"]),
                        credits=micros_to_credits(int(r["micros"])), events=r["events"]) for r in rows]
