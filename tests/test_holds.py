"""Holds on the hot path: an overdue hold settles or releases once, the sweeper expires each account on its own,
and reserved credits count against hard spend limits. Real PostgreSQL."""

from __future__ import annotations

import asyncio

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger import accounts, limits, metering
from creditflow.ledger.accounts import create_account
from creditflow.ledger.metering import UsageEvent
from tests.support.ledger import assert_invariants


async def test_settling_an_overdue_hold_releases_it_once(pool: AsyncConnectionPool) -> None:
    acc = (await accounts.create_account(pool, name="H", billing_email="h@x.co")).id
    long = await metering.create_hold(pool, UsageEvent.build(acc, "voice_minute", 300, "long"), 3600)
    short = await metering.create_hold(pool, UsageEvent.build(acc, "voice_minute", 100, "short"), 1)
    assert long.allowed and short.allowed
    await asyncio.sleep(1.2)
    # 250 minutes = 2,500 credits would only fit by spending the long hold's reservation: refused.
    denied = await metering.settle_hold(pool, acc, short.hold_id or "", 250)
    assert denied.code == "insufficient_credits"
    await assert_invariants(pool)
    settled = await metering.settle_hold(pool, acc, short.hold_id or "", 150)
    assert settled.allowed and settled.credits_charged == 1500
    balances = (await metering.check(pool, acc, "chat_message")).balances
    assert balances is not None and (balances.balance, balances.pending_charges) == (3500, 3000)
    released = await metering.release_hold(pool, acc, long.hold_id or "")
    assert released.allowed and released.released == 3000
    again = await metering.release_hold(pool, acc, short.hold_id or "")
    assert again.code == "hold_settled"
    await assert_invariants(pool)


async def test_sweeper_expires_each_account_on_its_own(pool: AsyncConnectionPool) -> None:
    ids = [(await accounts.create_account(pool, name=f"S{i}", billing_email="s@x.co")).id for i in range(3)]
    for acc in ids:
        await metering.create_hold(pool, UsageEvent.build(acc, "voice_minute", 10, "h"), 1)
    await asyncio.sleep(1.2)
    assert await metering.expire_overdue_holds(pool) == 300
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
