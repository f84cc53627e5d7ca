"""Subscriptions and their billing cycle in the ledger.

The account workflow is the only writer of cycle state: it calls these (through activities) to start a
subscription, close a period and open the next. Every step is idempotent on its own: the grant and the
expiry are journal rows keyed by the period (``sys:plan_grant:{period_key}``, ``sys:plan_expiry:{period_key}``),
and the facts of a closed period (``billing_periods``) are written once and read back on a retry, so a worker
killed in the middle of a renewal produces one grant, one expiry and one invoice.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.domain.invoices import billable_overage_micros
from creditflow.domain.lots import LotSource
from creditflow.domain.money import credits_to_micros, micros_to_credits
from creditflow.domain.periods import Period
from creditflow.domain.plans import Plan
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.ledger import credit_systems, postings

PLAN_BOOK = "system:plan_credits"


class Subscription(BaseModel):
    account_id: str
    plan_id: str
    status: str
    anchor_at: datetime
    period_index: int
    period_start: datetime
    period_end: datetime
    pending_plan_id: str | None = None
    created_at: datetime
    updated_at: datetime


class RecurringCharge(BaseModel):
    id: str
    account_id: str
    description: str
    quantity: int
    unit: str
    unit_price_micros: int
    active: bool
    created_at: datetime


class ClosedPeriod(BaseModel):
    """What a renewal recorded about the period it closed (the invoice is built from it)."""

    account_id: str
    period_key: str
    period_index: int
    period_start: datetime
    period_end: datetime
    plan_id: str
    fee_cents: int
    overage_micros: int
    recurring: list[dict[str, Any]] = Field(default_factory=list)
    adjustments: list[dict[str, Any]] = Field(default_factory=list)


async def get_subscription(pool: AsyncConnectionPool, account_id: str) -> Subscription | None:
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        row = await (await conn.execute("SELECT * FROM subscriptions WHERE account_id = %s", (account_id,))
                     ).fetchone()
    return Subscription(**row) if row else None


async def save_subscription(pool: AsyncConnectionPool, account_id: str, *, plan_id: str, period: Period,
                            pending_plan_id: str | None, status: str = "active") -> Subscription:
    """Write the workflow's cycle state (insert or replace).

    The account's ``balances.plan_id`` (what the metering hot path prices with, migration 0013) is set to the plan
    of an active subscription, or cleared, in the same transaction: the balances row is locked first, as every
    writer of an account's money does."""
    async with pool.connection() as conn, conn.transaction():
        locked = await (await conn.execute(
            "UPDATE balances SET plan_id = %s WHERE account_id = %s RETURNING account_id",
            (plan_id if status == "active" else None, account_id))).fetchone()
        if locked is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        row = await (await conn.execute(
            "INSERT INTO subscriptions (account_id, plan_id, status, anchor_at, period_index, period_start, period_end,"
            " pending_plan_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (account_id) DO UPDATE SET"
            " plan_id = EXCLUDED.plan_id, status = EXCLUDED.status, anchor_at = EXCLUDED.anchor_at,"
            " period_index = EXCLUDED.period_index, period_start = EXCLUDED.period_start,"
            " period_end = EXCLUDED.period_end, pending_plan_id = EXCLUDED.pending_plan_id, updated_at = now()"
            " RETURNING *",
            (account_id, plan_id, status, period.anchor, period.index, period.start, period.end, pending_plan_id))
        ).fetchone()
    assert row is not None
    return Subscription(**row)


async def grant_plan_credits(pool: AsyncConnectionPool, account_id: str, plan: Plan, period: Period,
                             credits: int | None = None, key_suffix: str = "") -> str | None:
    """The plan's credits for ``period`` (expiring at its end), once per period; returns the transaction id.

    A whole period's grant (``credits`` None) also grants the plan's credits in named credit systems, each into that
    system's balance, on the same key there (a proration grant, ``credits`` given, is the wallet's only)."""
    if credits is None:
        for system_id, included in plan.included_system_credits.items():
            if included > 0:
                sub = await credit_systems.system_account_for_posting(pool, account_id, system_id, grant=True)
                await _post_plan_grant(pool, sub, plan, period, included, key_suffix)
    amount = plan.included_credits if credits is None else credits
    if amount <= 0:
        return None
    return await _post_plan_grant(pool, account_id, plan, period, amount, key_suffix)


