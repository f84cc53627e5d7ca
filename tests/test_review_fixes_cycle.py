"""Regressions found in review (issues 4 and 5), each once a real defect: a renewal retried after its grant must not
expire the new period's plan credits; active holds count against hard limits. Real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from psycopg_pool import AsyncConnectionPool

from activities.billing_cycle import BillingCycleActivities, RenewInput, StartSubscriptionInput
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.plans import load_plan_catalog
from creditflow.ledger import limits
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


async def test_holds_count_against_a_hard_daily_limit(pool: AsyncConnectionPool) -> None:
    account = (await create_account(pool, name="a", billing_email="a@x.test", welcome_bonus_credits=5_000)).id
    await limits.put_limits(pool, account, limits.Limits(daily_limit_micros=100 * MICROS_PER_CREDIT))
    async with pool.connection() as conn:
        first = await (await conn.execute(
            "SELECT * FROM cf_hold(%s, 'voice_minute', 8, NULL, 600, 'h1', sha256('h1'::bytea), NULL)",
            (account,))).fetchone()
        second = await (await conn.execute(
            "SELECT * FROM cf_hold(%s, 'voice_minute', 8, NULL, 600, 'h2', sha256('h2'::bytea), NULL)",
            (account,))).fetchone()
        assert first is not None and second is not None
        assert (first["code"], second["code"]) == ("ok", "daily_limit_reached")  # 80 reserved + 80 > 100
        event = await (await conn.execute(
            "SELECT * FROM cf_track(%s, 'chat_message', 30, NULL, 'e1', sha256('e1'::bytea), NULL, true)",
            (account,))).fetchone()
        assert event is not None and event["code"] == "daily_limit_reached"  # 80 reserved + 30 > 100
        settled = await (await conn.execute("SELECT * FROM cf_hold_settle(%s, %s, 8, NULL)",
                                            (account, first["hold_id"]))).fetchone()
        assert settled is not None and settled["code"] == "ok"
        spent = await (await conn.execute("SELECT day_spent_micros FROM balances WHERE account_id = %s",
                                          (account,))).fetchone()
    assert spent is not None and spent["day_spent_micros"] == 80 * MICROS_PER_CREDIT
    await assert_invariants(pool)


async def test_a_limit_event_of_a_day_already_over_pauses_nobody(pool: AsyncConnectionPool) -> None:
    """Outbox lag across midnight: yesterday's daily limit must not pause agents for today."""
    from datetime import timedelta

    from activities.agents import AgentActivities, LimitReachedInput
    from creditflow.ledger import agents

    account = (await create_account(pool, name="a", billing_email="a@x.test", welcome_bonus_credits=0)).id
    await agents.create_agent(pool, account, "bot")
    now = datetime.now(UTC)
    activities = AgentActivities(pool)
    stale = await activities.pause_for_limit(LimitReachedInput(
        account_id=account, scope="daily", now=now, period=(now - timedelta(days=1)).date().isoformat()))
    assert stale.changes == [] and (await agents.get_agent(pool, account, "bot")).status == "active"
    fresh = await activities.pause_for_limit(LimitReachedInput(
        account_id=account, scope="daily", now=now, period=now.date().isoformat()))
    assert [c.agent_id for c in fresh.changes] == ["bot"]
    assert fresh.next_resume_at == datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
