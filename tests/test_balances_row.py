"""The balances row's rules (migration 0022): single-column checks are domains, checked wherever a
column is assigned, and ``controlled`` follows the columns it is computed from."""

from __future__ import annotations

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from creditflow.ledger import accounts, limits


async def _controlled(pool: AsyncConnectionPool, acc: str) -> bool:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT controlled FROM balances WHERE account_id = %s", (acc,))).fetchone()
    assert row is not None
    return bool(row["controlled"])


async def test_controlled_follows_limits_plans_and_agents(pool: AsyncConnectionPool) -> None:
    acc = (await accounts.create_account(pool, name="K", billing_email="k@x.co")).id
    assert await _controlled(pool, acc) is False
    await limits.update_limits(pool, acc, {"daily_limit_micros": 5_000_000})
    assert await _controlled(pool, acc) is True
    await limits.update_limits(pool, acc, {"daily_limit_micros": None})
    assert await _controlled(pool, acc) is False
    async with pool.connection() as conn:
        for assignment, expected in (("plan_left_micros = 1", True), ("plan_left_micros = 0", False),
                                     ("plan_id = 'starter'", True), ("plan_id = NULL", False),
                                     ("agent_controls = true", True), ("agent_controls = false", False)):
            await conn.execute(f"UPDATE balances SET {assignment} WHERE account_id = %s", (acc,))
            assert await _controlled(pool, acc) is expected, assignment
        # The flag cannot be set by hand: assigning it recomputes it.
        await conn.execute("UPDATE balances SET monthly_limit_micros = 9, controlled = false WHERE account_id = %s",
                           (acc,))
        assert await _controlled(pool, acc) is True
        await conn.execute("UPDATE balances SET monthly_limit_micros = NULL WHERE account_id = %s", (acc,))
        await conn.execute("UPDATE balances SET controlled = true WHERE account_id = %s", (acc,))
        assert await _controlled(pool, acc) is False


@pytest.mark.parametrize("assignment", [
    "daily_limit_micros = 0", "monthly_limit_micros = -1", "per_agent_limit_micros = 0",
    "daily_usage_alert_micros = 0", "held_micros = -1", "unburned_micros = -1", "plan_left_micros = -1",
    "day_spent_micros = -1", "month_spent_micros = -1", "floor_micros = 1", "limit_action = 'explode'",
    "balance_micros = -1",  # below the floor of 0: the table's own check
])
async def test_every_rule_still_refuses_a_bad_value(pool: AsyncConnectionPool, assignment: str) -> None:
    acc = (await accounts.create_account(pool, name="V", billing_email="v@x.co")).id
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(f"UPDATE balances SET {assignment} WHERE account_id = %s", (acc,))
