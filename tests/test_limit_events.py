"""Limit events reach the account workflow through the outbox, possibly late: an event for a day already over must
not pause agents for today. Real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from psycopg_pool import AsyncConnectionPool

from creditflow.ledger.accounts import create_account


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