async def _post_plan_grant(pool: AsyncConnectionPool, account_id: str, plan: Plan, period: Period, amount: int,
                           key_suffix: str) -> str:
    result = await postings.post(
        pool, account_id=account_id, type="plan_grant", amount_micros=credits_to_micros(amount),
        counter_book=PLAN_BOOK, description=f"{plan.name} plan credits ({period.key})",
        idempotency_key=f"sys:plan_grant:{period.key}{key_suffix}",
        metadata={"plan_id": plan.id, "period_key": period.key}, lot_source=LotSource.PLAN,
        lot_expires_at=period.end)
    return result.transaction_id


async def expire_plan_credits(pool: AsyncConnectionPool, account_id: str, period: Period, plan_name: str,
                              key_suffix: str = "") -> int:
    """Expire what is left of the plan credits (to breakage), once per period; returns the micro-credits expired
    from the wallet. The plan credits of named credit systems expire with them, each in its system, on the same key."""
    for sub in await credit_systems.sub_accounts(pool, account_id):
        async with pool.connection() as conn:
            await conn.execute(
                "SELECT cf_expire_plan_credits(%s, %s, %s, %s, %s)",
                (sub, f"sys:plan_expiry:{period.key}{key_suffix}",
                 f"Unused {plan_name} plan credits expired ({period.key})", 2**63 - 1, period.end))
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT cf_expire_plan_credits(%s, %s, %s, %s, %s) AS expired",
            (account_id, f"sys:plan_expiry:{period.key}{key_suffix}",
             f"Unused {plan_name} plan credits expired ({period.key})", 2**63 - 1, period.end))).fetchone()
    assert row is not None
    return int(row["expired"])


