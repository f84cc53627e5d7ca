"""A renewal activity retried after its grant (the worker died before reporting) has the same effect once: it must
not expire the new period's plan credits. Real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from psycopg_pool import AsyncConnectionPool

from activities.billing_cycle import BillingCycleActivities, RenewInput, StartSubscriptionInput
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.plans import load_plan_catalog
from creditflow.ledger.accounts import create_account
from tests.support.ledger import assert_invariants


async def plan_lots_left(pool: AsyncConnectionPool, account: str) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT coalesce(sum(remaining_micros), 0) AS s FROM credit_lots WHERE account_id = %s AND source = 'plan'",
            (account,))).fetchone()
    assert row is not None
    return int(row["s"])


async def test_a_retried_renewal_keeps_the_new_plan_credits(pool: AsyncConnectionPool) -> None:
    cycle = BillingCycleActivities(pool, load_plan_catalog())
    account = (await create_account(pool, name="a", billing_email="a@x.test", welcome_bonus_credits=0)).id
    state = await cycle.start_subscription(StartSubscriptionInput(
        account_id=account, plan_id="starter", anchor=datetime(2025, 1, 1, tzinfo=UTC),
        now=datetime(2025, 1, 5, tzinfo=UTC)))
    async with pool.connection() as conn:  # every plan credit used: nothing will be left to expire
        await conn.execute("SELECT cf_post(%s, 'adjustment', %s, 'system:adjustments', 'use', NULL, 'adjustment', 10,"
                           " NULL, 'use-1', NULL)", (account, -5_000 * MICROS_PER_CREDIT))
    first = await cycle.renew_subscription(RenewInput(account_id=account, subscription=state))
    # The activity runs again (worker died after the grant, before reporting): same effect, nothing more.
    again = await cycle.renew_subscription(RenewInput(account_id=account, subscription=state))
    assert (first.expired_micros, again.expired_micros) == (0, 0)
    assert await plan_lots_left(pool, account) == 5_000 * MICROS_PER_CREDIT
    await assert_invariants(pool)
