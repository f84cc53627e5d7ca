"""Accounts: created atomically with their balance row, welcome bonus lot and outbox event."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource, lot_priority
from creditflow.domain.money import credits_to_micros
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.models import Account, Balances, credits
from creditflow.ledger.pagination import Cursor, keyset

WELCOME_DESCRIPTION = "Welcome credits for new account"


async def create_account(
    pool: AsyncConnectionPool,
    *,
    name: str,
    billing_email: str,
    external_id: str | None = None,
    welcome_bonus_credits: int = 5000,
    overage_credit_line: int = 0,
) -> Account:
    """Create an account, its wallet, the welcome bonus and the ``account.created`` outbox row in
    one transaction, so creating an account never depends on Temporal being up."""
    account_id = new_id("acc")
    line_micros = credits_to_micros(overage_credit_line)
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute(
            "INSERT INTO accounts (id, name, billing_email, external_id, overage_credit_line_micros)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (external_id) DO NOTHING RETURNING id",
            (account_id, name, billing_email, external_id, line_micros),
        )).fetchone()
        if row is None:
            existing = await (await conn.execute(
                "SELECT id FROM accounts WHERE external_id = %s", (external_id,))).fetchone()
            raise CreditflowError("account_exists", f"an account with external_id {external_id!r} exists",
                                  details={"account_id": existing["id"] if existing else None})
        await conn.execute("INSERT INTO balances (account_id, floor_micros) VALUES (%s, %s)",
                           (account_id, -line_micros))
        if welcome_bonus_credits > 0:
            await conn.execute(
                "SELECT cf_post(%s, 'welcome_bonus', %s, 'system:promotions', %s, NULL, %s, %s, NULL,"
                " 'sys:welcome_bonus', %s)",
                (account_id, credits_to_micros(welcome_bonus_credits), WELCOME_DESCRIPTION,
                 LotSource.WELCOME_BONUS.value, lot_priority(LotSource.WELCOME_BONUS),
                 request_hash("welcome_bonus", welcome_bonus_credits)),
            )
        await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES (%s, 'account.created', %s, %s)",
            (account_id, f"account.created:{account_id}",
             Jsonb({"account_id": account_id, "name": name, "billing_email": billing_email})),
        )
    return await get_account(pool, account_id)


async def get_account(pool: AsyncConnectionPool, account_id: str) -> Account:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT a.*, b.balance_micros, cf_live_held(a.id, b.held_micros) AS held_micros, b.floor_micros"
            " FROM accounts a"
            " JOIN balances b ON b.account_id = a.id WHERE a.id = %s", (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return _account(row)


async def account_exists(pool: AsyncConnectionPool, account_id: str) -> bool:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
    return row is not None


def _account(row: dict[str, Any]) -> Account:
    return Account(
        id=row["id"], name=row["name"], billing_email=row["billing_email"], external_id=row["external_id"],
        status=row["status"], overage_credit_line=credits(row["overage_credit_line_micros"]) or Decimal(0),
        created_at=row["created_at"],
        balance=Balances.from_micros(row["balance_micros"], row["held_micros"], row["floor_micros"]),
    )


async def list_accounts(pool: AsyncConnectionPool, *, limit: int, cursor: Cursor | None = None, q: str | None = None,
                        status: str | None = None, external_id: str | None = None) -> list[Account]:
    """Accounts newest first (the platform's view), filtered by ``q`` (a case-insensitive substring of name,
    billing email or external id), ``status`` and an exact ``external_id``; paged by ``cursor``."""
    async with pool.connection() as conn:
        where, params, order, reverse = await keyset(conn, "accounts", None, cursor)
        pattern = None if q is None else "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await (await conn.execute(sql.SQL(
            "SELECT a.*, b.balance_micros, cf_live_held(a.id, b.held_micros) AS held_micros, b.floor_micros"
            " FROM (SELECT * FROM accounts WHERE {} AND parent_account_id IS NULL"
            "  AND (%s::text IS NULL OR name ILIKE %s OR billing_email ILIKE %s OR external_id ILIKE %s)"
            "  AND (%s::text IS NULL OR status = %s) AND (%s::text IS NULL OR external_id = %s)"
            "  ORDER BY {} LIMIT %s) a JOIN balances b ON b.account_id = a.id ORDER BY {}"
        ).format(where, order, order),
            (*params, pattern, pattern, pattern, pattern, status, status, external_id, external_id, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [_account(row) for row in rows]