async def expire_some_plan_credits(pool: AsyncConnectionPool, account_id: str, period: Period, plan_name: str,
                                   max_credits: int, key_suffix: str) -> int:
    """Expire at most ``max_credits`` of the plan credits (a downgrade), once per key; returns the micros expired."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT cf_expire_plan_credits(%s, %s, %s, %s, %s) AS expired",
            (account_id, f"sys:plan_expiry:{period.key}{key_suffix}",
             f"{plan_name} plan credits given back (plan change, {period.key})",
             credits_to_micros(max_credits), period.end))).fetchone()
    assert row is not None
    return int(row["expired"])


async def add_adjustments(pool: AsyncConnectionPool, account_id: str, period: Period, change_seq: int,
                          lines: list[tuple[str, int]]) -> None:
    """Proration lines for the period's invoice, written once per change."""
    async with pool.connection() as conn:
        for line, (description, cents) in enumerate(lines):
            await conn.execute(
                "INSERT INTO billing_adjustments (account_id, period_key, change_seq, line, description, amount_cents)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (account_id, period.key, change_seq, line, description, cents))


async def plan_credits_left(pool: AsyncConnectionPool, account_id: str) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT cf_plan_credits_left(%s) AS left", (account_id,))).fetchone()
    assert row is not None
    return int(row["left"])


async def close_period(pool: AsyncConnectionPool, account_id: str, period: Period, plan: Plan) -> ClosedPeriod:
    """Record the closing facts of ``period`` once (the overage drawn is read before the next grant repays it,
    less what earlier invoices billed and the line still carries; the recurring charges as they are now); a retry
    returns the first record."""
    async with pool.connection() as conn, conn.transaction():
        balance = await (await conn.execute(
            "SELECT balance_micros FROM balances WHERE account_id = %s FOR UPDATE", (account_id,))).fetchone()
        if balance is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        recurring = [
            {"id": r["id"], "description": r["description"], "quantity": r["quantity"], "unit": r["unit"],
             "unit_price_micros": r["unit_price_micros"]}
            for r in await (await conn.execute(
                # A charge whose month overlapping this period was paid from the wallet (before the plan began:
                # number rental in the wallet, migration 0030_2) is not billed again: never both.
                "SELECT * FROM recurring_charges c WHERE account_id = %s AND active AND NOT EXISTS ("
                " SELECT 1 FROM rental_charges x WHERE x.charge_id = c.id AND x.status = 'paid'"
                " AND x.period_key::date < %s::date AND x.period_key::date + interval '1 month' > %s::date)"
                " ORDER BY created_at, id", (account_id, period.end, period.start))).fetchall()]
        adjustments = [
            {"description": r["description"], "amount_cents": r["amount_cents"]}
            for r in await (await conn.execute(
                "SELECT description, amount_cents FROM billing_adjustments WHERE account_id = %s AND period_key = %s"
                " ORDER BY change_seq, line", (account_id, period.key))).fetchall()]
        # Overage already billed by an earlier period and still drawn is not billed again (migration 0024).
        still_open = await (await conn.execute("SELECT cf_overage_sync(%s) AS open", (account_id,))).fetchone()
        assert still_open is not None
        overage = billable_overage_micros(max(0, -int(balance["balance_micros"])), int(still_open["open"]))
        await conn.execute(
            "INSERT INTO billing_periods (account_id, period_key, period_index, period_start, period_end, plan_id,"
            " fee_cents, overage_micros, overage_open_micros, recurring, adjustments)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (account_id, period_key) DO NOTHING",
            (account_id, period.key, period.index, period.start, period.end, plan.id, plan.monthly_fee_cents,
             overage, overage, Jsonb(recurring), Jsonb(adjustments)))
        row = await (await conn.execute(
            "SELECT account_id, period_key, period_index, period_start, period_end, plan_id, fee_cents,"
            " overage_micros, recurring, adjustments FROM billing_periods WHERE account_id = %s AND period_key = %s",
            (account_id, period.key))).fetchone()
    assert row is not None
    return ClosedPeriod(**row)


async def list_recurring(pool: AsyncConnectionPool, account_id: str) -> list[RecurringCharge]:
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        rows = await (await conn.execute(
            "SELECT * FROM recurring_charges WHERE account_id = %s AND active ORDER BY created_at, id", (account_id,))
        ).fetchall()
    return [RecurringCharge(**row) for row in rows]


async def add_recurring(pool: AsyncConnectionPool, account_id: str, *, description: str, quantity: int,
                        unit: str, unit_price_credits: Decimal) -> RecurringCharge:
    """A charge billed on every invoice from the next one on (e.g. 3 phone numbers at 150 credits)."""
    if not 0 < quantity <= 100_000:
        raise CreditflowError("validation_error", "quantity must be between 1 and 100,000")
    price = credits_to_micros(unit_price_credits)
    if price < 0 or unit_price_credits > Decimal(10_000_000):
        raise CreditflowError("invalid_amount", "unit_price must be between 0 and 10,000,000 credits")
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        row = await (await conn.execute(
            "INSERT INTO recurring_charges (id, account_id, description, quantity, unit, unit_price_micros)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING *",
            (new_id("rc"), account_id, description, quantity, unit, price))).fetchone()
    assert row is not None
    return RecurringCharge(**row)


async def remove_recurring(pool: AsyncConnectionPool, account_id: str, charge_id: str) -> RecurringCharge:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE recurring_charges SET active = false WHERE id = %s AND account_id = %s AND active RETURNING *",
            (charge_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("not_found", f"no recurring charge {charge_id}")
    return RecurringCharge(**row)


def credits(micros: int) -> Decimal:
    return micros_to_credits(micros)
