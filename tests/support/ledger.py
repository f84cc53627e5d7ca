"""Ledger helpers for tests: the invariants every test ends with, journal and invoice rows, direct accounts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import quote

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ids import new_id
from creditflow.ledger import accounts
from creditflow.ledger.db import open_pool
from creditflow.payments import topups


async def journal(pool: AsyncConnectionPool, account: str, *types: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT type, amount_micros, idempotency_key FROM journal WHERE account_id = %s AND type = ANY(%s)"
            " ORDER BY seq", (account, list(types)))).fetchall()


async def invoices(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT period_start, status, amount_due_cents FROM invoices WHERE account_id = %s ORDER BY period_start",
            (account,))).fetchall()


async def journal_rows(pool: AsyncConnectionPool, account: str, type_: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT id, amount_micros, idempotency_key FROM journal WHERE account_id = %s AND type = %s ORDER BY seq",
            (account, type_))).fetchall()


async def assert_invariants(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        unbalanced = await (await conn.execute(
            "SELECT txn_id FROM journal_lines GROUP BY txn_id HAVING sum(amount_micros) <> 0")).fetchall()
        assert unbalanced == []
        total = await (await conn.execute(
            "SELECT coalesce(sum(amount_micros), 0) AS s FROM journal_lines")).fetchone()
        assert total["s"] == 0
        drift = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(amount_micros) AS s"
            " FROM journal_lines WHERE book = 'wallet' GROUP BY account_id) e USING (account_id)"
            " WHERE b.balance_micros <> coalesce(e.s, 0)")).fetchall()
        assert drift == []
        below = await (await conn.execute(
            "SELECT account_id FROM balances WHERE balance_micros - held_micros < floor_micros")).fetchall()
        assert below == []
        held = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(amount_micros) AS s FROM holds"
            " WHERE status = 'active' GROUP BY account_id) h USING (account_id)"
            " WHERE b.held_micros <> coalesce(h.s, 0)")).fetchall()
        assert held == []
        # Lots hold the positive part of the balance, less the usage not yet burned from them...
        lots = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(remaining_micros) AS s"
            " FROM credit_lots GROUP BY account_id) l USING (account_id)"
            " WHERE greatest(b.balance_micros, 0) <> coalesce(l.s, 0) - b.unburned_micros")).fetchall()
        assert lots == []
        # Plan credits left (migration 0013) are the plan lots less the usage they still owe (plan lots burn first).
        plan = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(remaining_micros) AS s"
            " FROM credit_lots WHERE source = 'plan' GROUP BY account_id) l USING (account_id)"
            " WHERE b.plan_left_micros <> greatest(0, coalesce(l.s, 0) - b.unburned_micros)")).fetchall()
        assert plan == []
        # ... and after settling the pending burns, exactly the positive part.
        accounts_ = [r["account_id"] for r in await (await conn.execute("SELECT account_id FROM balances")).fetchall()]
        for account_id in accounts_:
            await conn.execute("SELECT cf_settle_account_burns(%s)", (account_id,))
        settled = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(remaining_micros) AS s"
            " FROM credit_lots GROUP BY account_id) l USING (account_id)"
            " WHERE greatest(b.balance_micros, 0) <> coalesce(l.s, 0) OR b.unburned_micros <> 0")).fetchall()
        assert settled == []
        # Each account's journal replays to its stored balance, row after row.
        history = await (await conn.execute(
            "SELECT id FROM (SELECT id, balance_after_micros, sum(amount_micros) OVER (PARTITION BY account_id"
            " ORDER BY seq) AS running FROM journal) j WHERE running <> balance_after_micros")).fetchall()
        assert history == []
        usage = await (await conn.execute(
            "SELECT id FROM journal WHERE type = 'usage' AND amount_micros <> -round(quantity * credits_per_unit"
            " * 1000000) + coalesce((metadata ->> 'uncovered_micros')::bigint, 0)")).fetchall()
        # (a hold settled after the floor stopped covering it charges less: uncovered_micros, migration 0024)
        assert usage == []


M = MICROS_PER_CREDIT


async def new_account(pool: AsyncConnectionPool, bonus: int = 0) -> str:
    account = await accounts.create_account(pool, name="Verify Co", billing_email="ops@verify.test",
                                            welcome_bonus_credits=bonus)
    return account.id


async def paid_purchase(pool: AsyncConnectionPool, account_id: str, *, cents: int, credits: int) -> dict[str, Any]:
    """A top-up Stripe reported paid, credited through the production path (``topups.credit``)."""
    charge_id, pi = new_id("chg"), f"pi_{uuid.uuid4().hex[:24]}"
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO stripe_charges (id, account_id, request_id, kind, amount_cents, credits, description,"
            " customer_id, payment_intent_id) VALUES (%s, %s, %s, 'topup', %s, %s, 'Credits', 'cus_test', %s)",
            (charge_id, account_id, f"r-{pi}", cents, credits, pi))
    await topups.credit(pool, charge_id)
    async with pool.connection() as conn:
        lot = await (await conn.execute(
            "SELECT l.id FROM credit_lots l JOIN stripe_charges c ON l.txn_id = substr(c.ledger_txn_id, 5)::uuid"
            " WHERE c.id = %s", (charge_id,))).fetchone()
    assert lot is not None
    return {"charge_id": charge_id, "payment_intent_id": pi, "lot_id": lot["id"]}


@asynccontextmanager
async def clock_pool(database_url: str, at: datetime) -> AsyncIterator[AsyncConnectionPool]:
    """A pool whose sessions run on the ledger clock set to ``at`` (what ``creditflow simulate`` does)."""
    sep = "&" if "?" in database_url else "?"
    pool = open_pool(f"{database_url}{sep}options={quote(f'-c creditflow.now={at.isoformat()}')}", 1, 2)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()
